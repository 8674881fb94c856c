"""Recover accuracy after factorization: :func:`distill` and its report.

:func:`distill` trains a converted model (``ndcompile.convert(..., mode="factorize")``,
module surgery or graph output) towards the original in place, in two phases, both
on by default:

* **layer-wise** (:mod:`ndcompile.compress.distill_layers`): every NdLinear is fitted
  to its dense Linear on the original's own activations, from streamed input
  statistics (:mod:`ndcompile.compress.distill_stats`);
* **whole-model** (:mod:`ndcompile.compress.distill_model`): Adam matches the
  original's outputs (KL on logits, else a scaled squared error) until the held-out
  loss stops improving.

Data is read by :mod:`ndcompile.compress.distill_data` (tensors, lists, generators,
DataLoaders, ``(inputs, targets)`` and dict batches). Every batch ``i`` with
``i % round(1 / holdout) == 0`` is held out. A layer or the model only changes when
that lowers its held-out error. Under ``torch.distributed`` every process passes its
own share of the data; statistics and held-out sums are added over processes and
whole-model training runs under ``DistributedDataParallel``.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ndcompile.compress.distill_data import (
    ACCEPTED,
    Batch,
    all_reduce_floats,
    broadcast_parameters,
    read_batches,
    world,
)
from ndcompile.compress.distill_layers import LayerDistill, distill_layer, layer_pairs
from ndcompile.compress.distill_model import WholeModelDistill, choose_loss, distill_whole_model
from ndcompile.compress.distill_report import DistillReport
from ndcompile.compress.distill_stats import LayerStats
from ndcompile.errors import NdCompileError
from ndcompile.layers.ndlinear import NdLinear

__all__ = ["DistillReport", "LayerDistill", "LayerStats", "WholeModelDistill", "distill"]

LOSSES = ("auto", "mse", "kl")
TRAIN = ("all", "ndlinear")
#: Layer-wise Adam steps per layer when ``steps`` is None (early stopping usually ends it).
LAYER_STEPS = 500


def _progress_bar(enabled: bool) -> Callable[..., Any]:
    """``tqdm`` when enabled, installed and on a terminal; otherwise a silent stand-in."""
    if enabled and sys.stderr.isatty() and world()[0] == 0:
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
    if train not in TRAIN:
        raise NdCompileError(f"unknown train {train!r}; valid values are: {', '.join(TRAIN)}")
    if not (layerwise or whole_model):
        raise NdCompileError(
            "nothing to do: layerwise and whole_model are both False",
            hint="pass layerwise=True and/or whole_model=True",
        )


def _trained_params(student: nn.Module, train: str) -> tuple[list[torch.Tensor], str]:
    """The whole-model parameters and a sentence saying which they are."""
    nd = {n: m for n, m in student.named_modules() if isinstance(m, NdLinear)}
    nd_params = {id(p) for m in nd.values() for p in m.parameters() if p.requires_grad}
    params: list[torch.Tensor] = [p for m in nd.values() for p in m.parameters() if p.requires_grad]
    count = sum(p.numel() for p in params)
    names = ", ".join(list(nd)[:6]) + (f" and {len(nd) - 6} more" if len(nd) > 6 else "")
    text = f"NdLinear {names or '(none)'} ({count:,} parameters)"
    if train == "ndlinear":
        return params, text + "; the other layers stay as they are (train='ndlinear')"
    others: dict[str, int] = {}
    for name, p in student.named_parameters():
        if p.requires_grad and id(p) not in nd_params:
            params.append(p)
            owner = name.rsplit(".", 1)[0] if "." in name else name
            others[owner] = others.get(owner, 0) + p.numel()
    if not others:
        return params, text
    shown = ", ".join(list(others)[:6]) + (", ..." if len(others) > 6 else "")
    return params, (
        f"{text} and the layers left dense, {shown} ({sum(others.values()):,} parameters), "
        "so they adapt to the factorized ones (train='ndlinear' trains only the factors)"
    )


def distill(
    converted: nn.Module,
    original: nn.Module,
    data: Any,
    *,
    steps: int | None = None,
    lr: float = 1e-2,
    layerwise: bool = True,
    whole_model: bool = True,
    whole_model_steps: int | None = None,
    whole_model_lr: float | None = None,
    loss: str = "auto",
    train: str = "all",
    holdout: float = 0.1,
    patience: int = 10,
    eval_every: int | None = None,
    accumulate: str = "auto",
    reservoir_rows: int = 8192,
    gram_max_features: int = 1024,
    task_weight: float = 0.0,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> DistillReport:
    """Distil ``original`` into ``converted`` (trained in place); return what changed.

    Args:
        converted: The converted model (``ndcompile.convert`` output, module surgery
            or graph, or it wrapped in ``DistributedDataParallel``); its NdLinear
            layers sit at the names of the original's Linears. Trained in place.
        original: The dense teacher; never modified (temporary hooks only).
        data: A tensor of input rows, a dict of named input tensors, or an iterable
            of batches (list, generator, ``DataLoader``) of tensors, tuples, dicts,
            ``(args, kwargs)`` or ``(inputs, targets)``; read once. Whole-model
            distillation keeps the input batches (never the activations) in memory.
        steps: Layer-wise Adam steps per layer (default :data:`LAYER_STEPS`, usually
            ended early by the held-out error).
        lr: Adam step size, relative to each tensor's RMS.
        layerwise: Fit each NdLinear to its Linear on the original's activations.
        whole_model: Then match the model outputs.
        whole_model_steps: Whole-model step cap (default: 30 passes over the
            training batches, 1,000 to 10,000 steps); training stops earlier when
            the held-out loss has converged.
        whole_model_lr: Whole-model step size (default: ``lr``).
        loss: Whole-model loss: ``"auto"`` (``"kl"`` when the output looks like
            logits, else ``"mse"``), ``"mse"`` (squared error of all outputs scaled by
            their energy) or ``"kl"`` (KL divergence of softmax over the last dim).
        train: Whole-model parameters: ``"all"`` (every trainable parameter: the
            NdLinear layers and the layers left dense) or ``"ndlinear"``.
        holdout: Fraction of batches held out for early stopping and the errors.
        patience: Evaluations without held-out improvement before the step size
            is cut (whole-model) or training stops (layer-wise).
        eval_every: Steps between held-out evaluations (default: 10 layer-wise;
            one pass over the training batches, 10 to 100 steps, whole-model).
        accumulate: Layer statistics: ``"gram"``, ``"reservoir"`` or ``"auto"`` (Gram
            matrix up to ``gram_max_features`` inputs, reservoir above).
        reservoir_rows: Training rows a reservoir keeps per layer (the held-out
            reservoir keeps ``reservoir_rows * holdout / (1 - holdout)``).
        gram_max_features: Largest input width ``"auto"`` accumulates a Gram matrix for.
        task_weight: Weight of a cross-entropy task loss on the batches' targets
            (class labels over the logits' rows) added to the whole-model loss; 0
            ignores targets.
        batch_size: Rows per batch when ``data`` is a tensor or dict of tensors
            (default: 128, fewer to make 10 batches).
        device: Where to compute (default: ``converted``'s device; ``converted`` is
            moved there, ``original`` copied there if it lives elsewhere).
        progress: Show progress bars (tqdm, on a terminal, first process only).

    Returns:
        A :class:`DistillReport`.

    Raises:
        NdCompileError: On bad options or data, no matching layers, or too little data.
    """
    _check_args(loss, holdout, accumulate, train, layerwise, whole_model)
    student = (
        converted.module
        if isinstance(converted, nn.parallel.DistributedDataParallel)
        else converted
    )
    if student is original:
        raise NdCompileError(
            "converted and original are the same module",
            hint="distil a converted copy, e.g. ndcompile.convert(model, x, mode='factorize')",
        )
    first = next(iter(student.parameters()), None)
    dev = (
        torch.device(device)
        if device is not None
        else (first.device if first is not None else torch.device("cpu"))
    )
    student.to(dev)
    teacher = original if _on_device(original, dev) else copy.deepcopy(original).to(dev)
    bar = _progress_bar(progress)
    pairs = layer_pairs(student, teacher) if layerwise else []
    if layerwise and not pairs:
        raise NdCompileError(
            "no NdLinear layer of the converted model has the name and size of an "
            "nn.Linear of the original",
            hint="pass the model returned by ndcompile.convert(original, ...) and the original",
        )
    stream, info = read_batches(data, teacher, batch_size=batch_size)
    modes = {m: m.training for model in (student, teacher) for m in model.modules()}
    student.eval()
    teacher.eval()
    try:
        report = DistillReport(processes=world()[1])
        stats, batches, counts = _collect(
            stream, teacher, pairs, info, dev, bar,
            holdout=holdout, keep=whole_model, accumulate=accumulate,
            reservoir_rows=reservoir_rows, gram_max_features=gram_max_features,
        )  # fmt: skip
        report.data = (
            f"{info['source']}, batches read as {info['format']}: {counts[0]:,} batches "
            f"({counts[1]:,} held out)"
        )
        for name, layer, dense in bar(pairs, desc="distill layers"):
            entry = distill_layer(
                name, layer, dense, stats.pop(name), device=dev,
                steps=LAYER_STEPS if steps is None else steps, lr=lr,
                patience=patience, eval_every=eval_every or 10,
            )  # fmt: skip
            if entry is not None:
                report.layers.append(entry)
        broadcast_parameters(student)  # the same fit everywhere, bit for bit
        if whole_model:
            report.whole_model = _whole_model_phase(
                converted, student, teacher, batches, dev, bar,
                train=train, steps=whole_model_steps,
                lr=lr if whole_model_lr is None else whole_model_lr,
                loss=loss, patience=patience, eval_every=eval_every, task_weight=task_weight,
            )  # fmt: skip
    finally:
        for m, training in modes.items():
            m.train(training)
    return report


def _on_device(model: nn.Module, device: torch.device) -> bool:
    return all(t.device == device for t in [*model.parameters(), *model.buffers()])


def _collect(
    stream: Iterable[Batch],
    teacher: nn.Module,
    pairs: list[tuple[str, NdLinear, nn.Module]],
    info: dict[str, str],
    dev: torch.device,
    bar: Callable[..., Any],
    *,
    holdout: float,
    keep: bool,
    accumulate: str,
    reservoir_rows: int,
    gram_max_features: int,
) -> tuple[dict[str, tuple[LayerStats, LayerStats]], tuple[list[Batch], list[Batch]], list[int]]:
    """One pass over the data: layer statistics, kept batches, ``[batches, held out]``."""

    def kind(n: int) -> str:
        if accumulate != "auto":
            return accumulate
        return "gram" if n <= gram_max_features else "reservoir"

    # the held-out reservoir keeps the held-out share of the rows
    held_rows = max(1, math.ceil(reservoir_rows * holdout / (1 - holdout)))
    features = {name: layer.in_features for name, layer, _ in pairs}
    stats = {
        name: (
            LayerStats(n, kind(n), reservoir_rows, seed=0),
            LayerStats(n, kind(n), held_rows, seed=1),
        )
        for name, n in features.items()
    }
    period = max(2, round(1 / holdout)) if holdout > 0 else 0
    state = {"held": 0}

    def hook(name: str) -> Callable[..., None]:
        return lambda _m, args: stats[name][state["held"]].add(args[0])

    handles = [teacher.get_submodule(n).register_forward_pre_hook(hook(n)) for n in stats]
    batches: tuple[list[Batch], list[Batch]] = ([], [])
    count = held = 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(bar(stream, desc="statistics")):
                state["held"] = int(period > 0 and i % period == 0)
                if pairs or i == 0:
                    _call(teacher, batch.to(dev), i, info)
                if keep:
                    batches[state["held"]].append(batch)
                count, held = count + 1, held + state["held"]
    finally:
        for h in handles:
            h.remove()
    count, held = (int(v) for v in all_reduce_floats([float(count), float(held)]))
    if count == 0:
        raise NdCompileError("data yielded no batches", hint=f"pass {ACCEPTED}")
    if count - held < 1:
        raise NdCompileError(
            f"data gave {count} batch, all held out (holdout={holdout})",
            hint="pass more batches (or a tensor of rows, cut into 10 batches) or holdout=0",
        )
    return stats, batches, [count, held]


def _call(teacher: nn.Module, batch: Batch, index: int, info: dict[str, str]) -> Any:
    """``teacher`` on ``batch``; the first batch's failure explains how it was read."""
    if index:
        return batch.inputs(teacher)
    try:
        return batch.inputs(teacher)
    except (TypeError, RuntimeError, ValueError, IndexError) as err:
        raise NdCompileError(
            f"the original model cannot be called with the first batch, read as "
            f"{info['format']} {batch.inputs.describe()}: {type(err).__name__}: {err}",
            hint=f"pass {ACCEPTED}",
        ) from err


def _whole_model_phase(
    converted: nn.Module,
    student: nn.Module,
    teacher: nn.Module,
    batches: tuple[list[Batch], list[Batch]],
    dev: torch.device,
    bar: Callable[..., Any],
    *,
    train: str,
    loss: str,
    **options: Any,
) -> WholeModelDistill:
    params, trained = _trained_params(student, train)
    if not params:
        raise NdCompileError(
            f"whole-model distillation found no trainable parameters (train={train!r})",
            hint="use train='all' or unfreeze the NdLinear parameters",
        )
    sample = (batches[1] or batches[0])[0].to(dev)
    result = distill_whole_model(
        converted, teacher, batches, params=params, device=dev, bar=bar,
        loss=choose_loss(teacher, sample, loss), **options,
    )  # fmt: skip
    result.trained = trained
    return result
