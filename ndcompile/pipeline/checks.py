"""Report entries and verification of converted models against their originals."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ndcompile.errors import NdCompileError
from ndcompile.frontend.inputs import ExampleInputs, tensor_leaves
from ndcompile.frontend.sites import LinearSite
from ndcompile.ir.meta import INLINED_LAYERS
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.report import ConversionReport, LayerReport

__all__ = [
    "check_runs",
    "count_parameters",
    "exact_entries",
    "exact_tolerance",
    "fill_layer_stats",
    "layer_entry",
    "reference_outputs",
    "relative_error",
    "unchanged_state",
    "verify_outputs",
]


def relative_error(reference: Any, candidate: Any) -> float:
    """``|a - b| / |a|`` over all tensor leaves of two (nested) outputs."""
    ref, got = tensor_leaves(reference), tensor_leaves(candidate)
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got, strict=True)):
        raise NdCompileError(
            "converted model output structure differs from the original: "
            f"{[tuple(t.shape) for t in ref]} vs {[tuple(t.shape) for t in got]}"
        )
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(ref, got, strict=True))
    den = sum(float(a.double().pow(2).sum()) for a in ref)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters of ``model`` (tied parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def exact_tolerance(outputs: Any) -> float:
    dtypes = {t.dtype for t in tensor_leaves(outputs)}
    if dtypes <= {torch.float64}:
        return 1e-10
    if dtypes & {torch.float16, torch.bfloat16}:
        return 1e-2
    return 1e-4


def layer_entry(site: LinearSite) -> LayerReport:
    m = site.module
    return LayerReport(
        name=site.name,
        kind=site.kind,
        in_features=m.in_features,
        out_features=m.out_features,
        in_shape=site.in_shape,
        out_shape=site.out_shape,
        mode_source=site.source,
        params_before=sum(p.numel() for p in m.parameters()),
        flops_before=2 * site.rows * m.in_features * m.out_features * site.n_calls,
        reason=site.skip_reason,
    )


def fill_layer_stats(entry: LayerReport, layer: NdLinear, site: LinearSite) -> None:
    """Write a converted layer's params, FLOPs and plan (as planned) into ``entry``."""
    plan = layer.plan()
    entry.status = "converted"
    entry.rank = layer.rank
    entry.params_after = layer.num_parameters()
    entry.flops_after = (plan.flops + (layer.out_features * site.rows)) * site.n_calls
    entry.naive_flops = plan.naive_flops
    entry.largest_intermediate = plan.largest_intermediate
    entry.plan = str(layer.plan_choice() or plan)


def exact_entries(gm: fx.GraphModule) -> list[LayerReport]:
    """Report entries of the layers ``inline_ndlinear`` recorded in ``gm.meta``."""
    entries = []
    for item in gm.meta.get(INLINED_LAYERS, []):
        layer = gm.get_submodule(item.name)
        assert isinstance(layer, NdLinear)
        plan = layer.plan()
        entries.append(
            LayerReport(
                name=item.name,
                kind=item.kind,
                status="inlined",
                in_features=layer.in_features,
                out_features=layer.out_features,
                in_shape=layer.in_shape,
                out_shape=layer.out_shape,
                mode_source="layer",
                rank=layer.rank,
                params_before=item.params,
                params_after=layer.num_parameters(),
                flops_before=layer.sequential_flops(item.rows),
                flops_after=plan.flops,
                naive_flops=plan.naive_flops,
                largest_intermediate=plan.largest_intermediate,
                plan=str(layer.plan_choice() or plan),
            )
        )
    return entries


@contextlib.contextmanager
def unchanged_state(model: nn.Module, *, eval_mode: bool = True) -> Iterator[None]:
    """Run ``model`` (in eval mode by default) and leave it exactly as it was.

    Training flags are restored per module and every buffer (BatchNorm running
    stats, spectral-norm vectors, ...) is put back, so checking a model against
    its conversion never mutates the user's model. With ``eval_mode=False`` the
    model runs in its own mode with the random generator seeded (so Dropout draws
    the same masks in the original and in an exact rewrite of its graph).
    """
    flags = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if b is not None}
    rng = contextlib.ExitStack()
    if eval_mode:
        model.eval()
    else:
        rng.enter_context(torch.random.fork_rng(devices=[]))
        torch.manual_seed(0)
    try:
        yield
    finally:
        rng.close()
        for m, flag in flags.items():
            m.training = flag
        with torch.no_grad():
            for name, b in model.named_buffers():
                saved = buffers.get(name)
                if saved is not None and b is not None and b.shape == saved.shape:
                    b.copy_(saved)


