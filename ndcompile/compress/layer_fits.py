"""Factorized NdLinear layers for ``convert(mode="factorize")``, with measured errors.

For each Linear site this module fits the nearest rank-R Kronecker sum (plain, or
activation-aware when calibration data is given), builds the NdLinear, and fills
the layer's report entry with the weight error, the output error on real
activations and, for comparison, the output error of a plain low-rank (SVD)
layer with the same number of parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ndcompile.compress.calibrated import (
    accumulate_gram,
    nearest_kronecker_calibrated,
    output_rel_error,
)
from ndcompile.compress.kronecker import KroneckerFit, nearest_kronecker, rank_for_tolerance
from ndcompile.compress.kronecker_dense import kron_dense
from ndcompile.compress.kronecker_shapes import kronecker_params
from ndcompile.compress.truncated import truncated_svd
from ndcompile.errors import NdCompileError
from ndcompile.frontend.inputs import example_inputs
from ndcompile.frontend.sites import LinearSite
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.report import LayerReport

__all__ = [
    "capture_grams",
    "capture_inputs",
    "example_output_error",
    "factorized_layer",
    "lowrank_output_error",
]


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
    if gram is None and x is None:
        return None
    res = truncated_svd(weight.detach(), min(k, out_f, in_f))
    us = res.u * res.s[: res.u.shape[1]]
    if gram is not None:
        return output_rel_error(weight.detach().double(), us @ res.vh, gram)
    assert x is not None
    xf = x.reshape(-1, in_f).double()
    return example_output_error(weight, xf, (xf @ res.vh.T.to(xf)) @ us.T.to(xf))


#: Output features per chunk of :func:`example_output_error` (bounds its float64 copies).
ERROR_CHUNK = 4096


def example_output_error(weight: Tensor, xf: Tensor, estimate: Tensor) -> float:
    """``||xf Wᵀ - estimate|| / ||xf Wᵀ||`` in float64, ``W`` read in output-row chunks.

    Args:
        weight: The dense weight ``(out_features, in_features)`` (any float dtype).
        xf: The layer's example input rows, float64 ``(rows, in_features)``.
        estimate: The approximation's output on ``xf``, ``(rows, out_features)``.

    Returns:
        The relative error (0.0 when both outputs vanish).
    """
    err = ref = 0.0
    w = weight.detach()
    for i in range(0, w.shape[0], ERROR_CHUNK):
        exact = xf @ w[i : i + ERROR_CHUNK].to(torch.float64).T
        err += float((exact - estimate[:, i : i + ERROR_CHUNK].double()).pow(2).sum())
        ref += float(exact.pow(2).sum())
    return (err / ref) ** 0.5 if ref > 0 else (0.0 if err == 0 else float("inf"))


def _bias(site: LinearSite, like: Tensor) -> Tensor | float:
    bias = site.module.bias
    return 0.0 if bias is None else bias.detach().to(like)


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
    if gram is not None:
        w_hat = kron_dense([f.detach() for f in layer.factors])
        entry.output_rel_error = output_rel_error(w.detach(), w_hat, gram)
        entry.extra["output_error_source"] = "calibration"
    elif x is not None:
        xf = x.reshape(-1, w.shape[1]).double()
        with torch.no_grad():
            probe = copy.deepcopy(layer).double()
            estimate = probe(xf.reshape(-1, *site.in_shape)).reshape(xf.shape[0], -1)
            estimate = estimate - _bias(site, xf)
        entry.output_rel_error = example_output_error(w, xf, estimate)
        entry.extra["output_error_source"] = "example"
    params = kronecker_params(site.in_shape, site.out_shape, fit.rank)
    entry.extra["lowrank_output_error_equal_params"] = lowrank_output_error(w, x, gram, params)
    return layer
