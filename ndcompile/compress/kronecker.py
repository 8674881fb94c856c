"""Nearest Kronecker-sum factorisation of dense weights for NdLinear layers.

An NdLinear weight with input mode shape ``in_shape = (d1, ..., dN)``, output mode
shape ``out_shape = (h1, ..., hN)`` and rank ``R`` is stored as ``N`` factor tensors,
factor ``i`` of shape ``(R, h_i, d_i)``; its dense form and the Van Loan–Pitsianis
rearrangement live in :mod:`ndcompile.compress.kronecker_dense`, the mode-shape checks
and parameter counts in :mod:`ndcompile.compress.kronecker_shapes`.

The rearrangement maps ``W`` to an N-way tensor of shape ``(h1*d1, ..., hN*dN)`` in
which a rank-R Kronecker sum becomes a rank-R CP tensor (a rank-R matrix for N = 2).
:func:`nearest_kronecker` therefore uses a truncated SVD for N = 2 (optimal in
Frobenius norm, Eckart–Young; :mod:`ndcompile.compress.kronecker_svd`) and CP-ALS for
N >= 3 (:mod:`ndcompile.compress.cp_als`; monotone non-increasing in error, but not
guaranteed globally optimal). Large layers need only the leading singular triplets of
the rearranged matrix; they come from :func:`ndcompile.compress.truncated.truncated_svd`
(randomised block Krylov in float32, float64 Rayleigh–Ritz and errors) instead of a full
float64 SVD.

The activation-aware variant (:func:`nearest_kronecker_calibrated`,
:func:`accumulate_gram`, :func:`output_rel_error`) lives in
:mod:`ndcompile.compress.calibrated`, which builds on this module (never the reverse).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ndcompile.compress.cp_als import cp_als
from ndcompile.compress.kronecker_dense import rearrange
from ndcompile.compress.kronecker_shapes import _check_rank, _check_weight, _max_rank
from ndcompile.errors import NdCompileError

__all__ = ["KroneckerFit", "nearest_kronecker", "rank_for_tolerance"]


@dataclass
class KroneckerFit:
    """Result of fitting a rank-R Kronecker sum to a dense weight.

    Attributes:
        factors: N tensors, factor i of shape ``(R, h_i, d_i)``, in W's dtype/device.
        rel_error: ``||W - W_hat||_F / ||W||_F`` (of the float64 fit; 0 for W = 0).
        spectrum: For N = 2, the singular values of the rearranged matrix that were
            computed (descending): all of them after a full SVD (``method="svd"``),
            the leading ones after a truncated one (``"truncated_svd"``); ``None``
            otherwise.
        method: How the fit was obtained (``"identity"``, ``"svd"``,
            ``"truncated_svd"``, ``"cp_als"``, ``"calibrated_als"``).
        tol_met: Whether a requested tolerance was met (``None`` when none was asked).
        out_rel_error: Output-space relative error ``||(W - W_hat) G^{1/2}|| /
            ||W G^{1/2}||`` for calibrated fits; ``None`` otherwise.
        errors: For N = 2, ``errors[r - 1]`` is the relative error of the best rank-r
            fit for every rank the spectrum covers; ``None`` otherwise.
    """

    factors: list[Tensor]
    rel_error: float
    spectrum: list[float] | None
    method: str
    tol_met: bool | None = None
    out_rel_error: float | None = None
    errors: list[float] | None = None

    @property
    def rank(self) -> int:
        """Number of Kronecker terms R."""
        return int(self.factors[0].shape[0])


def _work_device(t: Tensor) -> torch.device:
    # MPS has no float64; do the maths on the CPU there.
    return torch.device("cpu") if t.device.type == "mps" else t.device


def nearest_kronecker(
    w: Tensor,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    rank: int,
    *,
    n_iter: int = 50,
    tol: float = 1e-10,
    layer: str | None = None,
) -> KroneckerFit:
    """Fit a rank-R Kronecker sum (NdLinear factors) to a dense weight.

    N = 1 is trivial (the factor is ``W``; rank must be 1). N = 2 uses the
    Van Loan–Pitsianis truncated SVD of the rearranged matrix, which is optimal in
    Frobenius norm (Eckart–Young). N >= 3 runs CP-ALS on the rearranged tensor,
    initialised from the leading singular vectors of each unfolding (HOSVD), with
    per-sweep column normalisation; it stops when the relative decrease of the
    error over a sweep is below ``tol`` or after ``n_iter`` sweeps. ALS is monotone
    non-increasing in error but not guaranteed to reach the global optimum; when
    ``W`` is exactly a rank-R Kronecker sum it recovers it to round-off in practice.
    All maths runs in float64.

    Args:
        w: Dense weight of shape ``(prod(out_shape), prod(in_shape))``.
        in_shape: Input mode sizes (d1..dN).
        out_shape: Output mode sizes (h1..hN).
        rank: Number of Kronecker terms R (1 <= R <= maximal useful rank).
        n_iter: Maximum ALS sweeps (N >= 3 only).
        tol: ALS stopping threshold on the relative error decrease (N >= 3 only).
        layer: Layer name used in error messages.

    Returns:
        A :class:`KroneckerFit` with factors in ``w``'s dtype and device.

    Raises:
        NdCompileError: On mismatched shapes or an invalid rank.
    """
    _check_weight(w, in_shape, out_shape, layer)
    _check_rank(rank, in_shape, out_shape, layer)
    fit = _fit_float64(w, in_shape, out_shape, rank, n_iter=n_iter, tol=tol)
    fit.factors = [f.to(device=w.device, dtype=w.dtype).contiguous() for f in fit.factors]
    return fit


def _fit_float64(
    w: Tensor,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    rank: int,
    *,
    n_iter: int = 50,
    tol: float = 1e-10,
) -> KroneckerFit:
    """:func:`nearest_kronecker` without the checks, factors left in float64."""
    n = len(in_shape)
    if n == 2:
        from ndcompile.compress.kronecker_svd import fit_two_modes

        return fit_two_modes(w, in_shape, out_shape, rank)
    w64 = w.detach().to(device=_work_device(w), dtype=torch.float64)
    if n == 1:
        return KroneckerFit([w64.reshape(1, *w64.shape)], 0.0, None, "identity")
    mats, err = cp_als(rearrange(w64, in_shape, out_shape), rank, n_iter, tol)
    factors = [a.T.reshape(rank, h, d) for a, h, d in zip(mats, out_shape, in_shape, strict=True)]
    return KroneckerFit(factors, err, None, "cp_als")


def rank_for_tolerance(
    w: Tensor,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    tol: float,
    *,
    max_rank: int,
    n_iter: int = 50,
    layer: str | None = None,
) -> KroneckerFit:
    """Fit with the smallest rank whose relative error is at most ``tol``.

    For N = 2 the error at every rank is read from the singular spectrum
    (``sqrt(sum_{i>r} s_i^2) / ||s||``) with a single SVD. For N >= 3 ranks
    1, 2, ... are fitted in turn with CP-ALS. ``max_rank`` is clamped to the maximal
    useful rank. If no rank up to ``max_rank`` meets ``tol``, the ``max_rank`` fit is
    returned with ``tol_met=False``.

    Args:
        w: Dense weight of shape ``(prod(out_shape), prod(in_shape))``.
        in_shape: Input mode sizes (d1..dN).
        out_shape: Output mode sizes (h1..hN).
        tol: Target relative Frobenius error (>= 0).
        max_rank: Largest rank to consider (>= 1).
        n_iter: Maximum ALS sweeps per rank (N >= 3 only).
        layer: Layer name used in error messages.

    Returns:
        A :class:`KroneckerFit` with ``tol_met`` set.

    Raises:
        NdCompileError: On mismatched shapes, ``max_rank < 1`` or ``tol < 0``.
    """
    _check_weight(w, in_shape, out_shape, layer)
    if not isinstance(max_rank, int) or max_rank < 1 or not tol >= 0:
        raise NdCompileError(
            f"need max_rank >= 1 and tol >= 0, got max_rank={max_rank!r}, tol={tol!r} "
            f"(in_shape={tuple(in_shape)}, out_shape={tuple(out_shape)})",
            layer=layer,
            hint="pass e.g. tol=0.05, max_rank=8",
        )
    max_rank = min(max_rank, _max_rank(in_shape, out_shape))
    if len(in_shape) == 2:
        from ndcompile.compress.kronecker_svd import tolerance_two_modes

        two = tolerance_two_modes(w, in_shape, out_shape, tol, max_rank)
        two.factors = [f.to(device=w.device, dtype=w.dtype).contiguous() for f in two.factors]
        return two
    fit: KroneckerFit | None = None
    for rank in range(1, max_rank + 1):
        fit = nearest_kronecker(w, in_shape, out_shape, rank, n_iter=n_iter, layer=layer)
        if fit.rel_error <= tol:
            break
    assert fit is not None
    fit.tol_met = fit.rel_error <= tol
    return fit
