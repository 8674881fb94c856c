"""Nearest Kronecker-sum factorisation of dense weights for NdLinear layers.

An NdLinear weight with input mode shape ``in_shape = (d1, ..., dN)``, output mode
shape ``out_shape = (h1, ..., hN)`` and rank ``R`` is stored as ``N`` factor tensors,
factor ``i`` of shape ``(R, h_i, d_i)``. The equivalent dense weight (laid out like
``nn.Linear.weight``, acting on the row-major flattened input) is::

    W = sum_r kron(F1[r], kron(F2[r], ..., FN[r]))      # shape (prod(h), prod(d))

The Van Loan–Pitsianis rearrangement (:func:`rearrange`) maps ``W`` to an N-way
tensor of shape ``(h1*d1, ..., hN*dN)`` in which a rank-R Kronecker sum becomes a
rank-R CP tensor (a rank-R matrix for N = 2). :func:`nearest_kronecker` therefore
uses a truncated SVD for N = 2 (optimal in Frobenius norm, Eckart–Young) and CP-ALS
for N >= 3 (monotone non-increasing in error, but not guaranteed globally optimal).
Large layers need only the leading singular triplets of the rearranged matrix; they
come from :func:`ndcompile.compress.truncated.truncated_svd` (randomised block Krylov
in float32, float64 Rayleigh–Ritz and errors) instead of a full float64 SVD.

The activation-aware variant (:func:`nearest_kronecker_calibrated`,
:func:`accumulate_gram`, :func:`output_rel_error`) lives in
:mod:`ndcompile.compress.calibrated`, which builds on this module (never the reverse).
"""

from __future__ import annotations

import functools
import math
import string
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from ndcompile.compress.truncated import truncated_svd, use_truncated
from ndcompile.errors import NdCompileError

__all__ = [
    "KroneckerFit",
    "dense_params",
    "kron_dense",
    "kronecker_params",
    "nearest_kronecker",
    "plan_mode_shapes",
    "rank_for_tolerance",
    "rearrange",
    "unrearrange",
]

_LETTERS = string.ascii_letters


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


def _check_modes(in_shape: Sequence[int], out_shape: Sequence[int], layer: str | None) -> None:
    ok = len(in_shape) == len(out_shape) >= 1 and all(
        isinstance(s, int) and s >= 1 for s in (*in_shape, *out_shape)
    )
    if not ok:
        raise NdCompileError(
            f"invalid mode shapes in_shape={tuple(in_shape)}, out_shape={tuple(out_shape)}: "
            "they must be non-empty tuples of positive ints of equal length",
            layer=layer,
            hint="pass one input and one output size per mode, e.g. (24, 32) and (48, 64)",
        )


def _check_weight(
    w: Tensor, in_shape: Sequence[int], out_shape: Sequence[int], layer: str | None
) -> None:
    _check_modes(in_shape, out_shape, layer)
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise NdCompileError(
            f"weight must be a 2-D floating-point tensor (out_features, in_features), got {shape}",
            layer=layer,
            hint="pass the nn.Linear weight, e.g. layer.weight.detach()",
        )
    if math.prod(out_shape) != w.shape[0] or math.prod(in_shape) != w.shape[1]:
        raise NdCompileError(
            f"mode shapes do not match weight of shape {tuple(w.shape)}: prod(out_shape="
            f"{tuple(out_shape)})={math.prod(out_shape)} must equal {w.shape[0]} and "
            f"prod(in_shape={tuple(in_shape)})={math.prod(in_shape)} must equal {w.shape[1]}",
            layer=layer,
            hint="choose mode shapes whose products are out_features and in_features "
            "(see plan_mode_shapes)",
        )


