"""Lowering: a planned pairwise contraction path to a :class:`ContractionProgram`.

:func:`compile_path` turns an opt_einsum path into the straight-line code of a
:class:`~ndcompile.ir.program.ContractionProgram`, once, at conversion time.

Each pairwise contraction is lowered to one (broadcasting) ``torch.matmul``. The
layout of each operand is chosen so that no ``permute`` is needed when the operand's
current memory order allows it: a factor ``W (h, d)`` meets ``x (B, d, rest)`` as a
left multiply ``W @ x.view(B, d, rest)``, and a trailing mode as a right multiply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Mapping, Sequence
from typing import cast

from ndcompile.ir.program import ContractionProgram, Instruction

__all__ = ["compile_path"]

#: Size used in shapes for the single dynamic (batch) index.
DYNAMIC = -1
#: Cost of moving one element through a permute+copy, in flop-equivalents.
PERMUTE_COST = 24.0
#: Matmul dimension below which BLAS efficiency drops roughly linearly.
SATURATING_DIM = 32.0


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

    def sum_out(
        self, reg: int, idx: tuple[str, ...], kept: Container[str]
    ) -> tuple[int, tuple[str, ...]]:
        """Sum out the indices of ``idx`` not in ``kept``; returns the register and its order."""
        dead = tuple(p for p, i in enumerate(idx) if i not in kept)
        if not dead:
            return reg, idx
        return self.emit("sum", (reg,), dead), tuple(i for i in idx if i in kept)

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
    ra, ia = b.sum_out(ra, ia, keep | set(ib))
    rb, ib = b.sum_out(rb, ib, keep | set(ia))

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
            reg, idx = b.sum_out(reg, idx, keep)
        last = not live
        for reg2, idx2 in picked[1:]:
            final = out_set if last and reg2 is picked[-1][0] else None
            reg, idx = _contract_pair(b, reg, idx, reg2, idx2, keep, final)
        live.append((reg, idx))
    if len(live) != 1:
        raise ValueError(f"path leaves {len(live)} operands, expected 1")
    reg, idx = live[0]
    reg, idx = b.sum_out(reg, idx, out_set)
    reg = b.permute(reg, idx, out_set)
    return ContractionProgram(
        n_inputs=len(operands),
        instructions=b.dead_code_eliminated(reg),
        result=reg,
        output=out_set,
        permuted_elements=b.permuted,
    )
