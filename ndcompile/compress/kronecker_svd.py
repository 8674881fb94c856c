"""Two-mode Kronecker fits from the leading singular triplets of the rearranged matrix.

For N = 2 the best rank-R Kronecker sum is the rank-R truncated SVD of the
Van Loan–Pitsianis rearrangement (:func:`ndcompile.compress.kronecker_dense.rearrange`).
Only its top R triplets are needed; :func:`ndcompile.compress.truncated.truncated_svd`
finds them (a full SVD for small layers) and the errors follow from the spectrum,
measured directly where the energy formula would cancel. Used by
:func:`~ndcompile.compress.kronecker.nearest_kronecker` and
:func:`~ndcompile.compress.kronecker.rank_for_tolerance`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ndcompile.compress.kronecker import KroneckerFit, _work_device
from ndcompile.compress.kronecker_dense import rearrange
from ndcompile.compress.truncated import (
    TruncatedSVD,
    residual_sq_norm,
    sq_norm,
    truncated_svd,
    use_truncated,
)

__all__ = ["fit_two_modes", "tolerance_two_modes"]


def _svd_factors(
    u: Tensor, s: Tensor, vh: Tensor, rank: int, in_shape: Sequence[int], out_shape: Sequence[int]
) -> list[Tensor]:
    """NdLinear factors of the rank-``rank`` truncation ``u diag(s) vh`` (split evenly)."""
    root = s[:rank].sqrt()
    f1 = (u[:, :rank] * root).T.reshape(rank, out_shape[0], in_shape[0])
    f2 = (vh[:rank] * root[:, None]).reshape(rank, out_shape[1], in_shape[1])
    return [f1, f2]


def _rearranged(w: Tensor, in_shape: Sequence[int], out_shape: Sequence[int]) -> Tensor:
    """The rearranged matrix in its working precision (float64 stays, else float32).

    One contiguous copy of the weight; no float64 copy for narrower weights.
    """
    w = w.detach().to(_work_device(w))
    t = rearrange(w, in_shape, out_shape).contiguous()
    return t if t.dtype in (torch.float64, torch.float32) else t.to(torch.float32)


def _fit_error(a: Tensor, res: TruncatedSVD, rank: int) -> float:
    """Relative error of the rank-``rank`` truncation, in float64.

    Read from the spectrum; when that is small enough for the energy formula to
    cancel (below 1e-3) and the spectrum is not complete, the residual is measured.
    """
    if res.total <= 0:
        return 0.0
    if res.method == "full":
        s = res.s
        return float(torch.linalg.vector_norm(s[rank:]) / torch.linalg.vector_norm(s))
    err = res.rel_errors()[rank - 1]
    if err < 1e-3:
        resid = residual_sq_norm(a, res.u[:, :rank], res.s[:rank], res.vh[:rank])
        err = math.sqrt(max(resid, 0.0) / res.total)
    return err


def _errors(res: TruncatedSVD) -> list[float]:
    if res.method == "full" and res.total > 0:
        tail = res.s.pow(2).flip(0).cumsum(0).flip(0).sqrt() / math.sqrt(res.total)
        return [*tail[1:].tolist(), 0.0]
    return res.rel_errors()


def fit_two_modes(
    w: Tensor, in_shape: Sequence[int], out_shape: Sequence[int], rank: int
) -> KroneckerFit:
    """Rank-``rank`` fit for N = 2 with float64 factors on the working device."""
    a = _rearranged(w, in_shape, out_shape)
    res = truncated_svd(a, rank)
    factors = _svd_factors(res.u, res.s, res.vh, rank, in_shape, out_shape)
    method = "svd" if res.method == "full" else "truncated_svd"
    errors = _errors(res)
    return KroneckerFit(factors, _fit_error(a, res, rank), res.s.tolist(), method, errors=errors)


def tolerance_two_modes(
    w: Tensor, in_shape: Sequence[int], out_shape: Sequence[int], tol: float, max_rank: int
) -> KroneckerFit:
    """Smallest rank meeting ``tol`` for N = 2 (float64 factors).

    Small problems take one full SVD. Large ones fit the leading triplets at rank
    8, 16, 32, ... (each warm-started from the last one's vectors) until the
    error read from the spectrum meets ``tol`` or ``max_rank`` is reached.
    """
    a = _rearranged(w, in_shape, out_shape)
    rank = min(max_rank, 8)
    if not use_truncated((a.shape[0], a.shape[1]), rank):
        res = truncated_svd(a, max_rank, method="full")
    else:
        total, init = sq_norm(a), None
        while True:
            res = truncated_svd(a, rank, method="randomized", init=init, total=total)
            errs = res.rel_errors()
            if rank == max_rank or min(errs) <= tol:
                break
            rank = min(2 * rank, max_rank)
            if not use_truncated((a.shape[0], a.shape[1]), rank):
                res = truncated_svd(a, max_rank, method="full", total=total)
                break
            init = res.u
    errs = _errors(res)
    top = min(max_rank, len(errs))
    rank = next((r for r in range(1, top + 1) if errs[r - 1] <= tol), top)
    err = _fit_error(a, res, rank)
    while err > tol and rank < top:  # the spectrum's estimate was too optimistic
        rank += 1
        err = _fit_error(a, res, rank)
    method = "svd" if res.method == "full" else "truncated_svd"
    factors = _svd_factors(res.u, res.s, res.vh, rank, in_shape, out_shape)
    spectrum = res.s.tolist()
    return KroneckerFit(factors, err, spectrum, method, tol_met=err <= tol, errors=errs)
