"""Exact pass: inline NdLinear layers (ours and the reference one) as planned ops.

The reference ``ndlinear.NdLinear`` runs 2(N-1) transposes and ``contiguous``
copies per call; after this pass the graph holds only the planned
matmul/reshape ops of :mod:`ndcompile.program`, with the reference layer's
weights imported exactly (:meth:`NdLinear.from_reference`).

Before::

    nd = self.nd(x)

After::

    nd_factors_0 = self.nd.factors[0]; ...; matmul = torch.matmul(getitem, reshape) ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ndcompile.frontend.trace import is_reference_ndlinear
from ndcompile.ir.meta import INLINED_LAYERS
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.passes.fx.emit import replace_call, set_submodule

__all__ = ["InlinedLayer", "inline_ndlinear"]


@dataclass(frozen=True)
class InlinedLayer:
    """A layer ``inline_ndlinear`` replaced: name, original kind, params, rows per call."""

    name: str
    kind: str
    params: int
    rows: int


def _rows(node: fx.Node, layer: NdLinear) -> int:
    meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    if meta is None:
        return layer.plan_batch
    features = 1 if layer.flat else len(layer.in_shape)
    return max(1, math.prod(meta.shape[:-features]))


def inline_ndlinear(gm: fx.GraphModule, *, optimizer: str = "auto") -> PassResult:
    """Replace ``call_module`` NdLinear nodes by their planned contraction.

    Each layer is planned for the rows it sees in the shape-propagated graph (if
    available). Inlined layers are recorded in ``gm.meta[INLINED_LAYERS]``.

    Args:
        gm: A traced graph module (modified in place).
        optimizer: Planner optimizer for the inlined layers.

    Returns:
        ``PassResult(gm, modified)``; unmodified when there is no NdLinear call.
    """
    modified = False
    converted: dict[str, NdLinear] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not (isinstance(module, NdLinear) or is_reference_ndlinear(module)):
            continue
        layer = converted.get(node.target)
        if layer is None:
            params = sum(p.numel() for p in module.parameters())
            if isinstance(module, NdLinear):
                layer, kind = module, "NdLinear"
            else:
                layer, kind = NdLinear.from_reference(module), "ndlinear.NdLinear"
                set_submodule(gm, node.target, layer)
            rows = _rows(node, layer)
            layer.replan(optimizer=optimizer, plan_batch=rows)
            converted[node.target] = layer
            gm.meta.setdefault(INLINED_LAYERS, []).append(
                InlinedLayer(node.target, kind, params, rows)
            )
        replace_call(gm, node, node.target, layer, flat_input=layer.flat)
        modified = True
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
