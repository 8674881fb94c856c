"""Contraction programs: a planned pairwise contraction path lowered to explicit torch ops.

A :class:`ContractionProgram` is a straight-line list of ``reshape``/``permute``/
``matmul``/``sum`` instructions over a register file. It is produced once at
conversion time from an opt_einsum path and runs unchanged on real tensors (eager
forward) or on ``torch.fx.Proxy`` values (which emits the ops into an FX graph), so
no opt_einsum call is ever made at run time.

Each pairwise contraction is lowered to one (broadcasting) ``torch.matmul``. The
layout of each operand is chosen so that no ``permute`` is needed when the operand's
current memory order allows it: a factor ``W (h, d)`` meets ``x (B, d, rest)`` as a
left multiply ``W @ x.view(B, d, rest)``, and a trailing mode as a right multiply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

__all__ = ["ContractionProgram", "Instruction", "compile_path"]

#: Size used in shapes for the single dynamic (batch) index.
DYNAMIC = -1
#: Cost of moving one element through a permute+copy, in flop-equivalents.
PERMUTE_COST = 24.0
#: Matmul dimension below which BLAS efficiency drops roughly linearly.
SATURATING_DIM = 32.0


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
    shape = (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
    if out is not None and out.numel() != math.prod(shape):
        return torch.matmul(a, b), False
    dest = None if out is None else out.view(shape)
    acc = None
    full_row = bias is not None and tuple(bias.shape) == (shape[1:] if row is None else row)
    if full_row and a.dim() in (2, 3) and a.shape[:-2] == b.shape[:-2]:
        acc = _bias_view(bias, a.dtype, shape)
    if acc is not None:
        gemm = torch.addmm if a.dim() == 2 else torch.baddbmm
        return (gemm(acc, a, b) if dest is None else gemm(acc, a, b, out=dest)), True
    if ranks == (2, 3):
        return (torch.bmm(a, b) if dest is None else torch.bmm(a, b, out=dest)), False
    return (torch.matmul(a, b) if dest is None else torch.matmul(a, b, out=dest)), False


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


def _add(a: Any, b: Any, out: torch.Tensor | None) -> Any:
    """``a + b``, into ``out`` (viewed to the sum's shape) when it fits."""
    if out is not None:
        shape = torch.broadcast_shapes(a.shape, b.shape)
        if out.numel() == shape.numel():
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
    """

    n_inputs: int
    instructions: list[Instruction] = field(default_factory=list)
    result: int = 0
    output: tuple[str, ...] = ()
    permuted_elements: int = 0

    def run(
        self, *operands: Any, out: torch.Tensor | None = None, bias: torch.Tensor | None = None
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
                pass over the result.

        Returns:
            The contracted tensor (or proxy) in ``self.output`` index order; ``out``
            when given.
        """
        sink = self._sink() if out is not None or bias is not None else -1
        row = tuple(out.shape[1:]) if out is not None else self._row_shape(sink)
        folded = False
        regs: dict[int, Any] = dict(enumerate(operands))
        for k, ins in enumerate(self.instructions):
            dest = out if k == sink else None
            if ins.op == "reshape":
                regs[ins.out] = regs[ins.srcs[0]].reshape(ins.arg)
            elif ins.op == "permute":
                regs[ins.out] = regs[ins.srcs[0]].permute(ins.arg)
            elif ins.op == "matmul":
                fold = bias if k == sink else None
                regs[ins.out], added = _matmul(
                    regs[ins.srcs[0]], regs[ins.srcs[1]], ins.arg, dest, fold, row
                )
                folded = folded or added
            elif ins.op == "sum":
                regs[ins.out] = regs[ins.srcs[0]].sum(ins.arg)
            elif ins.op == "select":
                regs[ins.out] = regs[ins.srcs[0]].select(*ins.arg)
            elif ins.op == "add":
                regs[ins.out] = _add(regs[ins.srcs[0]], regs[ins.srcs[1]], dest)
            else:  # pragma: no cover - instructions are built by this module only
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


class _Builder:
    """Symbolic lowering state: the index order of every live register."""

    def __init__(
        self, sizes: Mapping[str, int], dynamic: str | None, nominal: Mapping[str, int]
    ) -> None:
        self.sizes = dict(sizes)
        self.dynamic = dynamic
        self.nominal = {i: max(1, nominal.get(i, s)) for i, s in self.sizes.items()}
        self.code: list[Instruction] = []
        self.next_reg = 0
        self.permuted = 0

    def new_reg(self) -> int:
        reg = self.next_reg
        self.next_reg += 1
        return reg

    def group_size(self, group: Sequence[str]) -> int:
        if self.dynamic is not None and self.dynamic in group:
            return DYNAMIC
        return math.prod(self.sizes[i] for i in group)

    def elements(self, idx: Sequence[str]) -> int:
        return math.prod(self.nominal[i] for i in idx)

    def pair_cost(
        self,
        il: tuple[str, ...],
        ir: tuple[str, ...],
        s: tuple[str, ...],
        lay_l: tuple,
        lay_r: tuple,
    ) -> float:
        """Estimated cost (flop-equivalents) of one matmul layout, permutes included."""
        ll, ml, kk = lay_l
        rlead, mr, _ = lay_r
        cost = 0.0
        for order, target in ((il, s + ll + ml + kk), (ir, s + rlead + kk + mr)):
            if order != target:
                weight_only = self.dynamic not in order
                cost += PERMUTE_COST * self.elements(order) * (0.25 if weight_only else 1.0)
        m, n, k = self.elements(ml), self.elements(mr), self.elements(kk)
        flops = 2.0 * self.elements(s + ll + rlead) * m * n * k
        efficiency = min(1.0, min(m, n, max(k, 1)) / SATURATING_DIM)
        return cost + flops / max(efficiency, 1.0 / SATURATING_DIM)

    def emit(
        self, op: str, srcs: tuple[int, ...], arg: tuple[int, ...] = (), dims: tuple[int, ...] = ()
    ) -> int:
        out = self.new_reg()
        self.code.append(Instruction(op, srcs, out, arg, dims))
        return out

    def permute(self, reg: int, idx: tuple[str, ...], target: tuple[str, ...]) -> int:
        if idx == target:
            return reg
        self.permuted += self.elements(idx)
        perm = tuple(idx.index(i) for i in target)
        return self.emit("permute", (reg,), perm, (self.elements(idx),))

    def reshape(self, reg: int, current: tuple[int, ...], target: tuple[int, ...]) -> int:
        if current == target:
            return reg
        # Peephole: a reshape of a reshape reads the original register instead.
        producer = next((ins for ins in self.code if ins.out == reg), None)
        if producer is not None and producer.op == "reshape":
            reg = producer.srcs[0]
        return self.emit("reshape", (reg,), target)

    def dead_code_eliminated(self, result: int) -> list[Instruction]:
        """The instructions the result depends on, in order."""
        live, kept = {result}, []
        for ins in reversed(self.code):
            if ins.out in live:
                kept.append(ins)
                live.update(ins.srcs)
        return kept[::-1]

    def shape_of(self, idx: Sequence[str]) -> tuple[int, ...]:
        return tuple(self.group_size((i,)) for i in idx)


def _free(order: tuple[str, ...], shared: Sequence[str]) -> tuple[str, ...]:
    return tuple(i for i in order if i not in shared)


def _ordered(order: tuple[str, ...], subset: set[str]) -> tuple[str, ...]:
    return tuple(i for i in order if i in subset)


def _left_layout(order: tuple[str, ...], s: Sequence[str], k: set[str]) -> tuple | None:
    """Natural layout of an operand used as the left matmul operand, or None.

    Left needs ``S + LL + ML + K``; we take LL empty and ML = the free middle.
    """
    ns, nk = len(s), len(k)
    if tuple(order[:ns]) != tuple(s) or set(order[len(order) - nk :]) != k:
        return None
    middle = order[ns : len(order) - nk]
    return ((), tuple(middle), tuple(order[len(order) - nk :]))


def _right_layout(order: tuple[str, ...], s: Sequence[str], k: set[str]) -> tuple | None:
    """Natural layout of an operand used as the right matmul operand, or None.

    Right needs ``S + RL + K + MR`` with K contiguous.
    """
    ns = len(s)
    if tuple(order[:ns]) != tuple(s):
        return None
    rest = order[ns:]
    pos = [p for p, i in enumerate(rest) if i in k]
    if not pos:
        return (tuple(rest), (), ())
    if pos[-1] - pos[0] + 1 != len(pos):
        return None
    return (tuple(rest[: pos[0]]), tuple(rest[pos[-1] + 1 :]), tuple(rest[pos[0] : pos[-1] + 1]))


def _contract_pair(
    b: _Builder,
    ra: int,
    ia: tuple[str, ...],
    rb: int,
    ib: tuple[str, ...],
    keep: set[str],
    final: tuple[str, ...] | None = None,
) -> tuple[int, tuple[str, ...]]:
    """Lower one pairwise contraction; returns the result register and its index order.

    ``final`` is the program's output order when this is the last step: layouts whose
    result needs a permute to reach it are charged for that copy, and layouts whose
    free indices already follow it are tried too.
    """
    # Indices private to one operand and not needed later are summed out first.
    dead_a = tuple(p for p, i in enumerate(ia) if i not in ib and i not in keep)
    if dead_a:
        ra = b.emit("sum", (ra,), dead_a)
        ia = tuple(i for i in ia if i in ib or i in keep)
    dead_b = tuple(p for p, i in enumerate(ib) if i not in ia and i not in keep)
    if dead_b:
        rb = b.emit("sum", (rb,), dead_b)
        ib = tuple(i for i in ib if i in ia or i in keep)

    shared = [i for i in ia if i in ib]
    k_set = {i for i in shared if i not in keep}
    best: tuple | None = None
    for (rl, il), (rr, ir) in (((ra, ia), (rb, ib)), ((rb, ib), (ra, ia))):
        # S order follows the larger operand so that the smaller one is the one permuted.
        big = il if b.elements(il) >= b.elements(ir) else ir
        s = tuple(i for i in big if i in shared and i not in k_set)
        kk_big = _ordered(big, k_set)
        lefts = [_left_layout(il, s, k_set), ((), _free(il, shared), kk_big)]
        rights = [_right_layout(ir, s, k_set), ((), _free(ir, shared), kk_big)]
        if final is not None:
            rank = {i: p for p, i in enumerate(final)}
            # Free indices of the last step are all kept, so all are in ``final``.
            by_rank = cast(Callable[[str], int], rank.get)
            lefts.append(((), tuple(sorted(_free(il, shared), key=by_rank)), kk_big))
            rights.append(((), tuple(sorted(_free(ir, shared), key=by_rank)), kk_big))
        for lay_l in lefts:
            for lay_r in rights:
                if lay_l is None or lay_r is None or lay_l[2] != lay_r[2]:
                    continue
                cost = b.pair_cost(il, ir, s, lay_l, lay_r)
                if final is not None:
                    out_order = s + lay_l[0] + lay_r[0] + lay_l[1] + lay_r[1]
                    if tuple(i for i in out_order if i in rank) != final:
                        cost += PERMUTE_COST * b.elements(out_order)
                cand = (cost, (rl, il, lay_l), (rr, ir, lay_r), s)
                if best is None or cand[0] < best[0]:
                    best = cand
    assert best is not None
    _, (rl, il, (ll, ml, kk)), (rr, ir, (rlead, mr, _)), s = best

    target_l = s + ll + ml + kk
    target_r = s + rlead + kk + mr
    rl = b.permute(rl, il, target_l)
    rr = b.permute(rr, ir, target_r)
    sg = (b.group_size(s),) if s else ()
    gl, gr = b.group_size(ll), b.group_size(rlead)
    # Broadcast dims: without S, matmul's right-aligned broadcasting fills a missing
    # leading dim, so the explicit 1 is only needed when S is present.
    pad = bool(s)
    lead_l = ((gl,) if ll else ()) + ((1,) if rlead and (pad or ll) else ())
    lead_r = ((1,) if ll and (pad or rlead) else ()) + ((gr,) if rlead else ())
    lshape = (*sg, *lead_l, b.group_size(ml), b.group_size(kk))
    rshape = (*sg, *lead_r, b.group_size(kk), b.group_size(mr))
    mshape = (*sg, *((gl,) if ll else ()), *((gr,) if rlead else ()))
    mshape = (*mshape, b.group_size(ml), b.group_size(mr))
    rl = b.reshape(rl, b.shape_of(target_l), lshape)
    rr = b.reshape(rr, b.shape_of(target_r), rshape)
    matmul_dims = (
        b.elements(s + ll + rlead),
        b.elements(ml),
        b.elements(kk),
        b.elements(mr),
        b.elements(s + ll),
        b.elements(s + rlead),
    )
    out = b.emit("matmul", (rl, rr), (len(lshape), len(rshape)), matmul_dims)
    out_idx = s + ll + rlead + ml + mr
    out = b.reshape(out, mshape, b.shape_of(out_idx))
    return out, out_idx


def compile_path(
    operands: Sequence[Sequence[str]],
    output: Sequence[str],
    path: Sequence[Sequence[int]],
    sizes: Mapping[str, int],
    *,
    dynamic: str | None = None,
    nominal: Mapping[str, int] | None = None,
) -> ContractionProgram:
    """Lower an opt_einsum contraction path to a :class:`ContractionProgram`.

    Args:
        operands: Index names of each operand, in its memory order.
        output: Index names of the result, in the wanted order.
        path: Pairwise path as returned by ``opt_einsum.contract_path``
            (each step lists positions in the current operand list; popped
            operands are removed and the result appended).
        sizes: Size of every index.
        dynamic: Name of the one index whose size is only known at run time
            (the batch index); shapes use ``-1`` for it.
        nominal: Sizes assumed by the layout cost model (defaults to ``sizes``;
            give the dynamic index a typical batch size here).

    Returns:
        The lowered program.
    """
    b = _Builder(sizes, dynamic, nominal or {})
    live: list[tuple[int, tuple[str, ...]]] = []
    for idx in operands:
        live.append((b.new_reg(), tuple(idx)))
    out_set = tuple(output)
    for step in path:
        picked = [live[p] for p in step]
        for p in sorted(step, reverse=True):
            live.pop(p)
        keep = set(out_set)
        for _, idx in live:
            keep.update(idx)
        reg, idx = picked[0]
        if len(picked) == 1:
            dead = tuple(p for p, i in enumerate(idx) if i not in keep)
            if dead:
                reg = b.emit("sum", (reg,), dead)
                idx = tuple(i for i in idx if i in keep)
        last = not live
        for reg2, idx2 in picked[1:]:
            final = out_set if last and reg2 is picked[-1][0] else None
            reg, idx = _contract_pair(b, reg, idx, reg2, idx2, keep, final)
        live.append((reg, idx))
    if len(live) != 1:
        raise ValueError(f"path leaves {len(live)} operands, expected 1")
    reg, idx = live[0]
    dead = tuple(p for p, i in enumerate(idx) if i not in out_set)
    if dead:
        reg = b.emit("sum", (reg,), dead)
        idx = tuple(i for i in idx if i in out_set)
    reg = b.permute(reg, idx, out_set)
    return ContractionProgram(
        n_inputs=len(operands),
        instructions=b.dead_code_eliminated(reg),
        result=reg,
        output=out_set,
        permuted_elements=b.permuted,
    )
