"""Leading singular triplets of large matrices without a full SVD.

A rank-R Kronecker or low-rank fit needs only the top ``R`` singular triplets of one
matrix, and its error follows from ``||A||_F^2 - sum_{i<=R} s_i^2``. For large
matrices :func:`truncated_svd` finds them by randomised block Krylov iteration
(Musco & Musco, 2015): a Gaussian start block ``A Ω`` is extended by
``(A Aᵀ) Q`` blocks with full re-orthogonalisation, and after every block a
Rayleigh–Ritz step on the whole Krylov space gives the current triplets. It stops
when the captured energy ``sum_{i<=R} s_i^2`` changes by less than ``rtol`` times the
remaining error energy (with an Aitken estimate of what further blocks would add),
so the fitted error is within a factor ``1 + rtol / 2`` of the optimum (or at the
round-off of the working precision); once the space fills the smaller dimension the
result is exact.

The iteration runs in float32 for float32 (and narrower) inputs; the final
Rayleigh–Ritz step, the singular values, the norm and the errors are float64 (one
float64 pass over the matrix in row chunks, plus a float64 power step when the fit
is nearly exact). Small matrices, and ranks that are a large fraction of the smaller
dimension, take the full float64 SVD instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TruncatedSVD", "residual_sq_norm", "sq_norm", "truncated_svd", "use_truncated"]

#: Smaller dimensions at or below this always take the full SVD (it costs milliseconds).
FULL_SVD_MAX_DIM = 128

#: Rows per chunk of the float64 passes (bounds their extra memory).
_CHUNK_ELEMENTS = 1 << 20


@dataclass
class TruncatedSVD:
    """Leading singular triplets ``A ≈ u diag(s) vh`` of a matrix, in float64.

    Attributes:
        u: Left vectors ``(m, k)``.
        s: Singular values ``(k,)``, descending.
        vh: Right vectors ``(k, n)``.
        total: ``||A||_F^2`` (float64).
        method: ``"full"`` (LAPACK SVD of the whole matrix) or ``"randomized"``.
        passes: Products of ``A`` or ``Aᵀ`` with a block (0 for ``"full"``).
        converged: Whether the iteration met its tolerance (always True for ``"full"``).
    """

    u: Tensor
    s: Tensor
    vh: Tensor
    total: float
    method: str
    passes: int = 0
    converged: bool = True

    def rel_errors(self) -> list[float]:
        """Relative Frobenius error of the rank-r truncation for r = 1..len(s).

        Computed as ``sqrt(max(||A||^2 - sum_{i<=r} s_i^2, 0) / ||A||^2)``, accurate to
        about ``1e-16 / err`` relative (use :func:`residual_sq_norm` for tiny errors).
        """
        if self.total <= 0:
            return [0.0] * len(self.s)
        tail = (self.total - self.s.pow(2).cumsum(0)).clamp_min(0) / self.total
        return tail.sqrt().tolist()


def use_truncated(shape: tuple[int, int], k: int) -> bool:
    """Whether :func:`truncated_svd` with ``method="auto"`` iterates for ``k`` triplets."""
    small = min(shape)
    return small > FULL_SVD_MAX_DIM and 4 * _block_size(k) <= small


def _block_size(k: int) -> int:
    return max(24, k + k // 2 + 8)


def _chunk_rows(n_cols: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(n_cols, 1))


def sq_norm(a: Tensor) -> float:
    """``||A||_F^2`` accumulated in float64 over row chunks (no float64 copy of ``a``)."""
    step = _chunk_rows(a.shape[1])
    acc = 0.0
    for i in range(0, a.shape[0], step):
        flat = a[i : i + step].to(torch.float64).reshape(-1)
        acc += float(torch.dot(flat, flat))
    return acc


def residual_sq_norm(a: Tensor, u: Tensor, s: Tensor, vh: Tensor) -> float:
    """``||A - u diag(s) vh||_F^2`` in float64, over row chunks of ``a``.

    Exact to round-off even when the error is far below ``||A||`` (where the
    energy formula cancels), at the cost of one float64 pass.
    """
    us = (u * s).to(torch.float64)
    vh = vh.to(torch.float64)
    step = _chunk_rows(a.shape[1])
    acc = 0.0
    for i in range(0, a.shape[0], step):
        block = torch.addmm(a[i : i + step].to(torch.float64), us[i : i + step], vh, alpha=-1)
        flat = block.reshape(-1)
        acc += float(torch.dot(flat, flat))
    return acc


def _orth(y: Tensor, basis: Tensor | None, gen: torch.Generator) -> Tensor:
    """Orthonormal columns spanning ``y`` minus its part in ``basis``.

    Columns that lie inside ``basis`` to round-off carry no new direction (the space
    found is invariant, e.g. for an exactly low-rank matrix); they restart from
    random vectors so that the space keeps growing. Projection and QR run twice,
    as classical Gram-Schmidt needs for orthogonality to working precision.
    """
    if basis is not None:
        before = torch.linalg.vector_norm(y, dim=0)
        y = y - basis @ (basis.T @ y)
        eps = torch.finfo(y.dtype).eps
        lost = torch.linalg.vector_norm(y, dim=0) <= 64 * eps * before
        if bool(lost.any()):
            fresh = torch.randn(
                y.shape[0], int(lost.sum()), generator=gen, dtype=y.dtype, device=y.device
            )
            y[:, lost] = fresh - basis @ (basis.T @ fresh)
    for _ in range(2):
        if basis is not None:
            y = y - basis @ (basis.T @ y)
        y = torch.linalg.qr(y).Q
    return y


def _rt_chunked(a: Tensor, q: Tensor) -> Tensor:
    """``aᵀ q`` in float64 with ``a`` converted one row chunk at a time."""
    step = _chunk_rows(a.shape[1])
    out = torch.zeros(a.shape[1], q.shape[1], dtype=torch.float64, device=a.device)
    for i in range(0, a.shape[0], step):
        out.addmm_(a[i : i + step].to(torch.float64).T, q[i : i + step])
    return out


def _r_chunked(a: Tensor, x: Tensor) -> Tensor:
    """``a x`` in float64 with ``a`` converted one row chunk at a time."""
    step = _chunk_rows(a.shape[1])
    out = torch.empty(a.shape[0], x.shape[1], dtype=torch.float64, device=a.device)
    for i in range(0, a.shape[0], step):
        torch.mm(a[i : i + step].to(torch.float64), x, out=out[i : i + step])
    return out


def _converged(
    energy: float,
    prev: float | None,
    prev_gain: float | None,
    total: float,
    rtol: float,
    noise: float,
) -> tuple[bool, float | None]:
    """Stopping test on the captured energy; returns (stop, this block's gain)."""
    if prev is None:
        return False, None
    gain = max(energy - prev, 0.0)
    remaining = gain
    if prev_gain is not None and 0 < gain < prev_gain:
        ratio = gain / prev_gain
        remaining = gain * max(1.0, ratio / (1.0 - ratio))
    elif prev_gain is not None and gain >= prev_gain > 0:
        remaining = 2 * gain  # not yet in the linear regime: be conservative
    deficit = max(total - energy, 0.0)
    # ``noise``: round-off of the energy in the working precision; gains below it are
    # not resolved.
    return remaining <= max(rtol * deficit, noise), gain


def _krylov(
    a: Tensor,
    k: int,
    total: float,
    *,
    rtol: float,
    max_passes: int,
    init: Tensor | None,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor, int, bool]:
    """Block Krylov space of ``A Aᵀ`` for ``a`` with ``m <= n``.

    Returns:
        ``(Q, Z = AᵀQ, ZᵀZ, passes, converged)``.
    """
    m, n = a.shape
    b = min(_block_size(k), m)
    omega = torch.randn(n, b, generator=gen, dtype=a.dtype, device=a.device)
    y = a @ omega
    if init is not None and init.shape[1] > 0:
        r0 = min(init.shape[1], b)
        y[:, :r0] = init[:, :r0].to(y)
    qs = [_orth(y, None, gen)]
    zs = [a.T @ qs[0]]
    gram = zs[0].T @ zs[0]  # ZᵀZ = (QᵀA)(QᵀA)ᵀ, grown block by block
    passes = 2
    eps = float(torch.finfo(a.dtype).eps)
    prev: float | None = None
    prev_gain: float | None = None
    while True:
        lam = torch.linalg.eigvalsh(gram).flip(0)
        energy = float(lam[:k].to(torch.float64).clamp_min(0).sum())
        size = gram.shape[0]
        noise = 32 * eps * k * float(lam[0].clamp_min(0))
        stop, gain = _converged(energy, prev, prev_gain, total, rtol, noise)
        if stop or size >= m or passes + 2 > max_passes:
            return torch.cat(qs, 1), torch.cat(zs, 1), gram, passes, stop or size >= m
        prev, prev_gain = energy, gain
        y = a @ zs[-1][:, : min(b, m - size)]
        qs.append(_orth(y, torch.cat(qs, 1), gen))
        z_new = a.T @ qs[-1]
        cross = torch.cat(zs, 1).T @ z_new
        gram = torch.cat([torch.cat([gram, cross], 1), torch.cat([cross.T, z_new.T @ z_new], 1)], 0)
        zs.append(z_new)
        passes += 2


def truncated_svd(
    a: Tensor,
    k: int,
    *,
    method: str = "auto",
    rtol: float | None = None,
    max_passes: int = 80,
    init: Tensor | None = None,
    seed: int = 0,
    total: float | None = None,
) -> TruncatedSVD:
    """Top ``k`` singular triplets of ``a`` (float64 results).

    Args:
        a: A 2-D floating-point matrix ``(m, n)``, left in its dtype and device (the
            iteration runs in float64 for float64 input, else in float32).
        k: Number of triplets, ``1 <= k <= min(m, n)`` (clamped).
        method: ``"auto"`` (:func:`use_truncated` decides), ``"full"`` or ``"randomized"``.
        rtol: Relative tolerance on the error energy ``||A||^2 - sum_{i<=k} s_i^2`` of
            the rank-k truncation (default ``1e-6`` for float32 work, ``1e-12`` for
            float64).
        max_passes: Cap on products with ``a`` or ``aᵀ``; past it the result is flagged
            ``converged=False`` (it is still the best one in the space built).
        init: Optional ``(m, r)`` start vectors, e.g. the left vectors of an earlier,
            smaller fit; they replace the first columns of the random start block.
        seed: Seed of the Gaussian start block.
        total: ``||a||_F^2`` when already known.

    Returns:
        A :class:`TruncatedSVD`; ``u`` has ``k`` columns and ``vh`` ``k`` rows, ``s`` holds
        every singular value computed (all ``min(m, n)`` for ``"full"``).

    Raises:
        ValueError: On an unknown ``method``.
    """
    m, n = a.shape
    k = max(1, min(int(k), m, n))
    if method == "auto":
        method = "randomized" if use_truncated((m, n), k) else "full"
    if method == "full":
        u, s, vh = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
        tot = float(s.pow(2).sum()) if total is None else total
        return TruncatedSVD(u[:, :k], s, vh[:k], tot, "full")
    if method != "randomized":
        raise ValueError(f"method must be 'auto', 'full' or 'randomized', got {method!r}")
    if m > n:  # iterate on the smaller side; swap back at the end
        init_t = None if init is None else a.T @ init.to(a.dtype)
        res = truncated_svd(
            a.T,
            k,
            method=method,
            rtol=rtol,
            max_passes=max_passes,
            init=init_t,
            seed=seed,
            total=total,
        )
        res.u, res.vh = res.vh.T, res.u.T
        return res
    work = a if a.dtype == torch.float64 else a.to(torch.float32)
    tot = sq_norm(work) if total is None else total
    if rtol is None:
        rtol = 1e-12 if work.dtype == torch.float64 else 1e-6
    gen = torch.Generator(device=work.device).manual_seed(seed)
    q, z, gram, passes, converged = _krylov(
        work, k, tot, rtol=rtol, max_passes=max_passes, init=init, gen=gen
    )
    if work.dtype != torch.float64:
        # Float64 Rayleigh–Ritz on the leading Ritz vectors of the float32 space.
        vecs = torch.linalg.eigh(gram).eigenvectors.flip(1)
        keep = min(q.shape[1], k + max(4, k // 4))
        q = _orth((q @ vecs[:, :keep]).to(torch.float64), None, gen)
        z = _rt_chunked(work, q)
        passes += 1
        lam = torch.linalg.eigvalsh(z.T @ z).flip(0)[:k]
        if tot - float(lam.clamp_min(0).sum()) < 1e-6 * tot:
            # Nearly exact fit: the float32 space limits the error at ~1e-6, so one
            # float64 power step (two more passes) takes it to float64 round-off.
            q = _orth(_r_chunked(work, z), None, gen)
            z = _rt_chunked(work, q)
            passes += 2
    ub, s, vh = torch.linalg.svd(z.T, full_matrices=False)
    return TruncatedSVD(q @ ub[:, :k], s[:k], vh[:k], tot, "randomized", passes, converged)
