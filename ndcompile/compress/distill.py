"""Recover accuracy after factorization: layer-wise and whole-model distillation.

:func:`distill` trains a converted model (``ndcompile.convert(..., mode="factorize")``)
towards the original in place, in two optional phases:

* **layer-wise**: every NdLinear of the converted model whose name is an
  ``nn.Linear`` of the original is fitted to that Linear's outputs on the
  original's own activations. One streaming pass over ``data`` collects, per
  layer, either the Gram statistics ``XᵀX``, ``Xᵀ1``, ``n`` (float64, memory
  ``in_features²``) or a uniform reservoir sample of at most ``reservoir_rows``
  rows; the activation matrix itself is never held. With the Gram statistics the
  squared output error of a fit ``(Ŵ, b̂)`` is
  ``tr(E G Eᵀ) + 2 δᵀ E s + n |δ|²`` (``E = W - Ŵ``, ``δ = b - b̂``), so the
  fit costs nothing per row. A full bias is eliminated exactly (``b̂ = b + E μ``),
  the Kronecker factors are refined by block-coordinate descent (exact solves,
  warm-started from the current factors), a low-rank residual by a whitened SVD,
  then Adam polishes everything with early stopping on the held-out rows.
* **whole-model**: Adam on the NdLinear parameters (or all trainable ones)
  matching the original's outputs (relative MSE, or KL on logits), with early
  stopping on held-out batches.

Every batch ``i`` with ``i % round(1 / holdout) == 0`` is held out. A layer or the
model only changes when that lowers its held-out error.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from ndcompile.compress.hybrid import WhitenedMetric
from ndcompile.compress.kronecker import kron_dense
from ndcompile.errors import NdCompileError
from ndcompile.frontend.trace import as_tuple
from ndcompile.layers.ndlinear import NdLinear, mode_bias

__all__ = ["DistillReport", "LayerDistill", "LayerStats", "WholeModelDistill", "distill"]

LOSSES = ("mse", "kl")


@dataclass
class LayerDistill:
    """Layer-wise distillation of one layer.

    Attributes:
        name: Qualified layer name.
        error_before: Relative output error ``|Y - Ŷ| / |Y|`` before (bias included).
        error_after: The same after.
        steps: Adam steps run.
        stopped_early: Whether early stopping ended Adam before ``steps``.
        method: ``"als+adam"`` or ``"adam"``.
        accumulator: ``"gram"`` or ``"reservoir"``.
        accumulator_shape: Shape of the largest statistic held while streaming
            (``(in, in)`` for the Gram matrix, ``(cap, in)`` for the reservoir).
        rows_seen: Activation rows seen (training and held-out).
        rows_heldout: Rows held out for early stopping and the errors.
        error_source: ``"heldout"`` or ``"train"`` (no held-out rows).
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


@dataclass
class WholeModelDistill:
    """Whole-model distillation: output error before/after on held-out batches."""

    error_before: float
    error_after: float
    steps: int
    stopped_early: bool
    loss: str
    error_source: str


