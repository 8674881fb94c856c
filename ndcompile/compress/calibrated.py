"""Activation-aware (calibrated) nearest Kronecker-sum factorisation.

Instead of the weight-space error ``||W - W_hat||_F`` this minimises the error of the
layer's outputs on calibration inputs ``X`` (rows are samples)::

    ||X (W - W_hat)^T||_F^2 = trace((W - W_hat) G (W - W_hat)^T),   G = X^T X

so only the Gram matrix ``G`` (in_features x in_features) is needed, accumulated
batch by batch with :func:`accumulate_gram`; memory never scales with the number of
calibration rows. The names here are also importable from :mod:`ndcompile.factorize`
(which imports this module, so helpers from it are imported inside the functions).
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ndcompile.compress.kronecker import KroneckerFit, _fit_float64, _work_device
from ndcompile.compress.kronecker_dense import kron_dense
from ndcompile.compress.kronecker_shapes import _check_rank, _check_weight
from ndcompile.errors import NdCompileError

__all__ = [
    "accumulate_gram",
    "kron_als",
    "nearest_kronecker_calibrated",
    "output_rel_error",
]


def accumulate_gram(batches: Iterable[Tensor], in_features: int) -> tuple[Tensor, int]:
    """Accumulate ``G = X^T X`` in float64 over calibration batches.

    Args:
        batches: Input activations, each of shape ``(..., in_features)``; every batch
            is reshaped to ``(-1, in_features)`` and its rows are added.
        in_features: Size of the last dimension.

    Returns:
        ``(gram, n_rows)``: the float64 Gram matrix of shape
        ``(in_features, in_features)`` (on the first batch's device; CPU zeros if there
        were no batches) and the number of rows seen.

    Raises:
        NdCompileError: If a batch's last dimension is not ``in_features``.
    """
    gram: Tensor | None = None
    rows = 0
    for x in batches:
        if x.dim() < 1 or x.shape[-1] != in_features:
            raise NdCompileError(
                f"calibration batch of shape {tuple(x.shape)} does not end in "
                f"in_features={in_features}",
                hint="feed the inputs of this linear layer, shaped (..., in_features)",
            )
        x64 = x.detach().reshape(-1, in_features).to(device=_work_device(x), dtype=torch.float64)
        gram = x64.T @ x64 if gram is None else gram + x64.T.to(gram.device) @ x64.to(gram.device)
        rows += x64.shape[0]
    if gram is None:
        gram = torch.zeros(in_features, in_features, dtype=torch.float64)
    return gram, rows


def _check_gram(gram: Tensor, in_features: int, layer: str | None) -> None:
    if not isinstance(gram, Tensor) or tuple(gram.shape) != (in_features, in_features):
        shape = tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__
        raise NdCompileError(
            f"gram must have shape ({in_features}, {in_features}) to match the weight's "
            f"in_features, got {shape}",
            layer=layer,
            hint="build it with accumulate_gram(inputs_of_this_layer, in_features)",
        )


def output_rel_error(w: Tensor, w_hat: Tensor, gram: Tensor) -> float:
    """Relative output error ``sqrt(tr(E G E^T) / tr(W G W^T))`` with ``E = W - W_hat``.

    Equals ``||X (W - W_hat)^T||_F / ||X W^T||_F`` for ``G = X^T X``.

    Args:
        w: Dense weight ``(out_features, in_features)``.
        w_hat: Approximation of the same shape.
        gram: ``X^T X`` of shape ``(in_features, in_features)``.

    Returns:
        The relative error (0.0 if both traces vanish, ``inf`` if only the denominator does).

    Raises:
        NdCompileError: On mismatched shapes.
    """
    if w.shape != w_hat.shape or w.dim() != 2:
        raise NdCompileError(
            f"w and w_hat must be 2-D with equal shapes, got {tuple(w.shape)} and "
            f"{tuple(w_hat.shape)}",
            hint="compare a weight with its reconstruction, e.g. kron_dense(fit.factors)",
        )
    _check_gram(gram, w.shape[1], None)
    dev = _work_device(gram)
    g = gram.detach().to(device=dev, dtype=torch.float64)
    w64 = w.detach().to(device=dev, dtype=torch.float64)
    e = w64 - w_hat.detach().to(device=dev, dtype=torch.float64)
    num = float(((e @ g) * e).sum().clamp_min(0))
    den = float(((w64 @ g) * w64).sum().clamp_min(0))
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return math.sqrt(num / den)


def _mode_system(
    factors: list[Tensor], k: int, g: Tensor, wg: Tensor, letters: str
) -> tuple[Tensor, Tensor]:
    """Normal equations ``H F_k = B`` of the objective in mode ``k``.

    ``H[r, s, b, b']`` sums ``G`` against ``C_m[r, s] = F_m[r]^T F_m[s]`` over the
    other modes; ``B[r, a, b]`` contracts ``W G`` with the other modes' factors.
    """
    n = len(factors)
    r, s = letters[3 * n], letters[3 * n + 1]
    hi, di, dj = letters[:n], letters[n : 2 * n], letters[2 * n : 3 * n]
    others = [m for m in range(n) if m != k]
    cs = [torch.einsum("rab,sac->rsbc", factors[m], factors[m]) for m in others]
    spec = f"{di}{dj}," + ",".join(f"{r}{s}{di[m]}{dj[m]}" for m in others)
    h = torch.einsum(f"{spec}->{r}{s}{di[k]}{dj[k]}", g, *cs)
    spec = f"{hi}{di}," + ",".join(f"{r}{hi[m]}{di[m]}" for m in others)
    b = torch.einsum(f"{spec}->{r}{hi[k]}{di[k]}", wg, *[factors[m] for m in others])
    return h, b


def _objective_terms(h: Tensor, b: Tensor, f: Tensor) -> float:
    """``-2 <B, F> + <F, H F>`` (objective minus the constant ``tr(W G W^T)``)."""
    return float(-2 * (b * f).sum() + torch.einsum("rsbc,rab,sac->", h, f, f))


def _psd_solve(a: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``a x = rhs`` for a symmetric PSD ``a`` (Cholesky, pseudo-inverse fallback)."""
    ridge = 1e-12 * float(a.diagonal().abs().mean().clamp_min(1e-300))
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    chol, info = torch.linalg.cholesky_ex(a + ridge * eye)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.pinv(a, hermitian=True, rtol=1e-13) @ rhs


def kron_als(
    target: Tensor, factors: Sequence[Tensor], gram: Tensor, *, n_iter: int = 10, tol: float = 1e-6
) -> list[Tensor]:
    """Refine Kronecker factors to minimise ``tr((T - K) G (T - K)ᵀ)``, warm-started.

    Block-coordinate descent over the modes: each block step solves its convex
    quadratic exactly and is kept only when it lowers the objective, so the result
    is never worse than ``factors``.

    Args:
        target: Dense float64 target ``T (prod h, prod d)``.
        factors: Starting factors, factor i of shape ``(R, h_i, d_i)``.
        gram: ``G (prod d, prod d)`` float64.
        n_iter: Maximum sweeps over the modes.
        tol: Stop when a sweep lowers the objective by less than this fraction.

    Returns:
        The refined factors (float64).
    """
    factors = [f.detach().to(target) for f in factors]
    n = len(factors)
    if n == 1:
        return [target.unsqueeze(0).clone()] if factors[0].shape[0] == 1 else factors
    in_shape = tuple(int(f.shape[2]) for f in factors)
    out_shape = tuple(int(f.shape[1]) for f in factors)
    g_t = gram.reshape(*in_shape, *in_shape)
    wg = (target @ gram).reshape(*out_shape, *in_shape)
    const = float((wg.reshape(target.shape) * target).sum())
    prev = math.inf
    for _ in range(max(n_iter, 1)):
        obj = math.inf
        for k in range(n):
            h, b = _mode_system(factors, k, g_t, wg, string.ascii_letters)
            rk, hk, dk = factors[k].shape
            hmat = h.permute(0, 2, 1, 3).reshape(rk * dk, rk * dk)
            rhs = b.permute(0, 2, 1).reshape(rk * dk, hk)
            new = _psd_solve(hmat, rhs).reshape(rk, dk, hk).permute(0, 2, 1)
            old_obj, new_obj = _objective_terms(h, b, factors[k]), _objective_terms(h, b, new)
            if new_obj < old_obj:
                factors[k] = new.contiguous()
            obj = min(old_obj, new_obj)
        factors = _rebalance(factors)
        obj += const
        if obj <= 0 or prev - obj < tol * abs(prev):
            break
        prev = obj
    return factors


def nearest_kronecker_calibrated(
    w: Tensor,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    rank: int,
    gram: Tensor,
    *,
    n_iter: int = 30,
    tol: float = 1e-10,
    damping: float = 0.0,
    layer: str | None = None,
) -> KroneckerFit:
    """Fit a rank-R Kronecker sum minimising the output error on calibration data.

    Minimises ``trace((W - W_hat) G (W - W_hat)^T)`` by block-coordinate descent on
    the factors: with all modes but one fixed the objective is a convex quadratic in
    that mode's factor, whose normal equations (one ``(R*d_i) x (R*d_i)`` system with
    ``h_i`` right-hand sides) are solved with a pseudo-inverse. Starts from the plain
    :func:`~ndcompile.compress.kronecker.nearest_kronecker` fit (a truncated SVD of the
    weight in its own precision for large two-mode layers). Every block step is an exact
    minimisation and is rejected if round-off made it worse, so the objective is
    monotone non-increasing and never exceeds the plain fit's; like any ALS it may
    stop at a local optimum. Stops when the relative objective decrease over a sweep
    is below ``tol`` or after ``n_iter`` sweeps. Work per sweep is about
    ``R^2 * in_features^2``.

    A rank-deficient ``G`` (fewer calibration rows than in_features, or
    low-dimensional inputs) leaves directions the objective does not see, and the
    weight-space error may grow there; ``damping > 0`` fits against
    ``G + damping * mean(diag(G)) * I`` (as GPTQ does) to keep it in check.

    Args:
        w: Dense weight of shape ``(prod(out_shape), prod(in_shape))``.
        in_shape: Input mode sizes (d1..dN).
        out_shape: Output mode sizes (h1..hN).
        rank: Number of Kronecker terms R.
        gram: ``X^T X`` of the layer inputs, shape ``(prod(in_shape), prod(in_shape))``.
        n_iter: Maximum sweeps over the modes.
        tol: Stopping threshold on the relative objective decrease per sweep.
        damping: Relative ridge added to ``G`` for the fit (``out_rel_error`` is
            still reported on the undamped ``G``).
        layer: Layer name used in error messages.

    Returns:
        A :class:`~ndcompile.compress.kronecker.KroneckerFit` (method ``"calibrated_als"``) with
        ``rel_error`` in weight space and ``out_rel_error`` in output space.

    Raises:
        NdCompileError: On mismatched shapes, an invalid rank or a wrongly shaped gram.
    """
    _check_weight(w, in_shape, out_shape, layer)
    _check_rank(rank, in_shape, out_shape, layer)
    _check_gram(gram, w.shape[1], layer)
    if not damping >= 0:
        raise NdCompileError(
            f"damping must be >= 0, got {damping!r} (weight {tuple(w.shape)})",
            layer=layer,
            hint="use 0 for the plain objective or a small value such as 0.01",
        )
    dev = _work_device(w)
    w64 = w.detach().to(device=dev, dtype=torch.float64)
    g = gram.detach().to(device=dev, dtype=torch.float64)
    g = (g + g.T) / 2
    g_fit = g + damping * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype, device=dev)
    # The plain start fits the weight in its own precision (float32 iteration for large
    # float32 layers, see ndcompile.compress.truncated); its factors come back in float64.
    plain = _fit_float64(w, in_shape, out_shape, rank)
    plain.factors = [f.to(w64) for f in plain.factors]
    factors = list(plain.factors)
    if len(in_shape) > 1:
        factors = kron_als(w64, factors, g_fit, n_iter=n_iter, tol=tol)
    w_hat = kron_dense(factors)
    # Round-off safety net: never return a fit worse than the start on the objective.
    if output_rel_error(w64, w_hat, g_fit) > output_rel_error(
        w64, kron_dense(plain.factors), g_fit
    ):
        factors, w_hat = list(plain.factors), kron_dense(plain.factors)
    out_err = output_rel_error(w64, w_hat, g)
    norm_w = torch.linalg.vector_norm(w64)
    rel = float(torch.linalg.vector_norm(w64 - w_hat) / norm_w) if norm_w > 0 else 0.0
    out = [f.to(device=w.device, dtype=w.dtype).contiguous() for f in factors]
    return KroneckerFit(out, rel, None, "calibrated_als", out_rel_error=out_err)


def _rebalance(factors: list[Tensor]) -> list[Tensor]:
    """Give every mode of each Kronecker term the same Frobenius norm (W_hat unchanged)."""
    norms = [torch.linalg.vector_norm(f, dim=(1, 2)) for f in factors]
    target = torch.stack(norms).prod(0) ** (1.0 / len(factors))
    scale = [torch.where(v > 0, target / v, torch.zeros_like(v)) for v in norms]
    return [f * c[:, None, None] for f, c in zip(factors, scale, strict=True)]