def reference_outputs(model: nn.Module, example: ExampleInputs, *, eval_mode: bool = True) -> Any:
    """The model's output on the example, computed without changing the model.

    Raises:
        NdCompileError: If the model fails on the example input.
    """
    try:
        with torch.no_grad(), unchanged_state(model, eval_mode=eval_mode):
            return example(model)
    except Exception as exc:
        raise example.failure(model, exc) from exc


def _nonfinite(value: Any) -> bool:
    leaves = [t for t in tensor_leaves(value) if t.is_floating_point() and not t.is_meta]
    return any(not bool(torch.isfinite(t).all()) for t in leaves)


def verify_outputs(
    model: nn.Module,
    example: ExampleInputs,
    reference: Any,
    report: ConversionReport,
    *,
    strict: bool,
    eval_mode: bool = True,
) -> None:
    """Run the converted ``model`` on the example and record the output error.

    Every tensor of the output is compared (tuples, dicts, dataclasses,
    ``ModelOutput``). Both models run in eval mode (module surgery), or in their
    own mode with the same random seed (a traced graph, whose train-mode
    behaviour was fixed when it was traced), so Dropout cannot make an exact
    conversion look wrong.

    Raises:
        NdCompileError: If the converted model fails, its output has another
            structure, holds NaN/inf where the original does not, or (``strict``)
            differs beyond fp tolerance.
    """
    try:
        with torch.no_grad(), unchanged_state(model, eval_mode=eval_mode):
            out = example(model)
    except Exception as exc:
        raise NdCompileError(
            f"the converted model fails on the example input: {type(exc).__name__}: {exc}",
            hint="please report this with the model; pass verify=False to skip the check",
        ) from exc
    ref_leaves, got_leaves = tensor_leaves(reference), tensor_leaves(out)
    if not ref_leaves:
        report.notes.append(
            f"the model's output ({type(reference).__name__}) holds no tensors: "
            "nothing was compared"
        )
        if strict:
            raise NdCompileError(
                f"cannot verify the conversion: the model's output ({type(reference).__name__}) "
                "holds no tensors",
                hint="return tensors (in tuples, dicts or dataclasses), or pass verify=False",
            )
        return
    ref_shapes = [tuple(t.shape) for t in ref_leaves]
    got_shapes = [tuple(t.shape) for t in got_leaves]
    if ref_shapes != got_shapes:
        raise NdCompileError(f"converted output shapes {got_shapes} != original {ref_shapes}")
    if _nonfinite(out) and not _nonfinite(reference):
        raise NdCompileError(
            "the converted model outputs NaN or inf on the example input (the original does not)",
            hint="check alpha=, rank= and the example input; pass verify=False to skip the check",
        )
    if _nonfinite(reference):
        report.notes.append("the original model's output holds NaN or inf on the example input")
    if report.mode == "fresh":
        report.notes.append("fresh layers are newly initialised: outputs differ until trained")
        return
    err = relative_error(reference, out)
    report.output_rel_error = err
    if strict and err > exact_tolerance(reference):
        raise NdCompileError(
            f"{report.mode} conversion changed the model's output (relative error {err:.3e})",
            hint="this is a bug in an exact pass; please report it with the model",
        )


def check_runs(model: nn.Module, example: ExampleInputs, report: ConversionReport) -> None:
    """Run the converted ``model`` once on the example: it must give finite outputs.

    For a model converted from weights on disk, whose original cannot run: nothing
    is compared, and the report says so.

    Raises:
        NdCompileError: The converted model fails on the example or gives NaN/inf.
    """
    try:
        with torch.no_grad(), unchanged_state(model):
            out = example(model)
    except Exception as exc:
        raise NdCompileError(
            f"the converted {type(model).__name__} fails on the example: "
            f"{type(exc).__name__}: {exc}",
            hint="check that the checkpoint belongs to this model",
        ) from exc
    if _nonfinite(out):
        raise NdCompileError(
            f"the converted {type(model).__name__} gives NaN or inf on the example",
            hint="check the checkpoint (NaN or inf weights?)",
        )
    report.notes.append(
        "not compared with the original (its weights are on disk, it cannot run on the "
        "meta device); the converted model ran on the example with finite outputs"
    )
