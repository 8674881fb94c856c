"""CP-ALS with line search: the rank-R fits of rearranged weights with N >= 3 modes.

For N >= 3 the rearranged weight (:func:`~ndcompile.compress.kronecker_dense.rearrange`)
is an N-way tensor and a rank-R Kronecker sum a rank-R CP tensor; :func:`cp_als` fits
one by alternating least squares, initialised from the leading singular vectors of
each unfolding. Used by :func:`~ndcompile.compress.kronecker.nearest_kronecker`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ndcompile.compress.truncated import truncated_svd, use_truncated

__all__ = ["cp_als"]


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


def cp_als(t: Tensor, rank: int, n_iter: int, tol: float) -> tuple[list[Tensor], float]:
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
