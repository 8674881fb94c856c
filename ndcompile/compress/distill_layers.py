"""Layer-wise distillation: fit each NdLinear to its dense Linear on input statistics.

Every NdLinear of the converted model whose name is a Linear (or transformers
``Conv1D``) of the original is fitted to that layer's outputs on the original's own
activations, from :class:`~ndcompile.compress.distill_stats.LayerStats` alone: a
full bias is eliminated exactly (``b̂ = b + E μ``), the Kronecker factors are refined
by block-coordinate descent (exact solves, warm-started from the current factors), a
low-rank residual by a whitened SVD, then Adam polishes everything with early
stopping on the held-out statistics.

A fit is only accepted when it lowers the held-out error, and only attempted when
the statistics can support it: at least ``in_features`` training rows (fewer leave
directions of the input the fit never sees) and at least :data:`MIN_HELDOUT_ROWS`
held-out rows. Otherwise the layer is kept as it was, and its entry says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ndcompile.compress.distill_stats import GramStats, LayerStats, squared_error
from ndcompile.compress.kronecker_dense import kron_dense
from ndcompile.compress.whitened_metric import WhitenedMetric, refine_hybrid
from ndcompile.frontend.capture import linear_like
from ndcompile.frontend.module_sites import conv1d_as_linear
from ndcompile.layers.execution import mode_bias
from ndcompile.layers.ndlinear import NdLinear

__all__ = ["MIN_HELDOUT_ROWS", "LayerDistill", "distill_layer", "layer_pairs", "lr_groups"]

#: Held-out rows below which a layer's error estimate is too noisy to accept a fit on.
MIN_HELDOUT_ROWS = 32

#: Relative ridge added to the (centred) Gram matrix for the exact refinement steps.
RIDGE = 1e-6


@dataclass
class LayerDistill:
    """Layer-wise distillation of one layer.

    Attributes:
        name: Qualified layer name.
        error_before: Relative output error ``|Y - Ŷ| / |Y|`` before (bias included).
        error_after: The same after (``error_before`` when the layer was kept).
        steps: Adam steps run.
        stopped_early: Whether early stopping ended Adam before its step budget.
        method: ``"als+adam"``, ``"adam"`` or ``"none"`` (not fitted).
        accumulator: ``"gram"`` or ``"reservoir"``.
        accumulator_shape: Shape of the largest statistic held while streaming
            (``(in, in)`` for the Gram matrix, ``(cap, in)`` for the reservoir).
        rows_seen: Activation rows seen (training and held-out, all processes).
        rows_heldout: Rows held out for early stopping and the errors.
        error_source: ``"heldout"`` or ``"train"`` (no held-out rows).
        status: ``"fitted"``, or ``"kept: ..."`` saying why the layer was left as it was.
    """

    name: str
    error_before: float
    error_after: float
    steps: int
    stopped_early: bool
    method: str
    accumulator: str
    accumulator_shape: tuple[int, ...]
    rows_seen: int
    rows_heldout: int
    error_source: str
    status: str = "fitted"


def layer_pairs(converted: nn.Module, teacher: nn.Module) -> list[tuple[str, NdLinear, nn.Module]]:
    """``(name, NdLinear, dense layer)`` for every NdLinear at a same-sized Linear's name."""
    pairs = []
    for name, module in converted.named_modules():
        if not isinstance(module, NdLinear):
            continue
        try:
            dense = teacher.get_submodule(name)
        except AttributeError:
            continue
        kind = linear_like(dense)
        if kind is None:
            continue
        weight = cast(Tensor, dense.weight)
        shape = weight.shape if kind == "Linear" else weight.shape[::-1]
        if tuple(shape) == (module.out_features, module.in_features):
            pairs.append((name, module, dense))
    return pairs


def _as_linear(dense: nn.Module) -> nn.Linear:
    return dense if isinstance(dense, nn.Linear) else conv1d_as_linear(dense)


