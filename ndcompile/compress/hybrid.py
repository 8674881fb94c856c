"""Kronecker sum + low-rank hybrids chosen at a parameter budget.

Trained weights have little Kronecker structure, and a plain low-rank (SVD) factor
often beats a Kronecker sum with the same number of parameters. A hybrid
``W ≈ sum_r A_r ⊗ B_r + U V`` can beat both. :func:`choose_form` fits, at a budget
given as a fraction of the dense weight's parameters:

* ``kronecker``: the pure Kronecker sum at the largest rank within the budget;
* ``lowrank``: the plain SVD at the largest rank within the budget (a reference: an
  NdLinear always holds at least one Kronecker term, so this form is measured, not
  built; the hybrid with one Kronecker term and the largest ``k`` is its buildable
  counterpart);
* ``hybrid``: Kronecker rank ``R`` + low rank ``k`` for a few splits of the budget,
  fitted Kronecker first (then low rank on the residual) and low rank first (then
  Kronecker on the residual), each refined by alternating the two exact fits (a
  step is kept only when it lowers the error); the better of the two is kept.

With a Gram matrix ``G = XᵀX`` of the layer's inputs every fit minimises the output
error ``sqrt(tr(E G Eᵀ) / tr(W G Wᵀ))`` (the low-rank part by an SVD in the
whitened space ``W G^{1/2}``); without, the weight error ``|E| / |W|``. The form with
the lowest error among the buildable ones is chosen; :func:`hybrid_layer` turns it
into an ``NdLinear(rank=R, lowrank=k)`` and :func:`budget_layer` does that for one
site of ``convert(mode="factorize")``, filling its report entry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ndcompile.compress.calibrated import kron_als, output_rel_error
from ndcompile.compress.kronecker import (
    _check_weight,
    _max_rank,
    kron_dense,
    kronecker_params,
    nearest_kronecker,
    rearrange,
)
from ndcompile.compress.truncated import truncated_svd, use_truncated
from ndcompile.errors import NdCompileError
from ndcompile.frontend.sites import LinearSite
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.report import LayerReport

__all__ = [
    "FormCandidate",
    "HybridChoice",
    "WhitenedMetric",
    "budget_layer",
    "choose_form",
    "hybrid_layer",
]

#: Fractions of the budget given to the Kronecker part of the hybrid candidates.
DEFAULT_SPLITS = (0.25, 0.5, 0.75)


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
                root = s.sqrt()
                (h1, h2), (d1, d2) = self.out_shape, self.in_shape
                init = [
                    (u * root).T.reshape(rank, h1, d1),
                    (vh * root[:, None]).reshape(rank, h2, d2),
                ]
            else:
                init = nearest_kronecker(target, self.in_shape, self.out_shape, rank).factors
            if self.fit_gram is not None:
                init = self._rescale(target, list(init))
        if self.fit_gram is None:
            return [f.to(target) for f in init]
        return kron_als(target, init, self.fit_gram, n_iter=n_iter)


@dataclass
class FormCandidate:
    """One fitted form.

    Attributes:
        form: ``"kronecker"``, ``"lowrank"`` or ``"hybrid"``.
        rank: Kronecker rank ``R`` (0 for the pure low-rank form).
        lowrank: Low-rank ``k``.
        params: Weight parameters of the form.
        error: Error in the choice metric (output error with a Gram matrix, else weight).
        weight_error: ``|W - W_hat| / |W|``.
        buildable: Whether an NdLinear holds exactly this form.
    """

    form: str
    rank: int
    lowrank: int
    params: int
    error: float
    weight_error: float
    buildable: bool = True

    @property
    def label(self) -> str:
        """``kronecker R=4``, ``lowrank k=10``, ``hybrid R=2+k=6``."""
        if self.form == "kronecker":
            return f"kronecker R={self.rank}"
        if self.form == "lowrank":
            return f"lowrank k={self.lowrank}"
        return f"hybrid R={self.rank}+k={self.lowrank}"


@dataclass
class HybridChoice:
    """The form chosen by :func:`choose_form`, with every candidate measured.

    Attributes:
        form: The chosen form (``"kronecker"`` or ``"hybrid"``).
        in_shape: Input modes.
        out_shape: Output modes.
        factors: Kronecker factors, factor i of shape ``(R, h_i, d_i)``.
        lowrank_u: ``U (prod h, k)`` or None when ``k == 0``.
        lowrank_v: ``V (k, prod d)`` or None when ``k == 0``.
        error: Error of the chosen form in the choice metric.
        weight_error: Its weight error.
        metric: ``"output"`` (a Gram matrix was given) or ``"weight"``.
        params: Weight parameters of the chosen form.
        budget_params: The budget in parameters.
        dense_params: Parameters of the dense weight.
        candidates: Every fitted form, the chosen one included.
    """

    form: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    factors: list[Tensor]
    lowrank_u: Tensor | None
    lowrank_v: Tensor | None
    error: float
    weight_error: float
    metric: str
    params: int
    budget_params: int
    dense_params: int
    candidates: list[FormCandidate] = field(default_factory=list)

    @property
    def rank(self) -> int:
        """Kronecker rank R."""
        return int(self.factors[0].shape[0])

    @property
    def lowrank(self) -> int:
        """Low-rank k (0 for a pure Kronecker sum)."""
        return 0 if self.lowrank_u is None else int(self.lowrank_u.shape[1])

    @property
    def errors(self) -> dict[str, float]:
        """Error of every candidate by label."""
        return {c.label: c.error for c in self.candidates}

    def candidate(self, form: str) -> FormCandidate | None:
        """The best candidate of ``form`` (None if it did not fit the budget)."""
        found = [c for c in self.candidates if c.form == form]
        return min(found, key=lambda c: c.error) if found else None

    def dense_weight(self) -> Tensor:
        """The chosen approximation as a dense ``(prod h, prod d)`` weight."""
        w = kron_dense(self.factors)
        if self.lowrank_u is not None and self.lowrank_v is not None:
            w = w + self.lowrank_u @ self.lowrank_v
        return w

    def __str__(self) -> str:
        lines = [
            f"HybridChoice({self.form} R={self.rank} k={self.lowrank}, {self.metric} error "
            f"{self.error:.4f}, params {self.params:,} / budget {self.budget_params:,} / "
            f"dense {self.dense_params:,})"
        ]
        width = max(len(c.label) for c in self.candidates)
        for c in sorted(self.candidates, key=lambda c: c.error):
            mark = (
                "*" if (c.form, c.rank, c.lowrank) == (self.form, self.rank, self.lowrank) else " "
            )
            note = "" if c.buildable else "  (reference)"
            lines.append(
                f" {mark} {c.label.ljust(width)}  params {c.params:>9,}  error {c.error:.4f}"
                f"  weight error {c.weight_error:.4f}{note}"
            )
        return "\n".join(lines)


def _fit_hybrid(
    metric: WhitenedMetric, rank: int, k: int, sweeps: int, lowrank_first: bool
) -> tuple[list[Tensor], Tensor, Tensor, float]:
    """Alternating exact fits of the Kronecker part and the low-rank part."""
    w = metric.weight
    if lowrank_first:
        u, v = metric.lowrank(w, k)
        factors = metric.kronecker(w - u @ v, rank)
    else:
        factors = metric.kronecker(w, rank)
        u, v = metric.lowrank(w - kron_dense(factors), k)
    best = metric.error(kron_dense(factors) + u @ v)
    for _ in range(sweeps):
        start = best
        new_factors = metric.kronecker(w - u @ v, rank, init=factors, n_iter=3)
        err = metric.error(kron_dense(new_factors) + u @ v)
        if err < best:
            factors, best = new_factors, err
        k_dense = kron_dense(factors)
        new_u, new_v = metric.lowrank(w - k_dense, k)
        err = metric.error(k_dense + new_u @ new_v)
        if err < best:
            u, v, best = new_u, new_v, err
        if best > start * (1 - 1e-6):
            break
    return factors, u, v, best


def _splits(
    budget_params: int, kp1: int, lr1: int, top_rank: int, splits: Sequence[float]
) -> list[tuple[int, int]]:
    """``(R, k)`` pairs with ``R >= 1``, ``k >= 1`` within the budget."""
    pairs: list[tuple[int, int]] = []
    shares = [*splits, 0.0]  # 0.0: one Kronecker term, the rest low rank
    for share in shares:
        r = min(top_rank, max(1, int(share * budget_params) // kp1))
        k = (budget_params - r * kp1) // lr1
        if k >= 1 and (r, k) not in pairs:
            pairs.append((r, k))
    return pairs


def choose_form(
    weight: Tensor,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    *,
    budget: float,
    gram: Tensor | None = None,
    damping: float = 0.01,
    splits: Sequence[float] = DEFAULT_SPLITS,
    sweeps: int = 3,
    layer: str | None = None,
) -> HybridChoice:
    """Fit the Kronecker, low-rank and hybrid forms at a budget and choose the best.

    Args:
        weight: Dense weight ``(prod h, prod d)`` (an ``nn.Linear`` weight).
        in_shape: Input modes ``(d1..dN)``.
        out_shape: Output modes ``(h1..hN)``.
        budget: Fraction of the dense weight's parameters, ``0 < budget <= 1``
            (``0.2``: at most ``0.2 * out * in`` parameters).
        gram: ``XᵀX`` of the layer's inputs ``(in, in)``; when given every form is
            fitted and compared on the output error instead of the weight error.
        damping: With ``gram``, the fits use ``G + damping * mean(diag(G)) * I``
            (the errors and the choice use ``G``); it keeps the weight error bounded
            in directions the calibration data never reaches.
        splits: Fractions of the budget given to the Kronecker part of the hybrids
            (a hybrid with one Kronecker term and the largest ``k`` is always tried).
        sweeps: Alternating refinement sweeps per hybrid.
        layer: Layer name for error messages.

    Returns:
        The chosen :class:`HybridChoice` (factors in ``weight``'s dtype and device).

    Raises:
        NdCompileError: On mismatched shapes, a budget outside ``(0, 1]`` or one too
            small for a single Kronecker term.
    """
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    _check_weight(weight, in_shape, out_shape, layer)
    out_f, in_f = weight.shape
    dense = out_f * in_f
    if not 0 < budget <= 1:
        raise NdCompileError(
            f"budget must be a fraction of the dense parameters in (0, 1], got {budget!r} "
            f"(weight {tuple(weight.shape)})",
            layer=layer,
            hint="e.g. budget=0.2 keeps at most 20% of the weight's parameters",
        )
    if gram is not None and tuple(gram.shape) != (in_f, in_f):
        raise NdCompileError(
            f"gram must have shape ({in_f}, {in_f}), got {tuple(gram.shape)}",
            layer=layer,
            hint="accumulate it from this layer's inputs "
            "(ndcompile.compress.calibrated.accumulate_gram)",
        )
    budget_params = int(budget * dense)
    kp1 = kronecker_params(in_shape, out_shape, 1)
    if budget_params < kp1:
        raise NdCompileError(
            f"budget {budget} ({budget_params:,} params) is below one Kronecker term "
            f"({kp1:,} params) for in_shape={in_shape}, out_shape={out_shape}",
            layer=layer,
            hint=f"use budget >= {kp1 / dense:.4f} or other mode shapes",
        )
    if not damping >= 0:
        raise NdCompileError(f"damping must be >= 0, got {damping!r}", layer=layer)
    metric = WhitenedMetric(weight, gram, in_shape, out_shape, damping=damping)
    top = _max_rank(in_shape, out_shape)
    lr1 = in_f + out_f
    fitted: list[tuple[FormCandidate, list[Tensor], Tensor | None, Tensor | None]] = []

    r_a = min(top, budget_params // kp1)
    factors = metric.kronecker(metric.weight, r_a, n_iter=30)
    w_hat = kron_dense(factors)
    cand = FormCandidate(
        "kronecker", r_a, 0, r_a * kp1, metric.error(w_hat), metric.weight_error(w_hat)
    )
    fitted.append((cand, factors, None, None))

    k_b = min(budget_params // lr1, min(out_f, in_f))
    if k_b >= 1:
        u, v = metric.lowrank(metric.weight, k_b)
        w_hat = u @ v
        cand = FormCandidate(
            "lowrank",
            0,
            k_b,
            k_b * lr1,
            metric.error(w_hat),
            metric.weight_error(w_hat),
            buildable=False,
        )
        fitted.append((cand, [], u, v))

    for r, k in _splits(budget_params, kp1, lr1, r_a, splits):
        k = min(k, min(out_f, in_f))
        fits = [_fit_hybrid(metric, r, k, sweeps, lowrank_first=first) for first in (False, True)]
        factors, u, v, err = min(fits, key=lambda f: f[3])
        w_hat = kron_dense(factors) + u @ v
        cand = FormCandidate("hybrid", r, k, r * kp1 + k * lr1, err, metric.weight_error(w_hat))
        fitted.append((cand, factors, u, v))

    best, best_factors, best_u, best_v = min(
        (f for f in fitted if f[0].buildable), key=lambda f: f[0].error
    )

    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device=weight.device, dtype=weight.dtype).contiguous()

    return HybridChoice(
        form=best.form,
        in_shape=in_shape,
        out_shape=out_shape,
        factors=[f.to(device=weight.device, dtype=weight.dtype).contiguous() for f in best_factors],
        lowrank_u=cast(best_u),
        lowrank_v=cast(best_v),
        error=best.error,
        weight_error=best.weight_error,
        metric="output" if gram is not None else "weight",
        params=best.params,
        budget_params=budget_params,
        dense_params=dense,
        candidates=[f[0] for f in fitted],
    )


def hybrid_layer(choice: HybridChoice, bias: Tensor | None, *, optimizer: str = "auto") -> NdLinear:
    """The ``NdLinear(rank=R, lowrank=k)`` holding ``choice`` (and a copy of ``bias``).

    Args:
        choice: From :func:`choose_form`.
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
