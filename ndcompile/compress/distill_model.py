"""Whole-model distillation: train the converted model to match the original's outputs.

Adam on the chosen parameters, one training batch per step, the original's output as
the target. The loss is KL divergence on logits when the output looks like logits (a
``logits`` entry of a Hugging Face output, or an output straight from a Linear with
two or more features), otherwise a squared error scaled by the original's output
energy. Training runs to convergence on the held-out batches: every ``eval_every``
steps the held-out loss is measured; after ``patience`` evaluations without
improvement the best state is restored and the step size cut (:data:`LR_CUTS`
times), then it stops. The step budget is only a cap.

Under ``torch.distributed`` the model is wrapped in ``DistributedDataParallel`` (one
gradient per step averaged over processes) and the held-out sums are added over
processes, so every process takes the same decisions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ndcompile.compress.distill_data import Batch, all_reduce_floats, world
from ndcompile.compress.distill_layers import lr_groups
from ndcompile.errors import NdCompileError
from ndcompile.frontend.capture import linear_like
from ndcompile.frontend.inputs import tensor_leaves
from ndcompile.layers.ndlinear import NdLinear

__all__ = ["LR_CUTS", "WholeModelDistill", "auto_budget", "choose_loss", "distill_whole_model"]

#: Step-size cuts (each by :data:`LR_CUT`) after a plateau before stopping.
LR_CUTS = 2
LR_CUT = 0.3


@dataclass
class WholeModelDistill:
    """Whole-model distillation: what was trained, for how long, why it stopped.

    Attributes:
        error_before: Relative output error ``|y - ŷ| / |y|`` (all output tensors).
        error_after: The same after.
        steps: Adam steps run.
        stopped_early: Whether it stopped before the step budget.
        loss: ``"kl"`` or ``"mse"``.
        error_source: ``"heldout"`` or ``"train"`` (no held-out batches).
        loss_reason: Why this loss.
        loss_before: Held-out loss before (what early stopping watches).
        loss_after: The same after.
        agreement_before: Share of rows whose top class matches the original's (logits).
        agreement_after: The same after.
        budget: The step cap, and where it came from.
        stop_reason: Why training stopped.
        trained: Which parameters were trained.
        trained_params: How many parameter elements.
        processes: Processes that took part (``torch.distributed`` world size).
    """

    error_before: float
    error_after: float
    steps: int
    stopped_early: bool
    loss: str
    error_source: str
    loss_reason: str = ""
    loss_before: float = math.nan
    loss_after: float = math.nan
    agreement_before: float | None = None
    agreement_after: float | None = None
    budget: str = ""
    stop_reason: str = ""
    trained: str = ""
    trained_params: int = 0
    processes: int = 1


def auto_budget(train_batches: int) -> tuple[int, str]:
    """Step cap from the data: 100 passes over the training batches, 1,000 to 10,000 steps."""
    steps = min(10_000, max(1000, 100 * train_batches))
    return steps, f"{steps:,} steps (100 passes over {train_batches} batches, 1,000 to 10,000)"


def choose_loss(teacher: nn.Module, batch: Batch, loss: str) -> tuple[str, str]:
    """``(loss, reason)``: ``"kl"`` when ``loss`` is ``"auto"`` and the output looks like logits."""
    if loss != "auto":
        return loss, "asked for"
    produced: dict[int, str] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _a, out, n=n: produced.__setitem__(id(out), n))
        for n, m in teacher.named_modules()
        if linear_like(m) is not None or isinstance(m, NdLinear)
    ]
    try:
        with torch.no_grad():
            out = batch.inputs(teacher)
    finally:
        for h in hooks:
            h.remove()
    if isinstance(out, Mapping):
        logits = out.get("logits")
        if isinstance(logits, Tensor) and logits.shape[-1] >= 2:
            return "kl", f"the output's 'logits' ({logits.shape[-1]} classes)"
    if isinstance(out, Tensor) and id(out) in produced and out.dim() and out.shape[-1] >= 2:
        return "kl", f"the output comes straight from Linear {produced[id(out)]!r} (logits)"
    return "mse", "the output does not look like logits"


def _logits(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out["logits"]


def _kl(student: Tensor, teacher: Tensor) -> Tensor:
    """Summed (over rows) KL(teacher || student) of softmax over the last dim."""
    c = teacher.shape[-1]
    return nn.functional.kl_div(
        torch.log_softmax(student.reshape(-1, c).float(), -1),
        torch.log_softmax(teacher.reshape(-1, c).float(), -1),
        log_target=True,
        reduction="sum",
    )


def _rows(out: Any) -> int:
    t = _logits(out)
    return t.numel() // t.shape[-1]


@dataclass
class _Objective:
    """The loss and the held-out measurements of one distillation."""

    kind: str
    scale: float = 1.0  # mean square of the original's outputs, for "mse"
    task_weight: float = 0.0

    def loss(self, student: Any, teacher: Any, targets: Any) -> Tensor:
        value: Any
        if self.kind == "kl":
            value = _kl(_logits(student), _logits(teacher)) / max(_rows(teacher), 1)
        else:
            pairs = zip(tensor_leaves(student), tensor_leaves(teacher), strict=True)
            value = sum((s - t.detach()).pow(2).mean() for s, t in pairs) / self.scale
        if self.task_weight and targets is not None:
            value = value + self.task_weight * _task_loss(student, targets)
        return cast(Tensor, value)

    def sums(self, student: Any, teacher: Any) -> list[float]:
        """``[err², ref², loss·rows, rows, agreeing rows]`` of one held-out batch."""
        num = den = 0.0
        for s, t in zip(tensor_leaves(student), tensor_leaves(teacher), strict=True):
            num += float((s.double() - t.double()).pow(2).sum())
            den += float(t.double().pow(2).sum())
        if self.kind == "kl":
            s, t = _logits(student), _logits(teacher)
            agree = float((s.argmax(-1) == t.argmax(-1)).sum())
            return [num, den, float(_kl(s, t)), float(_rows(teacher)), agree]
        return [num, den, num, den, 0.0]  # the loss is the relative squared error


def _task_loss(student: Any, targets: Tensor) -> Tensor:
    logits = _logits(student)
    if targets.is_floating_point() or targets.shape != logits.shape[:-1]:
        raise NdCompileError(
            f"task_weight needs class labels of shape {tuple(logits.shape[:-1])} for logits "
            f"{tuple(logits.shape)}, got {tuple(targets.shape)} {targets.dtype}",
            hint="pass task_weight=0 to ignore the targets",
        )
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _evaluate(
    model: nn.Module, evals: list[Batch], targets: list[Any], objective: _Objective
) -> dict[str, float]:
    totals = [0.0] * 5
    with torch.no_grad():
        for b, t in zip(evals, targets, strict=True):
            totals = [
                a + v for a, v in zip(totals, objective.sums(b.inputs(model), t), strict=True)
            ]
    num, den, loss, rows, agree = all_reduce_floats(totals)
    return {
        "error": math.sqrt(num / den) if den > 0 else math.sqrt(num),
        "loss": loss / rows if rows else 0.0,
        "agreement": agree / rows if rows else 0.0,
    }


def distill_whole_model(
    converted: nn.Module,
    teacher: nn.Module,
    batches: tuple[list[Batch], list[Batch]],
    *,
    params: list[Tensor],
    steps: int | None,
    lr: float,
    loss: tuple[str, str],
    patience: int,
    eval_every: int | None,
    task_weight: float,
    device: torch.device,
    bar: Callable[..., Any],
) -> WholeModelDistill:
    """Train ``params`` of ``converted`` to match ``teacher`` on ``batches`` (train, held out).

    Every process must call it with the same options when ``torch.distributed`` is
    initialised; each brings its own batches.
    """
    train, held = [b.to(device) for b in batches[0]], [b.to(device) for b in batches[1]]
    evals = held or train
    n_train = round(all_reduce_floats([float(len(train))])[0] / world()[1])
    budget, budget_note = (
        auto_budget(n_train) if steps is None else (steps, f"{steps} steps, asked for")
    )
    every = eval_every or max(10, min(100, n_train))
    with torch.no_grad():
        targets = [b.inputs(teacher) for b in evals]
    objective = _Objective(loss[0], task_weight=task_weight)
    if objective.kind == "mse":
        den, count = all_reduce_floats(
            [sum(float(t.double().pow(2).sum()) for o in targets for t in tensor_leaves(o)),
             float(sum(t.numel() for o in targets for t in tensor_leaves(o)))]
        )  # fmt: skip
        objective.scale = den / count if den > 0 else 1.0
    chosen = {id(p) for p in params}
    frozen = [p for p in converted.parameters() if p.requires_grad and id(p) not in chosen]
    for p in frozen:
        p.requires_grad_(False)  # no gradients for what is not trained (nor DDP buckets)
    model = _wrap(converted)
    before = _evaluate(model, evals, targets, objective)
    best_loss, best = before["loss"], [p.detach().clone() for p in params]
    groups = lr_groups(params, lr)
    opt = torch.optim.Adam(groups)
    bad, cuts, run, reason = 0, 0, 0, "step budget reached"
    progress = bar(total=budget, desc="distill model")
    try:
        for step in range(1, budget + 1):
            batch = train[(step - 1) % len(train)]
            with torch.no_grad():
                target = batch.inputs(teacher)
            opt.zero_grad()
            objective.loss(batch.inputs(model), target, batch.targets).backward()
            opt.step()
            run = step
            progress.update(1)
            if step % every and step != budget:
                continue
            now = _evaluate(model, evals, targets, objective)
            progress.set_postfix(loss=f"{now['loss']:.3e}")
            if now["loss"] < best_loss * (1 - 1e-4):
                best_loss, best, bad = now["loss"], [p.detach().clone() for p in params], 0
                continue
            bad += 1
            if bad < patience:
                continue
            _restore(params, best)
            if cuts == LR_CUTS:
                reason = (
                    f"converged: no held-out improvement in {patience} evaluations "
                    f"(every {every} steps) after {LR_CUTS} step-size cuts"
                )
                break
            cuts, bad = cuts + 1, 0
            for g in opt.param_groups:
                g["lr"] *= LR_CUT
    finally:
        progress.close()
        _restore(params, best)
        for p in frozen:
            p.requires_grad_(True)
    after = _evaluate(converted, evals, targets, objective)
    logits = objective.kind == "kl"
    return WholeModelDistill(
        error_before=before["error"],
        error_after=after["error"],
        steps=run,
        stopped_early=run < budget,
        loss=objective.kind,
        error_source="heldout" if held else "train",
        loss_reason=loss[1],
        loss_before=before["loss"],
        loss_after=after["loss"],
        agreement_before=before["agreement"] if logits else None,
        agreement_after=after["agreement"] if logits else None,
        budget=budget_note,
        stop_reason=reason,
        trained_params=sum(p.numel() for p in params),
        processes=world()[1],
    )


def _restore(params: list[Tensor], values: list[Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)


def _wrap(converted: nn.Module) -> nn.Module:
    """``converted`` in ``DistributedDataParallel`` when several processes run."""
    if world()[1] == 1 or isinstance(converted, nn.parallel.DistributedDataParallel):
        return converted
    return nn.parallel.DistributedDataParallel(converted, broadcast_buffers=False)
