"""Report entries and verification of converted models against their originals."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from ndcompile.errors import NdCompileError
from ndcompile.frontend.sites import LinearSite
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.report import ConversionReport, LayerReport

__all__ = [
    "count_parameters",
    "exact_entries",
    "exact_tolerance",
    "fill_layer_stats",
    "layer_entry",
    "relative_error",
    "verify_outputs",
]


def relative_error(reference: Any, candidate: Any) -> float:
    """``|a - b| / |a|`` over all tensor leaves of two (nested) outputs."""
    ref = [t for t in tree_leaves(reference) if isinstance(t, Tensor)]
    got = [t for t in tree_leaves(candidate) if isinstance(t, Tensor)]
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
    dtypes = {t.dtype for t in tree_leaves(outputs) if isinstance(t, Tensor)}
    if dtypes <= {torch.float64}:
        return 1e-10
    if dtypes & {torch.float16, torch.bfloat16}:
        return 1e-2
    return 1e-4


def layer_entry(site: LinearSite) -> LayerReport:
    m = site.module
    return LayerReport(
        name=site.name,
        kind="Linear",
        in_features=m.in_features,
        out_features=m.out_features,
        in_shape=site.in_shape,
        out_shape=site.out_shape,
        mode_source=site.source,
        params_before=sum(p.numel() for p in m.parameters()),
        flops_before=2 * site.rows * m.in_features * m.out_features * len(site.nodes),
        reason=site.skip_reason,
    )


def fill_layer_stats(
    entry: LayerReport, layer: NdLinear, site: LinearSite, autotune: bool = False
) -> None:
    layer.replan(plan_batch=max(site.rows, 1), autotune=autotune)
    plan = layer.plan()
    entry.status = "converted"
    entry.rank = layer.rank
    entry.params_after = layer.num_parameters()
    entry.flops_after = (plan.flops + (layer.out_features * site.rows)) * len(site.nodes)
    entry.naive_flops = plan.naive_flops
    entry.largest_intermediate = plan.largest_intermediate
    entry.plan = str(layer.plan_choice() or plan)


def exact_entries(gm: fx.GraphModule) -> list[LayerReport]:
    """Report entries of the layers ``inline_ndlinear`` recorded in ``gm.meta``."""
    entries = []
    for item in gm.meta.get("ndcompile_inlined", []):
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


def verify_outputs(
    gm: fx.GraphModule, inputs: tuple, reference: Any, report: ConversionReport, *, strict: bool
) -> None:
    """Run ``gm`` on the example; record the output error; raise if ``strict`` and it differs."""
    try:
        with torch.no_grad():
            out = gm(*inputs)
    except Exception as exc:
        raise NdCompileError(
            f"the converted model fails on the example input: {type(exc).__name__}: {exc}",
            hint="please report this with the model; pass verify=False to skip the check",
        ) from exc
    if report.mode == "fresh":
        ref_shapes = [tuple(t.shape) for t in tree_leaves(reference) if isinstance(t, Tensor)]
        got_shapes = [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, Tensor)]
        if ref_shapes != got_shapes:
            raise NdCompileError(f"converted output shapes {got_shapes} != original {ref_shapes}")
        report.notes.append("fresh layers are newly initialised: outputs differ until trained")
        return
    err = relative_error(reference, out)
    report.output_rel_error = err
    if strict and err > exact_tolerance(reference):
        raise NdCompileError(
            f"{report.mode} conversion changed the model's output (relative error {err:.3e})",
            hint="this is a bug in an exact pass; please report it with the model",
        )
