"""NdLinear layers from hybrid choices, for ``convert(mode="factorize", budget=...)``.

:func:`hybrid_layer` builds the ``NdLinear(rank=R, lowrank=k)`` that holds a
:class:`~ndcompile.compress.hybrid_choice.HybridChoice`; :func:`budget_layer` chooses
the form of one Linear site at a budget
(:func:`~ndcompile.compress.hybrid.choose_form`), builds it and fills the site's
report entry.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ndcompile.compress.hybrid import choose_form
from ndcompile.compress.hybrid_choice import HybridChoice
from ndcompile.frontend.sites import LinearSite
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.report import LayerReport

__all__ = ["budget_layer", "hybrid_layer"]


def hybrid_layer(choice: HybridChoice, bias: Tensor | None, *, optimizer: str = "auto") -> NdLinear:
    """The ``NdLinear(rank=R, lowrank=k)`` holding ``choice`` (and a copy of ``bias``).

    Args:
        choice: From :func:`~ndcompile.compress.hybrid.choose_form`.
        bias: Full bias ``(prod h,)`` to copy, or None for a layer without bias.
        optimizer: Planner optimizer of the layer.

    Returns:
        The layer, in the factors' dtype and device.
    """
    ref = choice.factors[0]
    layer = NdLinear(
        choice.in_shape,
        choice.out_shape,
        rank=choice.rank,
        bias=bias is not None,
        lowrank=choice.lowrank,
        optimizer=optimizer,
        device=ref.device,
        dtype=ref.dtype,
    )
    with torch.no_grad():
        for f, src in zip(layer.factors, choice.factors, strict=True):
            f.copy_(src)
        if layer.lowrank_u is not None and layer.lowrank_v is not None:
            assert choice.lowrank_u is not None and choice.lowrank_v is not None
            layer.lowrank_u.copy_(choice.lowrank_u)
            layer.lowrank_v.copy_(choice.lowrank_v)
        if layer.bias is not None and bias is not None:
            layer.bias.copy_(bias.detach())
    return layer


def budget_layer(
    site: LinearSite,
    entry: LayerReport,
    *,
    budget: float,
    optimizer: str,
    x: Tensor | None = None,
    gram: Tensor | None = None,
) -> NdLinear:
    """Choose the best form of site ``site`` at ``budget`` and build it, filling ``entry``.

    The counterpart of :func:`ndcompile.compress.layer_fits.factorized_layer` for
    ``convert(mode="factorize", budget=...)``.

    Args:
        site: A convertible Linear site.
        entry: Its report entry; ``weight_rel_error``, ``output_rel_error`` and
            ``extra`` (``chosen_form``, ``kronecker_error``,
            ``lowrank_error_equal_params``, ``hybrid_errors``, ``lowrank``,
            ``budget``, ``error_metric``) are written.
        budget: Fraction of the dense weight's parameters.
        optimizer: Planner optimizer of the new layer.
        x: The layer's input on the example (for the output error).
        gram: Input Gram matrix from calibration data (activation-aware choice).

    Returns:
        The layer (bias copied exactly).
    """
    assert site.in_shape is not None and site.out_shape is not None
    w = site.module.weight.detach()
    choice = choose_form(
        w, site.in_shape, site.out_shape, budget=budget, gram=gram, layer=site.name
    )
    layer = hybrid_layer(choice, site.module.bias, optimizer=optimizer)
    entry.weight_rel_error = float(choice.weight_error)
    if gram is not None:
        entry.output_rel_error = float(choice.error)
        entry.extra["output_error_source"] = "calibration"
    elif x is not None:
        xf = x.reshape(-1, w.shape[1]).double()
        ref = xf @ w.double().T
        got = xf @ choice.dense_weight().detach().double().T
        entry.output_rel_error = float((ref - got).norm() / ref.norm().clamp_min(1e-300))
        entry.extra["output_error_source"] = "example"
    kron = choice.candidate("kronecker")
    low = choice.candidate("lowrank")
    entry.extra.update(
        {
            "method": "budget",
            "budget": budget,
            "chosen_form": choice.form,
            "lowrank": choice.lowrank,
            "error_metric": choice.metric,
            "kronecker_error": None if kron is None else kron.error,
            "lowrank_error_equal_params": None if low is None else low.error,
            "hybrid_errors": {c.label: c.error for c in choice.candidates if c.form == "hybrid"},
        }
    )
    return layer
