"""Reverse mode over a :class:`~ndcompile.ir.program.ContractionProgram`, recomputing intermediates.

Autograd saves both operands of every matmul of a program, so a two-mode NdLinear
keeps its input *and* an intermediate as large as (or, for a rank-R sum, R times)
the activation until the backward pass: more activation memory than the dense
layer, which saves only its input. :func:`program_vjp` needs only the program's
inputs: it recomputes the intermediates that a gradient needs (never the result,
and nothing for operands without a gradient), then walks the instructions in
reverse. :class:`RecomputedContraction` wraps it as an autograd function, so
training saves the input and the factors only.

Backward of each instruction (``g`` is the gradient of its output):

* ``reshape``: ``g.reshape(src shape)``; ``permute``: the inverse permutation;
* ``sum(dims)``: ``g`` unsqueezed at ``dims`` and expanded;
* ``select(dim, index)``: ``g`` scattered into zeros; ``add``: ``g`` to both;
* ``matmul(a, b)``: ``g @ bᵀ`` and ``aᵀ @ g``, summed over broadcast dims.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ndcompile.ir.program import ContractionProgram, Instruction, broadcast_shapes

__all__ = ["RecomputedContraction", "program_vjp", "register_shapes", "run_recomputed"]

Shape = tuple[Any, ...]


def _product(values: Sequence[Any]) -> Any:
    # A plain loop: dynamo traces the backward and rejects generators here.
    out: Any = 1
    for v in values:
        out = out * v
    return out


def _reshaped(src: Shape, target: Sequence[int]) -> Shape:
    if -1 not in target:
        return tuple(target)
    known = _product([s for s in target if s != -1])
    total = _product(src)
    return tuple([total // known if s == -1 else s for s in target])


def _broadcast(a: Shape, b: Shape) -> Shape:
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    return tuple(y if isinstance(x, int) and x == 1 else x for x, y in zip(a, b, strict=True))


def _out_shape(ins: Instruction, shapes: dict[int, Shape]) -> Shape:
    src = shapes[ins.srcs[0]]
    if ins.op == "reshape":
        return _reshaped(src, ins.arg)
    if ins.op == "permute":
        return tuple(src[p] for p in ins.arg)
    if ins.op == "sum":
        return tuple(s for d, s in enumerate(src) if d not in ins.arg)
    if ins.op == "select":
        return tuple(s for d, s in enumerate(src) if d != ins.arg[0])
    if ins.op == "add":
        return src
    if ins.op == "matmul":
        other = shapes[ins.srcs[1]]
        if ins.arg == (2, 3):
            return (other[0], src[0], other[2])
        return (*_broadcast(src[:-2], other[:-2]), src[-2], other[-1])
    raise AssertionError(ins.op)  # pragma: no cover - instructions come from program.py


def register_shapes(program: ContractionProgram, input_shapes: Sequence[Shape]) -> dict[int, Shape]:
    """The shape of every register, propagated from the input shapes (no tensors made).

    Args:
        program: The program.
        input_shapes: One shape per input register (ints or SymInts).

    Returns:
        Shape by register number.
    """
    shapes: dict[int, Shape] = {k: tuple(s) for k, s in enumerate(input_shapes)}
    for ins in program.instructions:
        shapes[ins.out] = _out_shape(ins, shapes)
    return shapes


def _execute(ins: Instruction, regs: dict[int, Tensor]) -> Tensor:
    src = regs[ins.srcs[0]]
    if ins.op == "reshape":
        return src.reshape(ins.arg)
    if ins.op == "permute":
        return src.permute(ins.arg)
    if ins.op == "sum":
        return src.sum(ins.arg)
    if ins.op == "select":
        return src.select(*ins.arg)
    other = regs[ins.srcs[1]]
    if ins.op == "add":
        return src + other
    if ins.arg == (2, 3):
        return torch.bmm(src.expand(other.shape[0], -1, -1), other)
    return torch.matmul(src, other)


def _needed_values(program: ContractionProgram, grad_regs: set[int]) -> set[int]:
    """Registers whose values the backward pass reads (matmul operands), with their sources."""
    needed: set[int] = set()
    for ins in program.instructions:
        if ins.op == "matmul":
            a, b = ins.srcs
            if a in grad_regs:
                needed.add(b)
            if b in grad_regs:
                needed.add(a)
    for ins in reversed(program.instructions):
        if ins.out in needed:
            needed.update(ins.srcs)
    return needed


def _summed_matmul(x: Tensor, y: Tensor, shape: Shape, out: Tensor | None = None) -> Tensor:
    """``x @ y`` summed to ``shape``; the (possibly batch-sized) product dies here.

    A matrix times a batch runs as ``bmm`` over the expanded matrix, as the forward
    does: ``torch.matmul`` would fold it into one GEMM on a transposed copy of the
    batch and return a transposed view (another copy once made contiguous). With
    ``out`` (contiguous, ``shape``'s size), a product that needs no sum is written
    there.
    """
    bmm = x.dim() == 2 and y.dim() == 3
    if bmm:
        x = x.expand(y.shape[0], -1, -1)
    product = (*broadcast_shapes(x.shape[:-2], y.shape[:-2]), x.shape[-2], y.shape[-1])
    if out is not None and product == tuple(shape) and out.numel() == _product(shape):
        dest = out.view(product)
        return torch.bmm(x, y, out=dest) if bmm else torch.matmul(x, y, out=dest)
    return (torch.bmm(x, y) if bmm else torch.matmul(x, y)).sum_to_size(shape)


def _input_sink(program: ContractionProgram) -> tuple[int, int] | None:
    """``(instruction index, register)`` of the one matmul reading operand 0 through reshapes.

    None when operand 0 (or a reshape of it) is read anywhere else, so that its
    gradient is a sum of several terms.
    """
    views = {0}
    uses: list[tuple[int, int]] = []
    for i, ins in enumerate(program.instructions):
        if ins.op == "reshape" and ins.srcs[0] in views:
            views.add(ins.out)
            continue
        uses += [(i, r) for r in ins.srcs if r in views]
    if len(uses) != 1 or program.instructions[uses[0][0]].op != "matmul":
        return None
    return uses[0]


def _accumulate(grads: dict[int, Tensor], reg: int, value: Tensor) -> None:
    grads[reg] = grads[reg] + value if reg in grads else value


@dataclass(frozen=True)
class _VjpSchedule:
    """What :func:`program_vjp` derives from a program, its operand shapes and ``needs_grad``."""

    grad_regs: frozenset[int]
    shapes: dict[int, Shape]
    recompute: tuple[int, ...]  # instructions to rerun, in order
    unread: tuple[int, ...]  # recomputed registers no matmul reads (dropped at once)
    drop_after: dict[int, tuple[int, ...]]  # backward step -> registers freed before it
    sink: tuple[int, int] | None  # where operand 0's gradient can be written in place


def _schedule(
    program: ContractionProgram, shapes_in: Sequence[Shape], needs_grad: Sequence[bool], sink: bool
) -> _VjpSchedule:
    grad_regs = {k for k, wanted in enumerate(needs_grad) if wanted}
    for ins in program.instructions:
        if grad_regs.intersection(ins.srcs):
            grad_regs.add(ins.out)
    needed = _needed_values(program, grad_regs)
    recompute = tuple(k for k, ins in enumerate(program.instructions) if ins.out in needed)
    # Backward reads recomputed values in matmul gradients only. Drop each one once
    # the first matmul reading it (the last one backward reaches) is done, and drop
    # those no matmul reads (inputs of other recomputed values, kept alive by their
    # views) right away, so backward holds as little as it can at once.
    first_read: dict[int, int] = {}
    for i, ins in enumerate(program.instructions):
        if ins.op == "matmul":
            for r in ins.srcs:
                first_read.setdefault(r, i)
    drop_after: dict[int, list[int]] = {}
    unread: list[int] = []
    for k in recompute:
        r = program.instructions[k].out
        if r in first_read:
            drop_after.setdefault(first_read[r] - 1, []).append(r)
        else:
            unread.append(r)
    return _VjpSchedule(
        grad_regs=frozenset(grad_regs),
        shapes=register_shapes(program, shapes_in),
        recompute=recompute,
        unread=tuple(unread),
        drop_after={i: tuple(rs) for i, rs in drop_after.items()},
        sink=_input_sink(program) if sink and needs_grad[0] else None,
    )


#: Most schedules kept per program (one per tile size and flags in practice).
_MAX_SCHEDULES = 64


def _cached_schedule(
    program: ContractionProgram, shapes_in: list[Shape], needs_grad: Sequence[bool], sink: bool
) -> _VjpSchedule:
    """The program's schedule for these shapes and flags, kept on the program itself.

    Programs are not changed once lowered (the tiled op reruns one on every tile).
    Schedules are shared: nothing may write to one.
    """
    symbolic = not all(isinstance(d, int) for s in shapes_in for d in s)
    if symbolic or torch.compiler.is_compiling():  # traced once: nothing to save
        return _schedule(program, shapes_in, needs_grad, sink)
    cache = program.vjp_schedules
    key = (tuple(shapes_in), tuple(bool(n) for n in needs_grad), sink)
    found = cache.get(key)
    if found is None:
        if len(cache) >= _MAX_SCHEDULES:
            cache.clear()
        found = cache[key] = _schedule(program, shapes_in, needs_grad, sink)
    return found


def program_vjp(
    program: ContractionProgram,
    operands: Sequence[Tensor],
    grad_output: Tensor,
    needs_grad: Sequence[bool],
    input_out: Tensor | None = None,
) -> list[Tensor | None]:
    """Gradients of ``program.run(*operands)`` given the gradient of its result.

    Args:
        program: The program that was run.
        operands: Its inputs, as in the forward call.
        grad_output: Gradient of the result.
        needs_grad: Per operand, whether its gradient is wanted.
        input_out: A contiguous tensor of operand 0's shape. When one matmul alone
            reads operand 0 (through reshapes), its gradient is written there (the
            returned gradient is then a view of it); otherwise it is unused.

    Returns:
        One gradient per operand (None where not wanted).
    """
    plan = _cached_schedule(
        program, [tuple(t.shape) for t in operands], needs_grad, input_out is not None
    )
    grad_regs, shapes, sink = plan.grad_regs, plan.shapes, plan.sink
    regs: dict[int, Tensor] = dict(enumerate(operands))
    for k in plan.recompute:
        ins = program.instructions[k]
        regs[ins.out] = _execute(ins, regs)
    for r in plan.unread:
        del regs[r]
    grads: dict[int, Tensor] = {program.result: grad_output}
    for i in reversed(range(len(program.instructions))):
        for r in plan.drop_after.get(i, ()):
            del regs[r]
        ins = program.instructions[i]
        g = grads.pop(ins.out, None)
        if g is None:
            continue
        src = ins.srcs[0]
        if ins.op == "reshape":
            _accumulate(grads, src, g.reshape(shapes[src]))
        elif ins.op == "permute":
            inverse = [0] * len(ins.arg)
            for pos, dim in enumerate(ins.arg):
                inverse[dim] = pos
            _accumulate(grads, src, g.permute(inverse))
        elif ins.op == "sum":
            for dim in sorted(ins.arg):
                g = g.unsqueeze(dim)
            _accumulate(grads, src, g.expand(shapes[src]))
        elif ins.op == "select":
            zeros = g.new_zeros(shapes[src])
            _accumulate(grads, src, torch.select_scatter(zeros, g, *ins.arg))
        elif ins.op == "add":
            _accumulate(grads, src, g)
            _accumulate(grads, ins.srcs[1], g)
        else:
            a, b = ins.srcs
            a_out = input_out if sink == (i, a) else None
            b_out = input_out if sink == (i, b) else None
            if a in grad_regs:
                at = _summed_matmul(g, regs[b].transpose(-1, -2), shapes[a], a_out)
                _accumulate(grads, a, at)
            if b in grad_regs:
                bt = _summed_matmul(regs[a].transpose(-1, -2), g, shapes[b], b_out)
                _accumulate(grads, b, bt)
            del g
    return [grads.get(k) if wanted else None for k, wanted in enumerate(needs_grad)]


class RecomputedContraction(torch.autograd.Function):
    """``program.run`` that saves only its inputs and recomputes intermediates in backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(program: ContractionProgram, *operands: Tensor) -> Tensor:  # type: ignore[override]
        return program.run(*operands)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.program = inputs[0]
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        operands = ctx.saved_tensors
        grads = program_vjp(ctx.program, operands, grad_output, ctx.needs_input_grad[1:])
        return (None, *grads)


def run_recomputed(program: ContractionProgram, *operands: Tensor) -> Tensor:
    """Run ``program`` so that autograd saves its inputs only (see the module docstring).

    Falls back to :meth:`ContractionProgram.run` when no operand needs a gradient.
    """
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in operands):
        return program.run(*operands)
    out = RecomputedContraction.apply(program, *operands)
    assert isinstance(out, Tensor)
    return out
