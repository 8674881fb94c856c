"""Contraction programs: straight-line torch ops over a register file.

A :class:`ContractionProgram` is a straight-line list of ``reshape``/``permute``/
``matmul``/``sum`` instructions over a register file. It is produced once at
conversion time from an opt_einsum path (:func:`~ndcompile.ir.lowering.compile_path`)
and runs unchanged on real tensors (eager forward) or on ``torch.fx.Proxy`` values
(which emits the ops into an FX graph), so no opt_einsum call is ever made at run time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ContractionProgram", "Instruction", "broadcast_shapes", "records_grad"]


@dataclass(frozen=True)
class Instruction:
    """One op of a program: ``out = op(*srcs, arg)``.

    Attributes:
        op: One of ``"reshape"``, ``"permute"``, ``"matmul"``, ``"sum"``, ``"select"``
            (a view ``src.select(dim, index)``) or ``"add"`` (two same-shape registers).
        srcs: Register numbers read.
        out: Register number written.
        arg: The shape (reshape), permutation (permute), dims (sum), ``(dim, index)``
            (select) or the operand ranks (matmul).
        dims: Nominal sizes for cost models: ``(batch, m, k, n, left_batch,
            right_batch)`` of a matmul (the batch each operand really has; the other
            is broadcast), the element count of a permute or add.
    """

    op: str
    srcs: tuple[int, ...]
    out: int
    arg: tuple[int, ...] = ()
    dims: tuple[int, ...] = ()


def broadcast_shapes(a: Sequence[Any], b: Sequence[Any]) -> tuple[Any, ...]:
    """``torch.broadcast_shapes(a, b)``, without its Python overhead for plain int shapes.

    ``torch.broadcast_shapes`` costs tens of microseconds a call (it goes through
    ``torch._refs``). Programs call it once per matmul, on every tile. Symbolic sizes
    go to torch's version.

    Args:
        a: A shape (ints or SymInts).
        b: Another shape.

    Returns:
        The broadcast shape.

    Raises:
        RuntimeError: When the shapes do not broadcast.
    """
    if not all(type(d) is int for d in (*a, *b)):
        return tuple(torch.broadcast_shapes(tuple(a), tuple(b)))
    n = max(len(a), len(b))
    ta, tb = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(ta, tb, strict=True):
        if x != y and x != 1 and y != 1:
            raise RuntimeError(f"shapes {tuple(a)} and {tuple(b)} do not broadcast")
        out.append(y if x == 1 else x)
    return tuple(out)


def _matmul(
    a: Any,
    b: Any,
    ranks: tuple[int, ...],
    out: torch.Tensor | None,
    bias: torch.Tensor | None,
    row: tuple[int, ...] | None = None,
) -> tuple[Any, bool]:
    """One program matmul, into ``out`` (viewed to the product's shape) when it fits.

    With ``bias`` of the result's row shape ``row`` (default: the product's own
    ``shape[1:]``), the bias is folded into the GEMM (``addmm``/``baddbmm``: the output
    starts as the bias and the product is accumulated on top) when it can be viewed to
    the product's shape.

    Returns:
        The product and whether ``bias`` was added.
    """
    if ranks == (2, 3):
        # A shared matrix times a batch: torch.matmul would copy the batch transposed
        # when the matrix requires grad; bmm on a broadcast view of the matrix reads
        # both in place.
        a = a.expand(b.shape[0], -1, -1)
    if not isinstance(a, torch.Tensor):  # FX proxies
        return (torch.bmm(a, b) if ranks == (2, 3) else torch.matmul(a, b)), False
    if a.dim() < 2 or b.dim() < 2:
        return torch.matmul(a, b), False
    shape = (*broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
    if out is not None and out.numel() != math.prod(shape):
        return torch.matmul(a, b), False
    dest = None if out is None else out.view(shape)
    acc = None
    full_row = bias is not None and tuple(bias.shape) == (shape[1:] if row is None else row)
    if full_row and a.dim() in (2, 3) and a.shape[:-2] == b.shape[:-2]:
        acc = _bias_view(bias, a.dtype, shape)
    if acc is not None:
        return _biased_gemm(acc, a, b, dest), True
    if ranks == (2, 3):
        return (torch.bmm(a, b) if dest is None else torch.bmm(a, b, out=dest)), False
    return (torch.matmul(a, b) if dest is None else torch.matmul(a, b, out=dest)), False


def _matmul_plus(
    a: Any, b: Any, ranks: tuple[int, ...], out: torch.Tensor | None, bias: Any
) -> Any:
    """``a @ b + bias`` (``bias`` broadcast against the product), into ``out`` when it fits.

    A 2-D or batched 3-D product of tensors takes the bias in its GEMM (``addmm``,
    ``baddbmm``); FX proxies and other products add it after the matmul (inductor
    folds that add into the GEMM or into the next copy of the product).
    """
    if ranks == (2, 3):
        a = a.expand(b.shape[0], -1, -1)
    tensors = isinstance(a, torch.Tensor) and isinstance(bias, torch.Tensor)
    gemm_ok = tensors and a.dim() in (2, 3) and a.shape[:-2] == b.shape[:-2]
    if not gemm_ok or bias.dtype != a.dtype:
        product, _ = _matmul(a, b, (), None, None)
        return _add(product, bias, out) if tensors else product + bias
    shape = (*a.shape[:-1], b.shape[-1])
    dest = out.view(shape) if out is not None and out.numel() == math.prod(shape) else None
    return _biased_gemm(bias, a, b, dest)


def _biased_gemm(
    bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None
) -> torch.Tensor:
    """``bias + a @ b`` in one GEMM (``addmm`` for 2-D, ``baddbmm`` for batched 3-D)."""
    gemm = torch.addmm if a.dim() == 2 else torch.baddbmm
    return gemm(bias, a, b) if out is None else gemm(bias, a, b, out=out)


def _bias_view(
    bias: torch.Tensor | None, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor | None:
    """``bias`` (a whole result row) as a view that broadcasts against ``shape``, or None.

    The result is ``(rows, *bias.shape)`` and the product ``shape`` is a view of it,
    so a suffix of ``shape`` holding as many elements as the bias is the bias' own
    (contiguous) layout, and the rest broadcasts. Decided on sizes alone, so it traces.
    """
    if not isinstance(bias, torch.Tensor) or bias.dtype != dtype or bias.numel() == 0:
        return None
    size = 1
    for j in range(len(shape) - 1, -1, -1):
        size *= shape[j]
        if size == bias.numel():
            return bias.reshape(shape[j:])
        if size > bias.numel():
            return None
    return None


def _late_add(bias: Any, operands: Sequence[Any]) -> bool:
    """Whether ``bias`` may be added in place after the GEMM instead of folded into it.

    Only for CPU tensors (the only device the choice is measured on) that autograd
    does not record (FX proxies and gradients keep the fold).
    """
    values = (*operands, bias)
    if not all(isinstance(v, torch.Tensor) for v in values) or bias.device.type != "cpu":
        return False
    return not records_grad(values)


def records_grad(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether autograd records ops on any of ``tensors`` (grad mode on, one requires grad)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _add(a: Any, b: Any, out: torch.Tensor | None) -> Any:
    """``a + b``, into ``out`` (viewed to the sum's shape) when it fits."""
    if out is not None:
        shape = broadcast_shapes(a.shape, b.shape)
        if out.numel() == math.prod(shape):
            return torch.add(a, b, out=out.view(shape))
    return a + b


@dataclass
class ContractionProgram:
    """A lowered contraction: instructions plus the register of the result.

    Attributes:
        n_inputs: Number of operand registers (0..n_inputs-1).
        instructions: The straight-line code.
        result: Register holding the result, in ``output`` index order.
        output: Index names of the result, in order.
        permuted_elements: Elements copied by permutes (per unit of the dynamic index).
        late_bias: Add a whole-row bias after the result's GEMM, in place, instead of
            folding it into the GEMM (``addmm``/``baddbmm`` first copy the broadcast
            bias over the output). The planner sets it from the machine's measured
            :attr:`~ndcompile.planner.machine.MachineModel.bias_in_gemm`; runs that
            take gradients and runs off the CPU fold the bias whatever the setting.
    """

    n_inputs: int
    instructions: list[Instruction] = field(default_factory=list)
    result: int = 0
    output: tuple[str, ...] = ()
    permuted_elements: int = 0
    late_bias: bool = False
    #: Backward schedules of :func:`ndcompile.ir.autodiff.program_vjp`, by operand
    #: shapes and flags (derived data, not part of the program).
    vjp_schedules: dict[Any, Any] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def run(
        self,
        *operands: Any,
        out: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        step_biases: Mapping[int, Any] | None = None,
    ) -> Any:
        """Execute on tensors or FX proxies.

        Args:
            *operands: One value per input register, laid out as at compile time.
            out: A contiguous tensor of the result's shape to write the result into
                (tensors only). The instruction that makes the result (through any
                final reshapes) writes there directly when it is a matmul or an add,
                so no result-sized temporary is made; otherwise the result is copied.
            bias: Added to the result (broadcast against it). When it has the shape
                of a whole result row and the result's matmul can take it (tensors
                only), it is folded into that GEMM (``addmm``/``baddbmm``), saving a
                pass over the result; with ``late_bias``, runs that take no
                gradient add it in place after the GEMM instead.
            step_biases: Biases added to the products of matmuls, by instruction
                index, each broadcast against its product (the per-mode biases of
                :mod:`ndcompile.ir.bias_steps`); folded into the GEMM
                (``addmm``/``baddbmm``) where it is one.

        Returns:
            The contracted tensor (or proxy) in ``self.output`` index order; ``out``
            when given.
        """
        sink = self._sink() if out is not None or bias is not None else -1
        row = tuple(out.shape[1:]) if out is not None else self._row_shape(sink)
        # A late bias is added in place once the result is written.
        late = self.late_bias and _late_add(bias, operands)
        sink_bias = None if late else bias
        folded = False
        regs: dict[int, Any] = dict(enumerate(operands))
        for k, ins in enumerate(self.instructions):
            dest = out if k == sink else None
            if ins.op == "reshape":
                regs[ins.out] = regs[ins.srcs[0]].reshape(ins.arg)
            elif ins.op == "permute":
                regs[ins.out] = regs[ins.srcs[0]].permute(ins.arg)
            elif ins.op == "matmul":
                fold = sink_bias if k == sink else None
                a, b = regs[ins.srcs[0]], regs[ins.srcs[1]]
                if step_biases is not None and k in step_biases:
                    regs[ins.out] = _matmul_plus(a, b, ins.arg, dest, step_biases[k])
                    continue
                regs[ins.out], added = _matmul(a, b, ins.arg, dest, fold, row)
                folded = folded or added
            elif ins.op == "sum":
                regs[ins.out] = regs[ins.srcs[0]].sum(ins.arg)
            elif ins.op == "select":
                regs[ins.out] = regs[ins.srcs[0]].select(*ins.arg)
            elif ins.op == "add":
                regs[ins.out] = _add(regs[ins.srcs[0]], regs[ins.srcs[1]], dest)
            else:  # pragma: no cover - instructions are built by ndcompile.ir only
                raise AssertionError(ins.op)
        result = regs[self.result]
        if out is None:
            if bias is None or folded:
                return result
            # A matmul's or add's result is a fresh tensor: outside autograd, adding
            # the bias in place saves a fresh buffer and a pass over the result.
            fresh = sink >= 0 and isinstance(result, torch.Tensor) and not result.requires_grad
            return result.add_(bias) if fresh else result + bias
        if result.data_ptr() != out.data_ptr() or result.shape != out.shape:
            out.copy_(result.reshape(out.shape))
        if bias is not None and not folded:
            out.add_(bias)
        return out

    def writes_out(self) -> bool:
        """Whether :meth:`run` writes the result straight into ``out`` (no copy into it)."""
        return self._sink() >= 0

    def _row_shape(self, sink: int) -> tuple[int, ...] | None:
        """The result's row shape from the reshapes after instruction ``sink``.

        None when the sink's value is the result itself; ``(-1,)`` (matching no bias)
        when a reshape leaves a row size to be inferred.
        """
        if sink < 0:
            return None
        reg, arg = self.instructions[sink].out, None
        for ins in self.instructions[sink + 1 :]:
            if ins.op == "reshape" and ins.srcs[0] == reg:
                reg, arg = ins.out, tuple(ins.arg)
        if arg is None:
            return None
        return (-1,) if -1 in arg[1:] else arg[1:]

    def _sink(self) -> int:
        """Index of the matmul or add whose value is the result up to reshapes (-1: none)."""
        reg = self.result
        for k in range(len(self.instructions) - 1, -1, -1):
            ins = self.instructions[k]
            if ins.out != reg:
                continue
            if ins.op == "reshape":
                reg = ins.srcs[0]
                continue
            return k if ins.op in ("matmul", "add") else -1
        return -1

    def to_text(self) -> str:
        """The program as JSON text (what :meth:`from_text` reads back)."""
        code = [[i.op, list(i.srcs), i.out, list(i.arg), list(i.dims)] for i in self.instructions]
        return json.dumps(
            {
                "n_inputs": self.n_inputs,
                "result": self.result,
                "output": list(self.output),
                "permuted_elements": self.permuted_elements,
                "code": code,
                **({"late_bias": True} if self.late_bias else {}),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_text(cls, text: str) -> ContractionProgram:
        """Parse :meth:`to_text`'s output."""
        data = json.loads(text)
        code = [
            Instruction(op, tuple(srcs), out, tuple(arg), tuple(dims))
            for op, srcs, out, arg, dims in data["code"]
        ]
        return cls(
            n_inputs=data["n_inputs"],
            instructions=code,
            result=data["result"],
            output=tuple(data["output"]),
            permuted_elements=data["permuted_elements"],
            late_bias=bool(data.get("late_bias", False)),
        )

    def count(self, op: str) -> int:
        """Number of instructions of kind ``op``."""
        return sum(ins.op == op for ins in self.instructions)

    def __str__(self) -> str:
        lines = [f"ContractionProgram(inputs={self.n_inputs}, output={''.join(self.output)})"]
        for ins in self.instructions:
            srcs = ", ".join(f"r{s}" for s in ins.srcs)
            arg = f", {list(ins.arg)}" if ins.arg or ins.op != "matmul" else ""
            lines.append(f"  r{ins.out} = {ins.op}({srcs}{arg})")
        lines.append(f"  return r{self.result}")
        return "\n".join(lines)