def _max_rank(in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """Largest rank worth asking for: min(n) for N = 2, prod(n)/max(n) in general."""
    n = [h * d for h, d in zip(out_shape, in_shape, strict=True)]
    return math.prod(n) // max(n)


def _check_rank(
    rank: int, in_shape: Sequence[int], out_shape: Sequence[int], layer: str | None
) -> None:
    top = _max_rank(in_shape, out_shape)
    if not isinstance(rank, int) or rank < 1 or rank > top:
        raise NdCompileError(
            f"rank={rank} is invalid for in_shape={tuple(in_shape)}, "
            f"out_shape={tuple(out_shape)}: it must be between 1 and {top}",
            layer=layer,
            hint=f"use a rank in [1, {top}]; rank {top} already represents any weight exactly",
        )


def _work_device(t: Tensor) -> torch.device:
    # MPS has no float64; do the maths on the CPU there.
    return torch.device("cpu") if t.device.type == "mps" else t.device


def kron_dense(factors: Sequence[Tensor]) -> Tensor:
    """Build the dense weight ``sum_r kron(F1[r], ..., FN[r])`` from NdLinear factors.

    Args:
        factors: N tensors, factor i of shape ``(R, h_i, d_i)``, same R, dtype, device.

    Returns:
        Tensor of shape ``(prod(h), prod(d))``.

    Raises:
        NdCompileError: If there are no factors or their shapes are inconsistent.
    """
    shapes = [tuple(f.shape) for f in factors]
    if not shapes or any(len(s) != 3 or s[0] != shapes[0][0] for s in shapes):
        raise NdCompileError(
            f"factors must be a non-empty list of 3-D tensors (R, h_i, d_i) with a common R, "
            f"got shapes {shapes}",
            hint="pass the factors of one NdLinear layer, e.g. KroneckerFit.factors",
        )
    acc = factors[0]
    for i, f in enumerate(factors[1:], start=2):
        r, a, c = acc.shape
        _, b, d = f.shape
        if i == len(factors):  # last step: contract r to avoid an (R, H, D) intermediate
            return torch.einsum("rac,rbd->abcd", acc, f).reshape(a * b, c * d)
        acc = torch.einsum("rac,rbd->rabcd", acc, f).reshape(r, a * b, c * d)
    return acc.sum(0)


@functools.lru_cache(maxsize=1024)
def plan_mode_shapes(n: int, modes: int) -> tuple[int, ...] | None:
    """Split ``n`` into ``modes`` integer factors (each >= 2) as balanced as possible.

    Balance is measured by the ratio max/min; the result is sorted ascending and
    among equally balanced splits the lexicographically smallest is returned.

    Args:
        n: The number to split (e.g. in_features).
        modes: Number of factors.

    Returns:
        The factors, e.g. ``plan_mode_shapes(768, 2) == (24, 32)``, or ``None`` if no
        split without a factor of 1 exists (prime ``n`` for ``modes >= 2``, too small ``n``).

    Raises:
        NdCompileError: If ``n`` or ``modes`` is not a positive int.
    """
    if not isinstance(n, int) or not isinstance(modes, int) or n < 1 or modes < 1:
        raise NdCompileError(
            f"plan_mode_shapes needs positive ints, got n={n!r}, modes={modes!r}",
            hint="pass the feature count and the number of modes, e.g. (768, 2)",
        )
    best: tuple[Fraction, tuple[int, ...]] | None = None

    def search(rest: int, left: int, lo: int, prefix: tuple[int, ...]) -> None:
        nonlocal best
        if left == 1:
            if rest >= lo:
                cand = (*prefix, rest)
                key = (Fraction(cand[-1], cand[0]), cand)
                if best is None or key < best:
                    best = key
            return
        f = lo
        while f**left <= rest:
            if rest % f == 0:
                search(rest // f, left - 1, f, (*prefix, f))
            f += 1

    search(n, modes, 2, ())
    return None if best is None else best[1]


def rearrange(w: Tensor, in_shape: Sequence[int], out_shape: Sequence[int]) -> Tensor:
    """Van Loan–Pitsianis rearrangement of a dense weight into an N-way tensor.

    ``W`` (prod h, prod d) is viewed as (h1..hN, d1..dN), permuted to
    (h1, d1, ..., hN, dN) and reshaped to (h1*d1, ..., hN*dN). A rank-R Kronecker sum
    becomes a rank-R CP tensor whose mode-i vectors are the flattened ``F_i[r]``.

    Args:
        w: Dense weight of shape ``(prod(out_shape), prod(in_shape))``.
        in_shape: Input mode sizes (d1..dN).
        out_shape: Output mode sizes (h1..hN).

    Returns:
        Tensor of shape ``(h1*d1, ..., hN*dN)``.

    Raises:
        NdCompileError: If the shapes do not match ``w``.
    """
    _check_weight(w, in_shape, out_shape, None)
    n = len(in_shape)
    perm = [x for i in range(n) for x in (i, n + i)]
    t = w.reshape(*out_shape, *in_shape).permute(perm)
    return t.reshape([h * d for h, d in zip(out_shape, in_shape, strict=True)])


def unrearrange(t: Tensor, in_shape: Sequence[int], out_shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`rearrange`: N-way tensor (h1*d1, ..., hN*dN) -> dense weight.

    Args:
        t: Tensor with ``prod(h) * prod(d)`` elements laid out as (h1*d1, ..., hN*dN).
        in_shape: Input mode sizes (d1..dN).
        out_shape: Output mode sizes (h1..hN).

    Returns:
        Dense weight of shape ``(prod(out_shape), prod(in_shape))``.

    Raises:
        NdCompileError: If the shapes do not match ``t``.
    """
    _check_modes(in_shape, out_shape, None)
    expect = tuple(h * d for h, d in zip(out_shape, in_shape, strict=True))
    if tuple(t.shape) != expect:
        raise NdCompileError(
            f"rearranged tensor has shape {tuple(t.shape)} but in_shape={tuple(in_shape)}, "
            f"out_shape={tuple(out_shape)} need {expect}",
            hint="pass the same mode shapes that were given to rearrange",
        )
    n = len(in_shape)
    t = t.reshape([s for h, d in zip(out_shape, in_shape, strict=True) for s in (h, d)])
    t = t.permute([2 * i for i in range(n)] + [2 * i + 1 for i in range(n)])
    return t.reshape(math.prod(out_shape), math.prod(in_shape))


def kronecker_params(in_shape: Sequence[int], out_shape: Sequence[int], rank: int) -> int:
    """Parameter count of a rank-R Kronecker sum: ``rank * sum(h_i * d_i)``."""
    _check_modes(in_shape, out_shape, None)
    return rank * sum(h * d for h, d in zip(out_shape, in_shape, strict=True))


def dense_params(in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """Parameter count of the dense weight: ``prod(h) * prod(d)``."""
    _check_modes(in_shape, out_shape, None)
    return math.prod(out_shape) * math.prod(in_shape)


def _hosvd_init(t: Tensor, k: int, rank: int, gen: torch.Generator) -> Tensor:
    """Leading ``rank`` left singular vectors of the mode-k unfolding (random if short).

    Large unfoldings take a truncated SVD (only ``rank`` vectors are needed); small
    ones the eigenvectors of the unfolding's Gram matrix.
    """
    unfolding = t.movedim(k, 0).reshape(t.shape[k], -1)
    if use_truncated((unfolding.shape[0], unfolding.shape[1]), rank):
        res = truncated_svd(unfolding, rank, method="randomized", rtol=1e-6, max_passes=20)
        return res.u.to(t.dtype)
    others = [m for m in range(t.dim()) if m != k]
    gram = torch.tensordot(t, t, dims=(others, others))
    _, vecs = torch.linalg.eigh(gram)
    a = vecs.flip(1)[:, :rank]
    if a.shape[1] < rank:
        extra = torch.randn(t.shape[k], rank - a.shape[1], generator=gen, dtype=t.dtype)
        extra = extra.to(t.device)
        a = torch.cat([a, extra / torch.linalg.vector_norm(extra, dim=0)], dim=1)
    return a


def _balance(mats: list[Tensor]) -> list[Tensor]:
    """Rescale columns so that every mode of each rank-1 term has the same norm."""
    norms = [torch.linalg.vector_norm(m, dim=0) for m in mats]
    lam = torch.stack(norms).prod(0)
    target = lam ** (1.0 / len(mats))
    return [
        m * torch.where(v > 0, target / v, torch.zeros_like(v))
        for m, v in zip(mats, norms, strict=True)
    ]


def _cp_als(t: Tensor, rank: int, n_iter: int, tol: float) -> tuple[list[Tensor], float]:
    """CP-ALS with line search on ``t``; returns balanced factor matrices and the error.

    Each sweep solves the exact least-squares problem for one mode at a time (so the
    error never increases), then rebalances column norms across modes. After each
    sweep an extrapolated point ``A + s (A - A_prev)`` is tried and kept only if it
    lowers the error (Bro's line search, which shortens ALS "swamps").
    """
    n = t.dim()
    norm_t = torch.linalg.vector_norm(t)
    if norm_t == 0:
        return [t.new_zeros(t.shape[k], rank) for k in range(n)], 0.0
    gen = torch.Generator().manual_seed(0)
    mats = [_hosvd_init(t, k, rank, gen) for k in range(n)]
    # Mode-k unfoldings, computed once: (n_k, prod of the other modes in order).
    unfold = [t.movedim(k, 0).reshape(t.shape[k], -1) for k in range(n)]

    def khatri_rao(ms: list[Tensor]) -> Tensor:
        out = ms[0]
        for m in ms[1:]:
            out = (out[:, None, :] * m[None, :, :]).reshape(-1, rank)
        return out

    def error(ms: list[Tensor]) -> float:
        rebuilt = ms[0] @ khatri_rao(ms[1:]).T
        return float(torch.linalg.vector_norm(unfold[0] - rebuilt) / norm_t)

    prev_mats, prev = None, math.inf
    for it in range(1, max(n_iter, 1) + 1):
        for k in range(n):
            others = [m for m in range(n) if m != k]
            v = t.new_ones(rank, rank)
            for m in others:
                v = v * (mats[m].T @ mats[m])
            a = unfold[k] @ khatri_rao([mats[m] for m in others])  # MTTKRP as one matmul
            mats[k] = a @ torch.linalg.pinv(v, hermitian=True)
        mats = _balance(mats)
        err = error(mats)
        if prev_mats is not None:
            step = it ** (1.0 / 3.0)
            trial = _balance([a + step * (a - b) for a, b in zip(mats, prev_mats, strict=True)])
            trial_err = error(trial)
            if trial_err < err:
                mats, err = trial, trial_err
        # Stop on a small relative decrease, or at round-off level.
        if err < 1e-15 or prev - err < tol * prev:
            break
        prev_mats, prev = [m.clone() for m in mats], err
    return mats, err


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
    mats, err = _cp_als(rearrange(w64, in_shape, out_shape), rank, n_iter, tol)
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
