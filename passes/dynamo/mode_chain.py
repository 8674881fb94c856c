"""Find mode-wise Linear chains (the reference NdLinear forward) in a dynamo graph.

:func:`find_mode_chain` follows a chain of ``transpose``/``permute``/``contiguous``/
``view``/``reshape``/``linear`` nodes from its input ``x (*, d1..dN)`` with an abstract
interpretation (which input axis every current dim holds). A chain matches when it
ends with ``(*, h1..hN)`` in the input's axis order after applying one linear map to
each of the trailing N axes; chains that split an axis, apply a map twice to one axis
or feed other users midway do not. :mod:`ndcompile.passes.dynamo.ndlinear` replaces
the matches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch import Tensor

from ndcompile.passes.dynamo.common import (
    example_value,
    is_linear,
    linear_args,
    same_shape,
    size_expr,
    size_hint,
    static_int,
)

__all__ = ["ModeChain", "find_mode_chain"]

_TRANSPOSE_METHODS = {"transpose", "swapaxes", "swapdims"}
_TRANSPOSE_FUNCTIONS = {torch.transpose, torch.swapaxes, torch.swapdims}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.unflatten}
_IDENTITY_METHODS = {"contiguous", "clone"}


@dataclass
class ModeChain:
    """A matched chain applying one linear map per trailing mode of ``x``.

    Attributes:
        x: The chain's input node ``(*lead, d1..dN)``.
        nodes: The chain's nodes in order; the last one is replaced.
        lead: Leading (batch) sizes of ``x`` (ints or SymInts).
        in_shape: ``(d1..dN)``.
        out_shape: ``(h1..hN)``.
        weights: Weight node of each mode ``(h_k, d_k)``.
        biases: Bias node of each mode ``(h_k,)`` or None.
        order: The order in which the modes are applied.
        flops_before: FLOPs of the chain's linear maps (nominal batch for symbolic dims).
    """

    x: fx.Node
    nodes: list[fx.Node]
    lead: tuple[Any, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    weights: list[fx.Node]
    biases: list[fx.Node | None]
    order: tuple[int, ...]
    flops_before: int


@dataclass
class _State:
    """Which axes of the chain input each current dim holds (row-major groups)."""

    sizes: list[sympy.Expr]
    hints: list[int]
    groups: list[tuple[int, ...]]
    applied: list[tuple[int, fx.Node, fx.Node | None]] = field(default_factory=list)
    flops: int = 0

    def shape(self) -> list[sympy.Expr]:
        return [sympy.Mul(*(self.sizes[a] for a in g)) for g in self.groups]

    def canonical(self) -> bool:
        n_axes = len(self.sizes)
        modes = sorted(a for a, _, _ in self.applied)
        first = n_axes - len(modes)
        return (
            len(modes) >= 2
            and self.groups == [(a,) for a in range(n_axes)]
            and modes == list(range(first, n_axes))
        )

    def regroup(self, out_shape: Any) -> bool:
        atoms = [a for g in self.groups for a in g]
        groups: list[tuple[int, ...]] = []
        i = 0
        for target in (size_expr(s) for s in out_shape):
            group: list[int] = []
            if target == 1:
                if i < len(atoms) and self.sizes[atoms[i]] == 1:
                    group.append(atoms[i])
                    i += 1
                groups.append(tuple(group))
                continue
            prod: sympy.Expr = sympy.Integer(1)
            while sympy.expand(prod - target) != 0:
                if i >= len(atoms):
                    return False
                group.append(atoms[i])
                prod = sympy.expand(prod * self.sizes[atoms[i]])
                i += 1
                if prod.is_Integer and target.is_Integer and prod > target:
                    return False
            groups.append(tuple(group))
        rest = atoms[i:]
        if any(self.sizes[a] != 1 for a in rest) or (rest and not groups):
            return False
        if rest:
            groups[-1] = groups[-1] + tuple(rest)
        self.groups = groups
        return True


def _dim(value: Any, ndim: int) -> int | None:
    if not isinstance(value, int) or isinstance(value, bool) or not -ndim <= value < ndim:
        return None
    return value % ndim


def _uses_only_first(node: fx.Node, cur: fx.Node) -> bool:
    if not node.args or node.args[0] is not cur:
        return False
    others = [*node.args[1:], *node.kwargs.values()]
    found: list[fx.Node] = []
    fx.node.map_arg(others, found.append)
    return cur not in found


def _linear_step(state: _State, node: fx.Node, cur: fx.Node) -> bool:
    x, w, b = linear_args(node)
    if x is not cur or w is cur or b is cur or not isinstance(w, fx.Node):
        return False
    last = state.groups[-1] if state.groups else ()
    if len(last) != 1 or any(a == last[0] for a, _, _ in state.applied):
        return False
    axis = last[0]
    wv, bv, xv = example_value(w), example_value(b), example_value(cur)
    if not isinstance(wv, Tensor) or wv.dim() != 2 or wv.dtype != xv.dtype:
        return False
    h, d = static_int(wv.shape[0]), static_int(wv.shape[1])
    if h is None or d is None or size_expr(d) != state.sizes[axis]:
        return False
    if b is not None and not (
        isinstance(bv, Tensor) and bv.dim() == 1 and static_int(bv.shape[0]) == h
    ):
        return False
    others = math.prod(hint for a, hint in enumerate(state.hints) if a != axis)
    state.flops += 2 * others * d * h
    state.sizes[axis], state.hints[axis] = sympy.Integer(h), h
    state.applied.append((axis, w, b))
    return True


def _step(state: _State, node: fx.Node, cur: fx.Node) -> bool:
    """Advance the abstract state over ``node`` (whose input is ``cur``); False to stop."""
    if node.op not in ("call_function", "call_method"):
        return False
    if is_linear(node):
        ok = _linear_step(state, node, cur)
    elif not _uses_only_first(node, cur):
        return False
    else:
        ok = _layout_step(state, node)
    value = example_value(node)
    return ok and isinstance(value, Tensor) and same_shape(value.shape, state.shape())


def _layout_step(state: _State, node: fx.Node) -> bool:
    name = node.target if node.op == "call_method" else None
    func = node.target if node.op == "call_function" else None
    ndim, args = len(state.groups), node.args[1:]
    if name in _IDENTITY_METHODS:
        fmt = node.kwargs.get("memory_format", torch.contiguous_format)
        return not args and fmt in (torch.contiguous_format, torch.preserve_format)
    if name in _TRANSPOSE_METHODS or func in _TRANSPOSE_FUNCTIONS:
        dims = [_dim(a, ndim) for a in args]
        if len(dims) != 2 or None in dims or node.kwargs:
            return False
        i, j = dims
        state.groups[i], state.groups[j] = state.groups[j], state.groups[i]  # type: ignore[index]
        return True
    if name == "permute" or func is torch.permute:
        perm = args[0] if len(args) == 1 and isinstance(args[0], list | tuple) else args
        dims = [_dim(a, ndim) for a in perm]
        if sorted(d for d in dims if d is not None) != list(range(ndim)) or node.kwargs:
            return False
        state.groups = [state.groups[d] for d in dims]  # type: ignore[index]
        return True
    if name in _RESHAPE_METHODS or func in _RESHAPE_FUNCTIONS:
        value = example_value(node)
        if any(isinstance(a, torch.dtype) for a in args) or not isinstance(value, Tensor):
            return False
        return state.regroup(value.shape)
    return False


def find_mode_chain(x: fx.Node, first: fx.Node) -> ModeChain | None:
    """The longest canonical mode-wise linear chain from ``x`` through its user ``first``.

    Args:
        x: A node with a FakeTensor example value ``(*lead, d1..dN)``.
        first: The user of ``x`` where the chain starts.

    Returns:
        The chain, or None if none ends in the canonical layout.
    """
    xv = example_value(x)
    if not isinstance(xv, Tensor) or xv.dim() < 2 or not xv.dtype.is_floating_point:
        return None
    state = _State(
        sizes=[size_expr(s) for s in xv.shape],
        hints=[size_hint(s) for s in xv.shape],
        groups=[(a,) for a in range(xv.dim())],
    )
    chain: list[fx.Node] = []
    best: tuple[int, list, int, list] | None = None
    cur: fx.Node = x
    nxt: fx.Node | None = first
    while nxt is not None and _step(state, nxt, cur):
        chain.append(nxt)
        if state.canonical():
            best = (len(chain), list(state.applied), state.flops, list(state.sizes))
        cur = nxt
        nxt = next(iter(cur.users)) if len(cur.users) == 1 else None
    if best is None:
        return None
    length, applied, flops, sizes = best
    first_mode = xv.dim() - len(applied)
    by_mode = sorted(applied, key=lambda item: item[0])
    return ModeChain(
        x=x,
        nodes=chain[:length],
        lead=tuple(xv.shape[:first_mode]),
        in_shape=tuple(int(s) for s in xv.shape[first_mode:]),
        out_shape=tuple(int(s) for s in sizes[first_mode:]),
        weights=[w for _, w, _ in by_mode],
        biases=[b for _, _, b in by_mode],
        order=tuple(a - first_mode for a, _, _ in applied),
        flops_before=flops,
    )
