"""The error metric of weight approximations, optionally whitened by an input Gram.

:class:`WhitenedMetric` measures an approximation ``W_hat`` of a dense weight ``W`` by
the output error ``sqrt(tr(E G Eᵀ) / tr(W G Wᵀ))`` with a Gram matrix ``G = XᵀX`` of the
layer's inputs, or by the weight error ``|E| / |W|`` without, and fits the exact best
low-rank term (an SVD in the whitened space ``W G^{1/2}``) and Kronecker terms in that
metric. :func:`top_svd` gives the leading singular triplets those fits need and
:func:`refine_hybrid` alternates the two fits for a Kronecker + low-rank hybrid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ndcompile.compress.calibrated import kron_als, output_rel_error
from ndcompile.compress.kronecker import nearest_kronecker
from ndcompile.compress.kronecker_dense import kron_dense, rearrange
from ndcompile.compress.kronecker_svd import _svd_factors
from ndcompile.compress.truncated import truncated_svd, use_truncated

__all__ = ["WhitenedMetric", "refine_hybrid", "top_svd"]


def top_svd(m: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Leading ``k`` singular triplets of ``m``, without a full SVD.

    When ``k`` is well below the smaller dimension of a large ``m`` they come from
    :func:`~ndcompile.compress.truncated.truncated_svd` (randomised block Krylov);
    otherwise from the eigenproblem of the smaller Gram matrix. Directions whose
    singular value is at round-off level come back as zeros.

    Args:
        m: A 2-D float64 matrix ``(a, b)``.
        k: Number of triplets (``<= min(a, b)``).

    Returns:
        ``u (a, k)``, ``s (k,)``, ``vh (k, b)`` with ``m ≈ u diag(s) vh``.
    """
    if use_truncated((int(m.shape[0]), int(m.shape[1])), k):
        res = truncated_svd(m, k, method="randomized", rtol=1e-10)
        s = res.s[:k]
        live = s > s[:1].clamp_min(1e-300) * 1e-7
        u, s, vh = res.u * live, s * live, res.vh * live[:, None]
        return u.to(m.dtype), s.to(m.dtype), vh.to(m.dtype)
    transpose = m.shape[0] > m.shape[1]
    mm = m.T if transpose else m
    lam, vecs = torch.linalg.eigh(mm @ mm.T)
    lam, vecs = lam.flip(0)[:k].clamp_min(0), vecs.flip(1)[:, :k]
    s = lam.sqrt()
    live = s > s[:1].clamp_min(1e-300) * 1e-7
    other = (vecs.T @ mm) / torch.where(live, s, torch.ones_like(s))[:, None]
    other = other * live[:, None]
    if transpose:
        return other.T, s * live, vecs.T
    return vecs, s * live, other