@dataclass
class DistillReport:
    """What :func:`distill` did, printable as a table."""

    layers: list[LayerDistill] = field(default_factory=list)
    whole_model: WholeModelDistill | None = None

    def layer(self, name: str) -> LayerDistill:
        """The entry of layer ``name``."""
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise KeyError(f"no layer {name!r}; layers: {[e.name for e in self.layers]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        return asdict(self)

    def __str__(self) -> str:
        head = ("layer", "error before", "error after", "steps", "early", "statistics")
        rows = [head]
        for e in self.layers:
            stats = "x".join(map(str, e.accumulator_shape))
            rows.append(
                (
                    e.name,
                    f"{e.error_before:.3e}",
                    f"{e.error_after:.3e}",
                    str(e.steps),
                    "yes" if e.stopped_early else "no",
                    f"{e.accumulator} {stats}, {e.rows_seen:,} rows ({e.rows_heldout:,} held out)",
                )
            )
        widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
        lines = ["DistillReport"]
        for k, row in enumerate(rows if self.layers else []):
            cells = (v.ljust(w) for v, w in zip(row, widths, strict=True))
            lines.append(("  " + "  ".join(cells)).rstrip())
            if k == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        if self.whole_model is not None:
            m = self.whole_model
            early = ", stopped early" if m.stopped_early else ""
            lines.append(
                f"  whole model ({m.loss}, {m.steps} steps{early}): output error "
                f"{m.error_before:.3e} -> {m.error_after:.3e} ({m.error_source})"
            )
        return "\n".join(lines)


class LayerStats:
    """Streaming input statistics of one Linear: Gram matrix or reservoir sample.

    Args:
        in_features: Input features.
        kind: ``"gram"`` (``XᵀX``, ``Xᵀ1``, ``n`` in float64) or ``"reservoir"``
            (a uniform sample of at most ``cap`` rows, Vitter's algorithm R).
        cap: Reservoir size.
        seed: Reservoir sampling seed.
    """

    def __init__(self, in_features: int, kind: str, cap: int, seed: int = 0) -> None:
        self.in_features, self.kind, self.cap = in_features, kind, int(cap)
        self.rows = 0
        self.gram: Tensor | None = None
        self.row_sum: Tensor | None = None
        self.sample: Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the largest statistic held."""
        if self.kind == "gram":
            return (self.in_features, self.in_features)
        return (self.cap, self.in_features)

    def add(self, x: Tensor) -> None:
        """Add the rows of ``x (..., in_features)``."""
        x = x.detach().reshape(-1, self.in_features)
        if self.kind == "gram":
            # MPS has no float64: accumulate on the CPU there
            x64 = x.to("cpu" if x.device.type == "mps" else x.device, torch.float64)
            if self.gram is None:
                self.gram = x64.new_zeros(self.in_features, self.in_features)
                self.row_sum = x64.new_zeros(self.in_features)
            self.gram.addmm_(x64.T, x64)
            self.row_sum += x64.sum(0)
            self.rows += x.shape[0]
            return
        if self.sample is None:
            self.sample = x.new_empty(self.cap, self.in_features)
        start, b = self.rows, x.shape[0]
        fill = max(0, min(self.cap - start, b))
        self.sample[start : start + fill] = x[:fill]
        if fill < b:
            t = torch.arange(start + fill, start + b, dtype=torch.float64)
            slot = (torch.rand(t.shape, generator=self._gen, dtype=torch.float64) * (t + 1)).long()
            hit = torch.nonzero(slot < self.cap).flatten().flip(0)  # last write wins
            slots, inverse = torch.unique(slot[hit], return_inverse=True)
            first = torch.full(slots.shape, hit.numel(), dtype=torch.long)
            first = first.scatter_reduce(0, inverse, torch.arange(hit.numel()), "amin")
            rows = hit[first] + fill
            self.sample[slots.to(self.sample.device)] = x[rows.to(x.device)]
        self.rows += b

    def finalize(self) -> tuple[Tensor, Tensor, int] | None:
        """``(G, s, n)`` in float64 (from the sample for a reservoir), or None if empty."""
        if self.rows == 0:
            return None
        if self.kind == "gram":
            assert self.gram is not None and self.row_sum is not None
            return self.gram, self.row_sum, self.rows
        assert self.sample is not None
        rows = self.sample[: min(self.rows, self.cap)]
        gram = rows.new_zeros(self.in_features, self.in_features, dtype=torch.float64)
        for chunk in rows.split(1024):
            c64 = chunk.to(torch.float64)
            gram.addmm_(c64.T, c64)
        return gram, rows.to(torch.float64).sum(0), rows.shape[0]


def _sq_error(e: Tensor, delta: Tensor, stats: tuple[Tensor, Tensor, int]) -> Tensor:
    """``sum_rows |E x + δ|²`` from ``(G, s, n)``."""
    gram, row_sum, n = stats
    return ((e @ gram) * e).sum() + 2 * (delta * (e @ row_sum)).sum() + n * (delta * delta).sum()


class _LayerFit:
    """Parameters of one NdLinear as float64 tensors, and its error on statistics."""

    def __init__(
        self, layer: NdLinear, linear: nn.Linear, train: tuple[Tensor, Tensor, int]
    ) -> None:
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

    def rel_error(self, p: dict[str, Tensor], stats: tuple, fitted_bias: bool = True) -> Tensor:
        e = self.w - self.weight(p)
        ref = _sq_error(self.w, self.b, stats).clamp_min(1e-300)
        return (_sq_error(e, self.delta(p, e, fitted_bias), stats).clamp_min(0) / ref).sqrt()

    def write(self, p: dict[str, Tensor], fitted_bias: bool = True) -> None:
        """Copy ``p`` into the layer (a full bias set to its optimal value if ``fitted_bias``)."""
        params = dict(self.layer.named_parameters())
        with torch.no_grad():
            for name, value in p.items():
                params[name].copy_(value)
            if self.bias_kind == "full" and fitted_bias:
                params["bias"].copy_(self.b + (self.w - self.weight(p)) @ self.mu)


#: Relative ridge added to the (centred) Gram matrix for the exact refinement steps.
RIDGE = 1e-6


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
        best = metric.error(kron_dense(factors) + u @ v)
        for _ in range(sweeps):
            start = best
            new = metric.kronecker(fit.w - u @ v, layer.rank, init=factors, n_iter=5)
            err = metric.error(kron_dense(new) + u @ v)
            if err < best:
                factors, best = new, err
            kd = kron_dense(factors)
            new_u, new_v = metric.lowrank(fit.w - kd, layer.lowrank)
            err = metric.error(kd + new_u @ new_v)
            if err < best:
                u, v, best = new_u, new_v, err
            if best > start * (1 - 1e-6):
                break
        out["lowrank_u"], out["lowrank_v"] = u, v
    out.update({f"factors.{i}": f for i, f in enumerate(factors)})
    return out


def _lr_groups(tensors: list[Tensor], lr: float) -> list[dict[str, Any]]:
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
    eval_stats: tuple,
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
    opt = torch.optim.Adam(_lr_groups(trainable, lr))
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


def _distill_layer(
    name: str,
    layer: NdLinear,
    linear: nn.Linear,
    stats: tuple[LayerStats, LayerStats],
    **adam: Any,
) -> LayerDistill:
    train = stats[0].finalize()
    if train is None:
        raise NdCompileError(
            "no training rows reached this layer", layer=name, hint="pass more batches"
        )
    held = stats[1].finalize()
    eval_stats = held if held is not None else train
    fit = _LayerFit(layer, linear, train)
    with torch.no_grad():
        before = float(fit.rel_error(fit.initial, eval_stats, fitted_bias=False))
        refined = _refine(fit, fit.initial)
    start = refined if refined is not None else fit.initial
    best, after, steps, early = _adam_layer(fit, start, eval_stats, **adam)
    if after < before:
        fit.write(best)
    else:
        after = before
    return LayerDistill(
        name=name,
        error_before=before,
        error_after=after,
        steps=steps,
        stopped_early=early,
        method="adam" if refined is None else "als+adam",
        accumulator=stats[0].kind,
        accumulator_shape=stats[0].shape,
        rows_seen=stats[0].rows + stats[1].rows,
        rows_heldout=stats[1].rows,
        error_source="heldout" if held is not None else "train",
    )


# --------------------------------------------------------------------------- whole model
def _to(batch: tuple, device: torch.device) -> tuple:
    return tuple(t.to(device) if isinstance(t, Tensor) else t for t in batch)


def _tensors(out: Any) -> list[Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, Tensor)]


def _output_loss(student: Any, teacher: Any, kind: str) -> Tensor:
    pairs = list(zip(_tensors(student), _tensors(teacher), strict=True))
    if kind == "kl":
        total = sum(
            nn.functional.kl_div(
                torch.log_softmax(s.reshape(-1, s.shape[-1]), -1),
                torch.log_softmax(t.reshape(-1, t.shape[-1]), -1),
                log_target=True,
                reduction="batchmean",
            )
            for s, t in pairs
        )
        return total  # type: ignore[return-value]
    num = sum((s - t).pow(2).sum() for s, t in pairs)
    den = sum(t.pow(2).sum() for _, t in pairs)
    return num / den.clamp_min(1e-30)  # type: ignore[union-attr]


def _whole_model(
    converted: nn.Module,
    teacher: nn.Module,
    batches: tuple[list[tuple], list[tuple]],
    *,
    params: list[Tensor],
    steps: int,
    lr: float,
    loss: str,
    patience: int,
    eval_every: int,
    device: torch.device,
    bar: Callable[..., Any],
) -> WholeModelDistill:
    train, held = batches
    evals = held or train
    with torch.no_grad():
        targets = [teacher(*_to(b, device)) for b in evals]

    def error() -> float:
        num = den = 0.0
        with torch.no_grad():
            for b, t in zip(evals, targets, strict=True):
                for s, r in zip(_tensors(converted(*_to(b, device))), _tensors(t), strict=True):
                    num += float((s.double() - r.double()).pow(2).sum())
                    den += float(r.double().pow(2).sum())
        return math.sqrt(num / den) if den > 0 else math.sqrt(num)

    before = best_err = error()
    best = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(_lr_groups(params, lr))
    bad, run, early = 0, 0, False
    progress = bar(total=steps, desc="distill model")
    for step in range(1, steps + 1):
        batch = _to(train[(step - 1) % len(train)], device)
        with torch.no_grad():
            target = teacher(*batch)
        opt.zero_grad()
        _output_loss(converted(*batch), target, loss).backward()
        opt.step()
        run = step
        progress.update(1)
        if step % eval_every and step != steps:
            continue
        err = error()
        progress.set_postfix(error=f"{err:.3e}")
        if err < best_err * (1 - 1e-9):
            best, best_err, bad = [p.detach().clone() for p in params], err, 0
        else:
            bad += 1
            if bad >= patience:
                early = True
                break
    progress.close()
    with torch.no_grad():
        for p, b in zip(params, best, strict=True):
            p.copy_(b)
    return WholeModelDistill(
        error_before=before,
        error_after=best_err,
        steps=run,
        stopped_early=early,
        loss=loss,
        error_source="heldout" if held else "train",
    )


# --------------------------------------------------------------------------- entry point
def _progress_bar(enabled: bool) -> Callable[..., Any]:
    """``tqdm`` when enabled, installed and on a terminal; otherwise a silent stand-in."""
    if enabled and sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm

            return tqdm
        except ImportError:  # pragma: no cover - tqdm is optional
            pass

    class _Silent:
        def __init__(self, iterable: Iterable[Any] | None = None, **_: Any) -> None:
            self.iterable = iterable

        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(self.iterable or ())

        def update(self, *_: Any) -> None: ...
        def set_postfix(self, **_: Any) -> None: ...
        def close(self) -> None: ...

    return _Silent


def _layer_pairs(converted: nn.Module, teacher: nn.Module) -> list[tuple[str, NdLinear, nn.Linear]]:
    pairs = []
    for name, module in converted.named_modules():
        if not isinstance(module, NdLinear):
            continue
        try:
            linear = teacher.get_submodule(name)
        except AttributeError:
            continue
        if (
            isinstance(linear, nn.Linear)
            and linear.in_features == module.in_features
            and linear.out_features == module.out_features
        ):
            pairs.append((name, module, linear))
    return pairs


def _on_device(model: nn.Module, device: torch.device) -> bool:
    return all(t.device == device for t in [*model.parameters(), *model.buffers()])


def _check_args(
    loss: str, holdout: float, accumulate: str, train: str, layerwise: bool, whole_model: bool
) -> None:
    if loss not in LOSSES:
        raise NdCompileError(f"unknown loss {loss!r}; valid losses are: {', '.join(LOSSES)}")
    if not 0 <= holdout < 1:
        raise NdCompileError(
            f"holdout must be a fraction in [0, 1), got {holdout!r}",
            hint="e.g. holdout=0.1 holds out every 10th batch",
        )
    if accumulate not in ("auto", "gram", "reservoir"):
        raise NdCompileError(
            f"unknown accumulate {accumulate!r}; valid values are: auto, gram, reservoir"
        )
    if train not in ("ndlinear", "all"):
        raise NdCompileError(f"unknown train {train!r}; valid values are: ndlinear, all")
    if not (layerwise or whole_model):
        raise NdCompileError(
            "nothing to do: layerwise and whole_model are both False",
            hint="pass layerwise=True and/or whole_model=True",
        )


def distill(
    converted: nn.Module,
    original: nn.Module,
    data: Iterable[Any],
    *,
    steps: int = 200,
    lr: float = 1e-2,
    layerwise: bool = True,
    whole_model: bool = False,
    whole_model_steps: int | None = None,
    whole_model_lr: float | None = None,
    loss: str = "mse",
    holdout: float = 0.1,
    patience: int = 5,
    eval_every: int = 10,
    accumulate: str = "auto",
    reservoir_rows: int = 8192,
    gram_max_features: int = 1024,
    train: str = "ndlinear",
    device: torch.device | str | None = None,
    progress: bool = True,
) -> DistillReport:
    """Distil ``original`` into ``converted`` (trained in place); return what changed.

    Args:
        converted: The converted model (e.g. from ``ndcompile.convert``); its NdLinear
            layers sit at the names of the original's Linears. Trained in place.
        original: The dense teacher; never modified (temporary hooks only).
        data: An iterable of input batches (tensors or tuples), read once; it may be
            a generator. Whole-model distillation keeps the input batches (never the
            activations) in memory to revisit them.
        steps: Adam steps per layer (layer-wise).
        lr: Layer-wise Adam step size, relative to each tensor's RMS.
        layerwise: Fit each NdLinear to its Linear on the original's activations.
        whole_model: Then match the model outputs.
        whole_model_steps: Whole-model Adam steps (default: ``steps``).
        whole_model_lr: Whole-model Adam step size, relative to each tensor's RMS
            (default: ``lr``).
        loss: Whole-model loss: ``"mse"`` (relative squared error of all outputs) or
            ``"kl"`` (KL divergence of softmax over the last dim: logits).
        holdout: Fraction of batches held out for early stopping and the errors.
        patience: Evaluations without held-out improvement before stopping.
        eval_every: Steps between held-out evaluations.
        accumulate: Layer statistics: ``"gram"``, ``"reservoir"`` or ``"auto"`` (Gram
            matrix up to ``gram_max_features`` inputs, reservoir above).
        reservoir_rows: Training rows a reservoir keeps per layer (the held-out
            reservoir keeps ``reservoir_rows * holdout / (1 - holdout)``).
        gram_max_features: Largest input width ``"auto"`` accumulates a Gram matrix for.
        train: Whole-model parameters: ``"ndlinear"`` (the NdLinear layers') or
            ``"all"`` (every trainable parameter of ``converted``).
        device: Where to compute (default: ``converted``'s device; ``converted`` is
            moved there, ``original`` copied there if it lives elsewhere).
        progress: Show progress bars (tqdm, on a terminal only).

    Returns:
        A :class:`DistillReport`.

    Raises:
        NdCompileError: On bad options, no matching layers, or too little data.
    """
    _check_args(loss, holdout, accumulate, train, layerwise, whole_model)
    if converted is original:
        raise NdCompileError(
            "converted and original are the same module",
            hint="distil a converted copy, e.g. ndcompile.convert(model, x, mode='factorize')",
        )
    first = next(iter(converted.parameters()), None)
    dev = (
        torch.device(device)
        if device is not None
        else (first.device if first is not None else torch.device("cpu"))
    )
    converted.to(dev)
    teacher = original if _on_device(original, dev) else copy.deepcopy(original).to(dev)
    bar = _progress_bar(progress)
    pairs = _layer_pairs(converted, teacher) if layerwise else []
    if layerwise and not pairs:
        raise NdCompileError(
            "no NdLinear layer of the converted model has the name and size of an "
            "nn.Linear of the original",
            hint="pass the model returned by ndcompile.convert(original, ...) and the original",
        )

    def kind(n: int) -> str:
        if accumulate != "auto":
            return accumulate
        return "gram" if n <= gram_max_features else "reservoir"

    # the held-out reservoir keeps the held-out share of the rows
    held_rows = max(1, math.ceil(reservoir_rows * holdout / (1 - holdout)))
    stats = {
        name: (
            LayerStats(lin.in_features, kind(lin.in_features), reservoir_rows, seed=0),
            LayerStats(lin.in_features, kind(lin.in_features), held_rows, seed=1),
        )
        for name, _, lin in pairs
    }
    period = max(2, round(1 / holdout)) if holdout > 0 else 0
    state = {"held": 0}

    def hook(name: str) -> Callable[..., None]:
        return lambda _m, args: stats[name][state["held"]].add(args[0])

    modes = {m: m.training for model in (converted, teacher) for m in model.modules()}
    converted.eval()
    teacher.eval()
    handles = [teacher.get_submodule(n).register_forward_pre_hook(hook(n)) for n, _, _ in pairs]
    batches: tuple[list[tuple], list[tuple]] = ([], [])
    count = 0
    try:
        with torch.no_grad():
            for i, raw in enumerate(bar(data, desc="statistics")):
                batch = as_tuple(raw)
                state["held"] = int(period > 0 and i % period == 0)
                if pairs:
                    teacher(*_to(batch, dev))
                if whole_model:
                    batches[state["held"]].append(batch)
                count += 1
    finally:
        for h in handles:
            h.remove()
    try:
        if count == 0:
            raise NdCompileError("data yielded no batches", hint="pass a non-empty iterable")
        if count - ((count + period - 1) // period if period else 0) < 1:
            raise NdCompileError(
                f"data gave {count} batch, all held out (holdout={holdout})",
                hint="pass more batches or holdout=0",
            )
        report = DistillReport()
        for name, layer, linear in bar(pairs, desc="distill layers"):
            report.layers.append(
                _distill_layer(
                    name,
                    layer,
                    linear,
                    stats.pop(name),  # type: ignore[arg-type]
                    steps=steps,
                    lr=lr,
                    patience=patience,
                    eval_every=eval_every,
                )
            )
        if whole_model:
            params = [
                p
                for m in (
                    [m for m in converted.modules() if isinstance(m, NdLinear)]
                    if train == "ndlinear"
                    else [converted]
                )
                for p in m.parameters()
                if p.requires_grad
            ]
            if not params:
                raise NdCompileError(
                    f"whole-model distillation found no trainable parameters (train={train!r})",
                    hint="use train='all' or unfreeze the NdLinear parameters",
                )
            report.whole_model = _whole_model(
                converted,
                teacher,
                batches,
                params=params,
                steps=steps if whole_model_steps is None else whole_model_steps,
                lr=lr if whole_model_lr is None else whole_model_lr,
                loss=loss,
                patience=patience,
                eval_every=eval_every,
                device=dev,
                bar=bar,
            )
    finally:
        for m, training in modes.items():
            m.train(training)
    return report
