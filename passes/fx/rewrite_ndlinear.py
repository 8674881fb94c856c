"""Rewrite ``nn.Linear`` sites into NdLinear contractions emitted as FX ops.

Before (``gm.code``)::

    flatten = torch.flatten(x, 1);  x = None
    fc = self.fc(flatten);  flatten = None

After (factors live in ``self.fc``, an :class:`~ndcompile.layers.ndlinear.NdLinear`)::

    fc_factors_0 = self.fc.factors[0] ...
    reshape = flatten.reshape((-1, 32, 32, 3))
    matmul = torch.matmul(getitem, reshape.reshape((-1, 32, 96))) ...
    add = reshape_3 + fc_bias
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ndcompile.frontend.sites import LinearSite
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.passes.fx.emit import replace_call, set_submodule

__all__ = ["LayerFactory", "rewrite_ndlinear"]

#: Builds the NdLinear replacing a site (fresh init, factorized weights, ...).
LayerFactory = Callable[[LinearSite], NdLinear]


def rewrite_ndlinear(
    gm: fx.GraphModule, sites: Sequence[LinearSite], make_layer: LayerFactory
) -> PassResult:
    """Replace every convertible site by an NdLinear contraction.

    The new layer is installed under the Linear's own qualified name, so the
    converted model's ``state_dict`` reads ``fc.factors.0``, ``fc.bias``, ... A
    Linear called several times becomes one layer used at every call.

    Args:
        gm: A traced graph module (modified in place).
        sites: Sites from :func:`~ndcompile.frontend.sites.find_linear_sites`.
        make_layer: Returns the replacement layer for a site.

    Returns:
        ``PassResult(gm, modified)``.
    """
    modified = False
    for site in sites:
        if not site.convertible:
            continue
        layer = make_layer(site)
        set_submodule(gm, site.name, layer)
        for node in site.nodes:
            replace_call(gm, node, site.name, layer, flat_input=True)
            modified = True
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
