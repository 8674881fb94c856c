"""Factorized NdLinear layers for ``convert(mode="factorize")``, with measured errors.

For each Linear site this module fits the nearest rank-R Kronecker sum (plain, or
activation-aware when calibration data is given), builds the NdLinear, and fills
the layer's report entry with the weight error, the output error on real
activations and, for comparison, the output error of a plain low-rank (SVD)
layer with the same number of parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ndcompile.compress.calibrated import (
    accumulate_gram,
    nearest_kronecker_calibrated,
    output_rel_error,
)
from ndcompile.compress.kronecker import (
    KroneckerFit,
    kron_dense,
    kronecker_params,
    nearest_kronecker,
    rank_for_tolerance,
)
from ndcompile.compress.truncated import truncated_svd
from ndcompile.errors import NdCompileError
from ndcompile.frontend.inputs import example_inputs
from ndcompile.frontend.sites import LinearSite
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.report import LayerReport

__all__ = ["capture_grams", "capture_inputs", "factorized_layer", "lowrank_output_error"]


def capture_inputs(gm: nn.Module, names: Iterable[str], inputs: Any) -> dict[str, Tensor]:
    """First input each named module sees when ``gm`` runs on ``inputs``.

    ``inputs`` is an example call (tensor, tuple, dict or ``(args, kwargs)``).
    """
    captured: dict[str, Tensor] = {}

    def make_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(_mod: nn.Module, args: tuple) -> None:
            captured.setdefault(name, args[0].detach())

        return hook

    handles = [gm.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        with torch.no_grad():
            example_inputs(inputs)(gm)
    finally:
        for h in handles:
            h.remove()
    return captured


def capture_grams(
    gm: nn.Module, names: Sequence[str], calibration: Iterable[Any]
) -> dict[str, Tensor]:
    """Input Gram matrices ``XᵀX`` (float64) of the named Linears over calibration batches.

    Memory is ``O(in_features²)`` per layer whatever the number of rows.
    """
    grams: dict[str, Tensor] = {}

    def make_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(_mod: nn.Module, args: tuple) -> None:
            gram, _ = accumulate_gram([args[0].detach()], args[0].shape[-1])
            grams[name] = gram if name not in grams else grams[name] + gram

        return hook

    handles = []
    for name in names:
        handles.append(gm.get_submodule(name).register_forward_pre_hook(make_hook(name)))
    try:
        with torch.no_grad():
            batches = 0
            for batch in calibration:
                example_inputs(batch)(gm)
                batches += 1
    finally:
        for h in handles:
            h.remove()
    if batches == 0:
        raise NdCompileError("calibration= yielded no batches", hint="pass a non-empty iterable")
    return grams


def lowrank_output_error(
    weight: Tensor, x: Tensor | None, gram: Tensor | None, params: int
) -> float | None:
    """Output error of the best low-rank (SVD) weight with at most ``params`` parameters.

    Only the leading ``k`` singular triplets are computed (a truncated SVD for large
    weights, see :func:`ndcompile.compress.truncated.truncated_svd`).
    """
    out_f, in_f = weight.shape
    k = params // (in_f + out_f)
    if k < 1:
        return None
    res = truncated_svd(weight.detach(), min(k, out_f, in_f))
    w = weight.detach().double()
    w_hat = (res.u * res.s[: res.u.shape[1]]) @ res.vh
    if gram is not None:
        return output_rel_error(w, w_hat, gram)
    if x is None:
        return None
    xf = x.reshape(-1, in_f).double()
    ref = xf @ w.T
    return float((ref - xf @ w_hat.T).norm() / ref.norm().clamp_min(1e-300))


def _fit(
    site: LinearSite, rank: int | None, tol: float | None, max_rank: int, gram: Tensor | None
) -> KroneckerFit:
    w = site.module.weight.detach()
    assert site.in_shape is not None and site.out_shape is not None
    if rank is None:
        if tol is None:
            raise NdCompileError("factorize needs rank=R or tol=t", layer=site.name)
        fit = rank_for_tolerance(
            w, site.in_shape, site.out_shape, tol, max_rank=max_rank, layer=site.name
        )
        rank = fit.rank
        if gram is None:
            return fit
    if gram is not None:
        return nearest_kronecker_calibrated(
            w, site.in_shape, site.out_shape, rank, gram, layer=site.name
        )
    return nearest_kronecker(w, site.in_shape, site.out_shape, rank, layer=site.name)


def factorized_layer(
    site: LinearSite,
    entry: LayerReport,
    *,
    rank: int | None,
    tol: float | None,
    max_rank: int,
    optimizer: str,
    x: Tensor | None = None,
    gram: Tensor | None = None,
) -> NdLinear:
    """Fit site ``site``'s weight and return the NdLinear, filling ``entry``.

    Args:
        site: A convertible Linear site.
        entry: Its report entry (errors and method are written here).
        rank: Kronecker rank, or None to pick it from ``tol``.
        tol: Relative weight error target when ``rank`` is None.
        max_rank: Upper bound of the tolerance search.
        optimizer: Planner optimizer of the new layer.
        x: The layer's input on the example (for the output error).
        gram: Input Gram matrix from calibration data (activation-aware fit).

    Returns:
        The fitted layer (bias copied exactly).
    """
    fit = _fit(site, rank, tol, max_rank, gram)
    w = site.module.weight
    assert site.in_shape is not None and site.out_shape is not None
    layer = NdLinear(
        site.in_shape,
        site.out_shape,
        rank=fit.rank,
        bias=site.module.bias is not None,
        optimizer=optimizer,
        device=w.device,
        dtype=w.dtype,
    )
    with torch.no_grad():
        for f, src in zip(layer.factors, fit.factors, strict=True):
            f.copy_(src)
        if layer.bias is not None:
            layer.bias.copy_(site.module.bias)
    entry.weight_rel_error = float(fit.rel_error)
    entry.extra["method"] = fit.method
    if fit.spectrum is not None:
        entry.extra["spectrum"] = [round(float(s), 6) for s in fit.spectrum[:32]]
    if fit.tol_met is not None:
        entry.extra["tol_met"] = bool(fit.tol_met)
    w_hat = kron_dense([f.detach() for f in layer.factors])
    if gram is not None:
        entry.output_rel_error = output_rel_error(w.detach(), w_hat, gram)
        entry.extra["output_error_source"] = "calibration"
    elif x is not None:
        xf = x.reshape(-1, w.shape[1]).double()
        ref = xf @ w.detach().double().T
        entry.output_rel_error = float(
            (ref - xf @ w_hat.double().T).norm() / ref.norm().clamp_min(1e-300)
        )
        entry.extra["output_error_source"] = "example"
    params = kronecker_params(site.in_shape, site.out_shape, fit.rank)
    entry.extra["lowrank_output_error_equal_params"] = lowrank_output_error(w, x, gram, params)
    return layer