class WhitenedMetric:
    """Error metric and exact fits of weight approximations, optionally weighted by a Gram.

    With ``gram`` the error of ``W_hat`` is ``sqrt(tr(E G Eᵀ) / tr(W G Wᵀ))``, the best
    rank-k term is an SVD in the whitened space and Kronecker terms are refined by
    :func:`kron_als`; without, all three are the plain Frobenius ones.

    Args:
        weight: The dense weight ``(out, in)``.
        gram: ``XᵀX`` ``(in, in)`` or None.
        in_shape: Input modes of the Kronecker fits.
        out_shape: Output modes of the Kronecker fits.
        damping: The fits use ``G + damping * mean(diag(G)) * I`` (errors use ``G``),
            which keeps the weight error in check in directions the data never
            reaches (dead units, fewer rows than inputs).
    """

    def __init__(
        self,
        weight: Tensor,
        gram: Tensor | None,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        *,
        damping: float = 0.0,
    ) -> None:
        self.weight = weight.detach().to(torch.float64)
        self.gram: Tensor | None = None
        self.fit_gram: Tensor | None = None
        if gram is not None:
            g = gram.detach().to(self.weight)
            self.gram = (g + g.T) / 2
            ridge = damping * self.gram.diagonal().mean().clamp_min(0)
            self.fit_gram = self.gram + ridge * torch.eye(g.shape[0]).to(g)
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self._eig: tuple[Tensor, Tensor] | None = None

    def error(self, w_hat: Tensor) -> float:
        """Relative error of ``w_hat`` in this metric."""
        if self.gram is not None:
            return output_rel_error(self.weight, w_hat.detach().to(self.weight), self.gram)
        return self.weight_error(w_hat)

    def weight_error(self, w_hat: Tensor) -> float:
        """Relative Frobenius error ``|W - w_hat| / |W|``."""
        norm = float(torch.linalg.vector_norm(self.weight))
        diff = float(torch.linalg.vector_norm(self.weight - w_hat.detach().to(self.weight)))
        return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)

    def _whitening(self) -> tuple[Tensor, Tensor]:
        if self._eig is None:
            assert self.fit_gram is not None
            lam, q = torch.linalg.eigh(self.fit_gram)
            keep = lam > lam.max().clamp_min(0) * 1e-12 * self.fit_gram.shape[0]
            self._eig = (lam[keep].sqrt(), q[:, keep])
        return self._eig

    def _rescale(self, target: Tensor, factors: list[Tensor]) -> list[Tensor]:
        """Scale a Kronecker sum by the factor that best fits ``target`` (0 allowed)."""
        assert self.fit_gram is not None
        k = kron_dense(factors).to(target)
        kg = k @ self.fit_gram
        den = float((kg * k).sum())
        alpha = float((kg * target).sum()) / den if den > 0 else 0.0
        return [factors[0] * alpha, *factors[1:]]

    def lowrank(self, target: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Best rank-``k`` ``U @ V`` approximation of ``target`` in this metric.

        Returns:
            ``U (out, k)`` and ``V (k, in)`` in float64 (zero-padded when the data
            allow fewer than ``k`` directions).
        """
        target = target.detach().to(self.weight)
        out_f, in_f = target.shape
        if self.fit_gram is None:
            m, back = target, None
        else:
            root, q = self._whitening()
            m, back = target @ q * root, (root, q)
        kk = min(k, *m.shape)
        u, s, vh = top_svd(m, kk)
        if back is not None:
            vh = vh / back[0] @ back[1].T
        half = s.sqrt()
        big_u, big_v = target.new_zeros(out_f, k), target.new_zeros(k, in_f)
        big_u[:, :kk] = u * half
        big_v[:kk] = half[:, None] * vh
        return big_u, big_v

    def kronecker(
        self, target: Tensor, rank: int, init: Sequence[Tensor] | None = None, n_iter: int = 10
    ) -> list[Tensor]:
        """Rank-``rank`` Kronecker fit of ``target`` in this metric (float64 factors).

        Args:
            target: Dense target.
            rank: Kronecker rank.
            init: Warm start for the Gram-weighted refinement (ignored without Gram).
            n_iter: Refinement sweeps (Gram-weighted only).
        """
        target = target.detach().to(self.weight)
        if init is None or self.fit_gram is None:
            if len(self.in_shape) == 2:
                u, s, vh = top_svd(rearrange(target, self.in_shape, self.out_shape), rank)
                init = _svd_factors(u, s, vh, rank, self.in_shape, self.out_shape)
            else:
                init = nearest_kronecker(target, self.in_shape, self.out_shape, rank).factors
            if self.fit_gram is not None:
                init = self._rescale(target, list(init))
        if self.fit_gram is None:
            return [f.to(target) for f in init]
        return kron_als(target, init, self.fit_gram, n_iter=n_iter)


def refine_hybrid(
    metric: WhitenedMetric,
    target: Tensor,
    factors: list[Tensor],
    u: Tensor,
    v: Tensor,
    rank: int,
    k: int,
    *,
    sweeps: int,
    n_iter: int,
) -> tuple[list[Tensor], Tensor, Tensor, float]:
    """Alternate the exact fits of a hybrid's Kronecker part and low-rank part.

    Each sweep refits the Kronecker part to ``target - U V`` (warm-started from the
    current factors) and then the low-rank part to ``target`` minus the Kronecker sum;
    a step is kept only when it lowers the error, and the sweeps stop when one no
    longer lowers it.

    Args:
        metric: The metric the fits minimise and the errors are measured in.
        target: The dense weight the hybrid approximates.
        factors: Current Kronecker factors, factor i of shape ``(R, h_i, d_i)``.
        u: Current ``U (out, k)``.
        v: Current ``V (k, in)``.
        rank: Kronecker rank ``R``.
        k: Low rank.
        sweeps: Largest number of sweeps.
        n_iter: Refinement sweeps of each Gram-weighted Kronecker fit.

    Returns:
        The refined ``factors``, ``u``, ``v`` and their error in ``metric``.
    """
    best = metric.error(kron_dense(factors) + u @ v)
    for _ in range(sweeps):
        start = best
        new_factors = metric.kronecker(target - u @ v, rank, init=factors, n_iter=n_iter)
        err = metric.error(kron_dense(new_factors) + u @ v)
        if err < best:
            factors, best = new_factors, err
        k_dense = kron_dense(factors)
        new_u, new_v = metric.lowrank(target - k_dense, k)
        err = metric.error(k_dense + new_u @ new_v)
        if err < best:
            u, v, best = new_u, new_v, err
        if best > start * (1 - 1e-6):
            break
    return factors, u, v, best
