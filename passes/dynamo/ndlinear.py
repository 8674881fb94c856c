"""Dynamo pass: mode-wise Linear chains (the reference NdLinear forward) -> one contraction.

The reference ``ndlinear.NdLinear`` applies one ``nn.Linear`` per mode, moving the
mode last with ``transpose`` + ``contiguous`` + ``view`` and back again. In a dynamo
graph that is a chain of ``transpose``/``contiguous``/``view``/``linear`` nodes. This
pass follows such chains from their input ``x (*, d1..dN)`` with an abstract
interpretation (which input axis every current dim holds;
:mod:`ndcompile.passes.dynamo.mode_chain` finds the chains), and when a chain ends
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
from typing import Any

import torch
import torch.fx as fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

from ndcompile.ir.tiled import graph_tile
from ndcompile.kernels.kron2 import graph_kron2
from ndcompile.layers.execution import mode_bias
from ndcompile.passes.dynamo.common import (
    commit_replacement,
    example_value,
    fake_mode_of,
    is_linear,
    module_path,
    restore_leading,
    rows_hint,
)
from ndcompile.passes.dynamo.mode_chain import ModeChain, find_mode_chain
from ndcompile.passes.runner import ReportedResult
from ndcompile.planner.plan import plan_ndlinear
from ndcompile.report import LayerReport

# ModeChain and find_mode_chain live in mode_chain; they are re-exported from here.
__all__ = ["ModeChain", "find_mode_chain", "rewrite_mode_chains"]


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
    fused = graph_kron2(
        example_value(chain.x),
        chain.in_shape,
        [example_value(w) for w in chain.weights],
        [None if b is None else example_value(b) for b in chain.biases],
        example_value(chain.nodes[-1]),
    )
    tile = 0
    if not fused:
        tile = graph_tile(plan.program, chain.in_shape, shapes, example_value(chain.x), rows)
    bias: Any = None
    if any(b is not None for b in chain.biases):
        weights = [proxy(w) for w in chain.weights]
        biases = [
            proxy(b) if b is not None else w.new_zeros(h)
            for b, w, h in zip(chain.biases, weights, chain.out_shape, strict=True)
        ]
        # Duck-typed: mode_bias only reads factor[0] of each rank-1 factor.
        factors: list[Any] = [_RankOneFactor(w) for w in weights]
        bias = mode_bias(biases, factors, chain.order, chain.out_shape)
    if fused:
        # The generated kernel adds the bias as it writes each row.
        full = None if bias is None else bias.reshape(-1).node
        y = graph.call_function(torch.ops.ndcompile.kron2.default, (x, *chain.weights, full))
        bias = None
    elif tile:
        args = (x, list(chain.weights), None, plan.program.to_text(), tile)
        y = graph.call_function(torch.ops.ndcompile.tiled_contract.default, args)
    else:
        y = plan.program.run(proxy(x), *(proxy(w) for w in chain.weights)).node
    y.meta["ndcompile_plan"] = plan
    y = restore_leading(graph, chain.x, chain.lead, y, chain.out_shape)
    if bias is not None:
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