class _LayerFit:
    """Parameters of one NdLinear as float64 tensors, and its error on statistics."""

    def __init__(self, layer: NdLinear, dense: nn.Module, train: GramStats) -> None:
        linear = _as_linear(dense)
        dev = train[0].device
        self.layer, self.train = layer, train
        self.w = linear.weight.detach().to(dev, torch.float64)
        self.b = (
            self.w.new_zeros(self.w.shape[0])
            if linear.bias is None
            else linear.bias.detach().to(dev, torch.float64)
        )
        self.mu = train[1] / train[2]
        self.bias_kind = (
            "modes"
            if layer.mode_biases is not None
            else ("full" if layer.bias is not None else "none")
        )
        self.initial = {
            n: p.detach().to(dev, torch.float64).clone() for n, p in layer.named_parameters()
        }

    def weight(self, p: dict[str, Tensor]) -> Tensor:
        k = len(self.layer.factors)
        w = kron_dense([p[f"factors.{i}"] for i in range(k)])
        if "lowrank_u" in p:
            w = w + p["lowrank_u"] @ p["lowrank_v"]
        return w

    def delta(self, p: dict[str, Tensor], e: Tensor, fitted_bias: bool) -> Tensor:
        """``b - b̂``; a full bias is the optimal one unless ``fitted_bias`` is False."""
        if self.bias_kind == "full":
            return -(e @ self.mu) if fitted_bias else self.b - p["bias"]
        if self.bias_kind == "modes":
            k = len(self.layer.factors)
            b_hat = mode_bias(
                [p[f"mode_biases.{i}"] for i in range(k)],
                [p[f"factors.{i}"] for i in range(k)],
                self.layer.mode_order,
                self.layer.out_shape,
            )
            return self.b - b_hat
        return self.b

    def rel_error(self, p: dict[str, Tensor], stats: GramStats, fitted_bias: bool = True) -> Tensor:
        e = self.w - self.weight(p)
        ref = squared_error(self.w, self.b, stats).clamp_min(1e-300)
        return (squared_error(e, self.delta(p, e, fitted_bias), stats).clamp_min(0) / ref).sqrt()

    def write(self, p: dict[str, Tensor], fitted_bias: bool = True) -> None:
        """Copy ``p`` into the layer (a full bias set to its optimal value if ``fitted_bias``)."""
        params = dict(self.layer.named_parameters())
        with torch.no_grad():
            for name, value in p.items():
                params[name].copy_(value)
            if self.bias_kind == "full" and fitted_bias:
                params["bias"].copy_(self.b + (self.w - self.weight(p)) @ self.mu)


def _refine(fit: _LayerFit, p: dict[str, Tensor], sweeps: int = 5) -> dict[str, Tensor] | None:
    """Exact block-coordinate refinement on the training statistics (None: not applicable)."""
    if fit.bias_kind == "modes" or (fit.bias_kind == "none" and bool(fit.b.any())):
        return None
    gram, _, n = fit.train
    c = gram - n * torch.outer(fit.mu, fit.mu) if fit.bias_kind == "full" else gram
    layer = fit.layer
    metric = WhitenedMetric(fit.w, c, layer.in_shape, layer.out_shape, damping=RIDGE)
    k = len(layer.factors)
    factors = [p[f"factors.{i}"] for i in range(k)]
    out = dict(p)
    if "lowrank_u" not in p:
        factors = metric.kronecker(fit.w, layer.rank, init=factors, n_iter=10)
    else:
        u, v = p["lowrank_u"], p["lowrank_v"]
        factors, u, v, _ = refine_hybrid(
            metric, fit.w, factors, u, v, layer.rank, layer.lowrank, sweeps=sweeps, n_iter=5
        )
        out["lowrank_u"], out["lowrank_v"] = u, v
    out.update({f"factors.{i}": f for i, f in enumerate(factors)})
    return out


def lr_groups(tensors: list[Tensor], lr: float) -> list[dict[str, Any]]:
    """Adam groups whose step size is ``lr`` times each tensor's RMS (scale-free)."""
    rms = [float(t.detach().pow(2).mean().sqrt()) if t.numel() else 0.0 for t in tensors]
    fallback = max((r for r in rms if r > 0), default=1.0)
    return [
        {"params": [t], "lr": lr * (r if r > 0 else fallback)}
        for t, r in zip(tensors, rms, strict=True)
    ]


