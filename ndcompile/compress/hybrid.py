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
the lowest error among the buildable ones is chosen and comes back as a
:class:`~ndcompile.compress.hybrid_choice.HybridChoice`;
:func:`~ndcompile.compress.hybrid_layers.hybrid_layer` turns it into an
``NdLinear(rank=R, lowrank=k)`` and :func:`~ndcompile.compress.hybrid_layers.budget_layer`
does that for one site of ``convert(mode="factorize")``, filling its report entry.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ndcompile.compress.hybrid_choice import FormCandidate, HybridChoice
from ndcompile.compress.kronecker_dense import kron_dense
from ndcompile.compress.kronecker_shapes import _check_weight, _max_rank, kronecker_params
from ndcompile.compress.whitened_metric import WhitenedMetric, refine_hybrid
from ndcompile.errors import NdCompileError

__all__ = ["choose_form"]

#: Fractions of the budget given to the Kronecker part of the hybrid candidates.
DEFAULT_SPLITS = (0.25, 0.5, 0.75)


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
    return refine_hybrid(metric, w, factors, u, v, rank, k, sweeps=sweeps, n_iter=3)


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
        The chosen :class:`~ndcompile.compress.hybrid_choice.HybridChoice` (factors in
        ``weight``'s dtype and device).

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
