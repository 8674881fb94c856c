"""Emit an NdLinear contraction into an FX graph as explicit ops."""

from __future__ import annotations

from typing import Any, cast

import torch.fx as fx
from torch import nn
from torch.fx.proxy import GraphAppendingTracer, Proxy

from ndcompile.ir.meta import LEAD_SOURCE, PLAN, REGION
from ndcompile.layers.execution import apply_ndlinear, mode_bias
from ndcompile.layers.ndlinear import NdLinear

__all__ = ["LEAD_SOURCE", "emit_ndlinear", "replace_call", "set_submodule"]


def set_submodule(root: nn.Module, qualname: str, module: nn.Module) -> None:
    """Install ``module`` at dotted path ``qualname`` under ``root`` (parents must exist)."""
    parent_name, _, leaf = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


#: ``node.meta`` key: ``(node, k, f)``: this node has ``f`` feature dims and its leading
#: dims are ``node.shape[:-k]``.


def emit_ndlinear(
    gm: fx.GraphModule,
    x: fx.Node,
    qualname: str,
    layer: NdLinear,
    *,
    flat_input: bool,
) -> fx.Node:
    """Insert ``layer``'s contraction on ``x`` at the graph's insert point.

    The layer must already be installed at ``qualname`` in ``gm``; its parameters
    are read with ``get_attr`` so they stay trainable parameters of ``gm``.

    Args:
        gm: The graph module being rewritten.
        x: The input node.
        qualname: Where ``layer`` lives in ``gm``.
        layer: The layer (for its shapes and plan).
        flat_input: True when ``x`` is ``(*, prod d)`` (an ``nn.Linear`` site).

    Returns:
        The output node; ``meta[PLAN]`` holds the plan.
    """
    tracer = GraphAppendingTracer(gm.graph)
    before = set(gm.graph.nodes)

    # Typed Any: a Proxy stands in for a Tensor and traces methods it does not declare.
    def proxy(node: fx.Node) -> Any:
        return Proxy(node, tracer)

    def attr(name: str) -> Any:
        return proxy(gm.graph.get_attr(f"{qualname}.{name}"))

    factors = [attr(f"factors.{k}") for k in range(len(layer.in_shape))]
    operands = [f[0] for f in factors] if layer.rank == 1 else factors
    bias = None
    if layer.bias is not None:
        bias = attr("bias")
    elif layer.mode_biases is not None:
        biases = [attr(f"mode_biases.{k}") for k in range(len(layer.in_shape))]
        bias = mode_bias(biases, factors, layer.mode_order, layer.out_shape)
    lowrank = (attr("lowrank_u"), attr("lowrank_v")) if layer.lowrank else None
    # Read the leading dims from the first layer of a chain of linear layers, so the
    # outputs in between have no shape-query users (they can fuse).
    features = 1 if flat_input else len(layer.in_shape)
    source, k, produced = x.meta.get(LEAD_SOURCE, (x, features, features))
    if produced != features:  # x's leading dims are not the producer's
        source, k = x, features
    lead = proxy(source).shape[:-k]
    out = apply_ndlinear(
        proxy(x),
        operands,
        bias,
        layer.plan(),
        layer.in_shape,
        layer.out_shape,
        flat_input=flat_input,
        lead=lead,
        lowrank=lowrank,
    )
    out.node.meta[PLAN] = layer.plan()
    out.node.meta[LEAD_SOURCE] = (source, k, 1 if flat_input else len(layer.out_shape))
    # One inlined layer is one contraction source for fuse_contractions.
    for node in gm.graph.nodes:
        if node not in before:
            node.meta[REGION] = f"{qualname}@{out.node.name}"
    return out.node


def replace_call(
    gm: fx.GraphModule, node: fx.Node, qualname: str, layer: NdLinear, *, flat_input: bool
) -> fx.Node:
    """Replace the call ``node`` (on ``node.args[0]``) by ``layer``'s emitted contraction."""
    with gm.graph.inserting_before(node):
        out = emit_ndlinear(gm, cast(fx.Node, node.args[0]), qualname, layer, flat_input=flat_input)
    out.meta["tensor_meta"] = node.meta.get("tensor_meta")
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return out
