"""Dynamo pass: mode-wise Linear chains (the reference NdLinear forward) -> one contraction.

The reference ``ndlinear.NdLinear`` applies one ``nn.Linear`` per mode, moving the
mode last with ``transpose`` + ``contiguous`` + ``view`` and back again. In a dynamo
graph that is a chain of ``transpose``/``contiguous``/``view``/``linear`` nodes. This
pass follows such chains from their input ``x (*, d1..dN)`` with an abstract
interpretation (which input axis every current dim holds), and when a chain ends
with ``(*, h1..hN)`` in the input's axis order after applying one linear map to each
of the trailing N axes, it replaces the whole chain by the planned contraction of
:func:`ndcompile.planner.plan.plan_ndlinear` (the NdLinear network) plus the exactly composed
per-mode biases (:func:`ndcompile.layers.execution.mode_bias`). The weights are the lifted
parameter placeholders themselves, so training sees the same parameters.

Before (``gm.code`` of ``ndlinear.NdLinear((4, 6), (5, 2))``, batch 3)::

    transpose = torch.transpose(l_x_, 1, 2);  X = transpose.contiguous()
    X_1 = X.view(-1, 4);  X_2 = torch._C._nn.linear(X_1, w0, b0)
    X_3 = X_2.view(3, 6, 5);  transpose_1 = torch.transpose(X_3, 1, 2) ...
    X_7 = torch._C._nn.linear(X_6, w1, b1) ...;  X_9 = transpose_3.contiguous()

After (the planner chose the order and layout; the bias is composed from b0, b1)::

    permute = w1.permute((1, 0));  reshape = l_x_.reshape((-1, 6))
    matmul = torch.matmul(reshape, permute);  reshape_1 = matmul.reshape((-1, 4, 2))
    permute_1 = reshape_1.permute((1, 0, 2));  reshape_2 = permute_1.reshape((4, -1))
    matmul_1 = torch.matmul(w0, reshape_2);  reshape_3 = matmul_1.reshape((5, -1, 2))
    permute_2 = reshape_3.permute((1, 0, 2)) ...;  add_1 = permute_2 + reshape_8

Chains that do not end in that canonical layout, split an axis, apply a map
twice to one axis or feed other users midway are left untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch import Tensor
from torch.fx.proxy import GraphAppendingTracer, Proxy

from ndcompile.ir.tiled import graph_tile
from ndcompile.layers.execution import mode_bias
from ndcompile.passes.dynamo.common import (
    commit_replacement,
    example_value,
    fake_mode_of,
    is_linear,
    linear_args,
    module_path,
    restore_leading,
    rows_hint,
    same_shape,
    size_expr,
    size_hint,
    static_int,
)
from ndcompile.passes.runner import ReportedResult
from ndcompile.planner.plan import plan_ndlinear
from ndcompile.report import LayerReport

__all__ = ["ModeChain", "find_mode_chain", "rewrite_mode_chains"]

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


class _RankOneFactor:
    """A ``(h, d)`` weight seen as a rank-1 factor ``(1, h, d)`` by :func:`mode_bias`."""

    def __init__(self, weight: Proxy) -> None:
        self.weight = weight

    def __getitem__(self, index: int) -> Proxy:
        if index != 0:
            raise IndexError(index)
        return self.weight


def _emit(graph: fx.Graph, chain: ModeChain, optimizer: str, rows: int) -> tuple[fx.Node, Any]:
    tracer = GraphAppendingTracer(graph)

    # Typed Any: a Proxy stands in for a Tensor and traces methods it does not declare.
    def proxy(node: fx.Node) -> Any:
        return Proxy(node, tracer)

    x = chain.x
    if len(chain.lead) != 1:
        x = graph.call_method("reshape", (x, (-1, *chain.in_shape)))
    # The planner picks mode grouping x order x layout (not only the FLOP-optimal order).
    choice = plan_ndlinear(chain.in_shape, chain.out_shape, 1, batch=rows, optimizer=optimizer)
    plan = choice.chosen.plan
    shapes = [(h, d) for d, h in zip(chain.in_shape, chain.out_shape, strict=True)]
    tile = graph_tile(plan.program, chain.in_shape, shapes, example_value(chain.x), rows)
    if tile:
        args = (x, list(chain.weights), None, plan.program.to_text(), tile)
        y = graph.call_function(torch.ops.ndcompile.tiled_contract.default, args)
    else:
        y = plan.program.run(proxy(x), *(proxy(w) for w in chain.weights)).node
    y.meta["ndcompile_plan"] = plan
    y = restore_leading(graph, chain.x, chain.lead, y, chain.out_shape)
    if any(b is not None for b in chain.biases):
        weights = [proxy(w) for w in chain.weights]
        biases = [
            proxy(b) if b is not None else w.new_zeros(h)
            for b, w, h in zip(chain.biases, weights, chain.out_shape, strict=True)
        ]
        # Duck-typed: mode_bias only reads factor[0] of each rank-1 factor.
        factors: list[Any] = [_RankOneFactor(w) for w in weights]
        bias = mode_bias(biases, factors, chain.order, chain.out_shape)
        y = (proxy(y) + bias.reshape(chain.out_shape)).node
    return y, plan


def _entry(chain: ModeChain, plan: Any, rows: int) -> LayerReport:
    linears = [n for n in chain.nodes if is_linear(n)]
    found = module_path(linears[0], kind="ndlinear.NdLinear") or module_path(chain.nodes[-1])
    name, kind = found or (chain.weights[0].name, "mode-wise Linear chain")
    params = sum(math.prod(example_value(n).shape) for n in chain.weights)
    params += sum(math.prod(example_value(n).shape) for n in chain.biases if n is not None)
    removed: dict[str, int] = {}
    for node in chain.nodes:
        key = "linear" if is_linear(node) else str(getattr(node.target, "__name__", node.target))
        removed[key] = removed.get(key, 0) + 1
    return LayerReport(
        name=name,
        kind=kind,
        status="inlined",
        in_features=math.prod(chain.in_shape),
        out_features=math.prod(chain.out_shape),
        in_shape=chain.in_shape,
        out_shape=chain.out_shape,
        mode_source="graph",
        rank=1,
        params_before=params,
        params_after=params,
        flops_before=chain.flops_before,
        flops_after=plan.flops,
        naive_flops=plan.naive_flops,
        largest_intermediate=plan.largest_intermediate,
        plan=str(plan),
        extra={"removed_ops": removed, "mode_order": list(chain.order), "rows": rows},
    )


def rewrite_mode_chains(gm: fx.GraphModule, *, optimizer: str = "auto") -> ReportedResult:
    """Replace every canonical mode-wise linear chain of a dynamo graph by one contraction.

    Each replacement is evaluated on FakeTensors before it is committed; one whose
    result differs in shape or dtype is dropped and the chain kept.

    Args:
        gm: A dynamo graph module (modified in place).
        optimizer: Planner optimizer (one of ``ndcompile.OPTIMIZERS``).

    Returns:
        ``ReportedResult(gm, modified)`` whose ``layers`` has one entry per rewritten
        chain.
    """
    graph, fake_mode = gm.graph, fake_mode_of(gm)
    entries: list[LayerReport] = []
    rejected: set[tuple[fx.Node, fx.Node]] = set()
    progress = True
    while progress:
        progress = False
        for x in list(graph.nodes):
            for first in list(x.users):
                if (x, first) in rejected:
                    continue
                chain = find_mode_chain(x, first)
                if chain is None:
                    continue
                rows = rows_hint(chain.lead)
                end = chain.nodes[-1]
                before = set(graph.nodes)
                with graph.inserting_before(end):
                    result, plan = _emit(graph, chain, optimizer, rows)
                new_nodes = [n for n in graph.nodes if n not in before]
                if commit_replacement(graph, new_nodes, result, end, chain.nodes, fake_mode):
                    entries.append(_entry(chain, plan, rows))
                    progress = True
                    break
                rejected.add((x, first))
            if progress:
                break
    if entries:
        graph.lint()
        gm.recompile()
    return ReportedResult(gm, bool(entries), layers=entries)