def _adam_layer(
    fit: _LayerFit,
    p: dict[str, Tensor],
    eval_stats: GramStats,
    *,
    steps: int,
    lr: float,
    patience: int,
    eval_every: int,
) -> tuple[dict[str, Tensor], float, int, bool]:
    """Adam on the relative training error; returns the best state on ``eval_stats``."""
    state = {n: t.detach().clone() for n, t in p.items()}
    trainable = [t for n, t in state.items() if not (n == "bias" and fit.bias_kind == "full")]
    best = {n: t.clone() for n, t in state.items()}
    with torch.no_grad():
        best_err = float(fit.rel_error(state, eval_stats))
    if steps <= 0 or not trainable:
        return best, best_err, 0, False
    for t in trainable:
        t.requires_grad_(True)
    opt = torch.optim.Adam(lr_groups(trainable, lr))
    bad = 0
    for step in range(1, steps + 1):
        opt.zero_grad()
        fit.rel_error(state, fit.train).pow(2).backward()
        opt.step()
        if step % eval_every and step != steps:
            continue
        with torch.no_grad():
            err = float(fit.rel_error(state, eval_stats))
        if err < best_err * (1 - 1e-9):
            best, best_err, bad = {n: t.detach().clone() for n, t in state.items()}, err, 0
        else:
            bad += 1
            if bad >= patience:
                return best, best_err, step, True
    return best, best_err, steps, False


def _too_few_rows(layer: NdLinear, train_rows: int, held_rows: int, holdout: bool) -> str | None:
    if train_rows < layer.in_features:
        return (
            f"kept: {train_rows} training rows for {layer.in_features} inputs; a fit needs "
            f"at least {layer.in_features} (pass more data or a larger reservoir_rows)"
        )
    if holdout and held_rows < MIN_HELDOUT_ROWS:
        return (
            f"kept: {held_rows} held-out rows cannot tell a better fit from a worse one; "
            f"need at least {MIN_HELDOUT_ROWS} (pass more data or a larger reservoir_rows)"
        )
    return None


def distill_layer(
    name: str,
    layer: NdLinear,
    dense: nn.Module,
    stats: tuple[LayerStats, LayerStats],
    *,
    device: torch.device,
    **adam: Any,
) -> LayerDistill | None:
    """Fit ``layer`` to ``dense`` on the training statistics; None if no rows reached it.

    Every process must call it (the statistics are summed over processes); all of
    them compute the same fit from the same sums.
    """
    train, held = stats[0].finalize(device), stats[1].finalize(device)
    if train is None:
        return None
    eval_stats = held if held is not None else train
    fit = _LayerFit(layer, dense, train)
    with torch.no_grad():
        before = float(fit.rel_error(fit.initial, eval_stats, fitted_bias=False))
    entry = LayerDistill(
        name=name,
        error_before=before,
        error_after=before,
        steps=0,
        stopped_early=False,
        method="none",
        accumulator=stats[0].kind,
        accumulator_shape=stats[0].shape,
        rows_seen=stats[0].rows_total + stats[1].rows_total,
        rows_heldout=stats[1].rows_total,
        error_source="heldout" if held is not None else "train",
    )
    refusal = _too_few_rows(layer, stats[0].rows_kept, stats[1].rows_kept, held is not None)
    if refusal is not None:
        entry.status = refusal
        return entry
    with torch.no_grad():
        refined = _refine(fit, fit.initial)
    start = refined if refined is not None else fit.initial
    best, after, entry.steps, entry.stopped_early = _adam_layer(fit, start, eval_stats, **adam)
    entry.method = "adam" if refined is None else "als+adam"
    if after < before:
        fit.write(best)
        entry.error_after = after
    else:
        entry.status = "kept: no fit lowered the held-out error"
    return entry
