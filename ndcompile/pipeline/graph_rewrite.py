"""The graph path of ``convert``: trace with torch.fx, rewrite the Linear sites, verify.

:func:`convert_graph` is ``convert(..., output="graph")``: it rewrites the traced
graph's Linear sites with the mode strategy (:mod:`ndcompile.pipeline.modes`), or, in
``exact`` mode, runs the exact passes of :func:`optimize`; a model torch.fx cannot
trace has its traceable children converted instead.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, cast

import torch.fx as fx
from torch import nn

from ndcompile.compress.layer_fits import capture_grams, capture_inputs
from ndcompile.errors import NdCompileError, UntraceableError
from ndcompile.frontend.inputs import ExampleInputs
from ndcompile.frontend.partial import convert_partially
from ndcompile.frontend.sites import find_linear_sites
from ndcompile.frontend.trace import as_tuple, propagate_shapes, trace
from ndcompile.ir.meta import FUSED_REGIONS
from ndcompile.ir.network import check_optimizer
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.passes import (
    annotate_shapes,
    dead_code_elimination,
    eliminate_transposes,
    fuse_contractions,
    inline_ndlinear,
    rewrite_ndlinear,
    set_submodule,
)
from ndcompile.passes.runner import Pass, PassResult, run_passes
from ndcompile.pipeline.checks import (
    count_parameters,
    exact_entries,
    layer_entry,
    reference_outputs,
    verify_outputs,
)
from ndcompile.pipeline.modes import FitData, Mode, apply_skip_rules, get_mode
from ndcompile.pipeline.options import ConvertOptions
from ndcompile.report import ConversionReport

__all__ = ["convert_graph", "optimize"]


def convert_graph(
    model: nn.Module, example: ExampleInputs, opts: ConvertOptions, name_prefix: str = ""
) -> nn.Module:
    """``convert(..., output="graph")``: trace with torch.fx and rewrite the graph.

    Returns an ``fx.GraphModule``, or (when the model does not trace and
    ``opts.fallback``) the model's own class with its traceable children converted.
    """
    if example.kwargs:
        raise NdCompileError(
            "output='graph' calls the traced graph positionally; keyword example inputs "
            f"({', '.join(example.kwargs)}) need output='module'",
            hint="use the default output='module', or pass the inputs as a tuple",
        )
    inputs = example.args
    mode = get_mode(opts.mode)
    reference = reference_outputs(model, example, eval_mode=False) if opts.verify else None
    report = ConversionReport(
        mode=opts.mode, params_before=count_parameters(model), options=opts.to_json()
    )
    work = copy.deepcopy(model)
    try:
        gm = trace(work, leaf_modules=opts.leaf_modules)
    except UntraceableError as exc:
        if not opts.fallback:
            raise
        if opts.calibration is not None:
            raise NdCompileError(
                f"{type(model).__name__} cannot be traced with torch.fx, and calibration "
                "data cannot be routed to its traceable parts",
                layer=type(model).__name__,
                hint="use output='module' (the default), which calibrates any model",
            ) from exc

        def convert_child(name: str, module: nn.Module, args: tuple[Any, ...]) -> nn.Module:
            prefix = f"{name_prefix}{name}."
            sub = dataclasses.replace(opts, verify=False, rank=_ranks_under(opts.rank, prefix))
            return convert_graph(module, ExampleInputs(args), sub, name_prefix=prefix)

        result = convert_partially(
            work,
            inputs,
            convert_child,
            report,
            str(exc).splitlines()[0],
            name_prefix=name_prefix,
        )
        return _finish(result, example, reference, report, opts, mode)
    propagate_shapes(gm, inputs)
    if opts.mode == "exact":
        gm = optimize(gm, inputs, optimizer=opts.optimizer)
        report.layers.extend(exact_entries(gm))
        for region in gm.meta.get(FUSED_REGIONS, []):
            report.notes.append(
                f"fused linear region ending at {region.node!r}: {region.contractions} "
                f"contractions, FLOPs {region.flops_before:,} -> {region.flops_after:,}"
            )
    else:
        _rewrite_sites(gm, inputs, mode, report, opts, name_prefix)
    dead_code_elimination(gm)
    result = _finish(gm, example, reference, report, opts, mode)
    # GraphModule.__deepcopy__ keeps attributes listed here.
    gm.meta.setdefault("_user_preserved_attributes", {})["report"] = report
    return result


def _ranks_under(rank: Any, prefix: str) -> Any:
    """A ``{layer: rank}`` mapping restricted to ``prefix`` (names made relative to it)."""
    if not isinstance(rank, Mapping):
        return rank
    return {k[len(prefix) :]: v for k, v in rank.items() if k.startswith(prefix)}


def _rewrite_sites(
    gm: fx.GraphModule,
    inputs: tuple[Any, ...],
    mode: Mode,
    report: ConversionReport,
    opts: ConvertOptions,
    name_prefix: str,
) -> None:
    sites = find_linear_sites(
        gm,
        shapes=opts.shapes,
        include=opts.include,
        exclude=opts.exclude,
        n_modes=opts.n_modes,
        min_features=opts.min_features,
        name_prefix=name_prefix,
    )
    if not name_prefix:
        opts.check_layer_names(s.name for s in sites)
    entries = {site.name: layer_entry(site) for site in sites}
    report.layers.extend(entries.values())
    apply_skip_rules(mode, sites, entries, opts)
    names = [s.name for s in sites if s.convertible]
    data = FitData()
    if mode.needs_fit_data and names:
        data.inputs = capture_inputs(gm, names, inputs)
        if opts.calibration is not None:
            data.grams = capture_grams(gm, names, opts.calibration)
    if opts.mode == "adapter":
        for site in sites:
            if site.convertible:
                layer = mode.make_layer(site, entries[site.name], opts, data)
                set_submodule(gm, site.name, layer)
        gm.recompile()
    else:
        # Every mode but adapter (handled above) builds NdLinear layers.
        rewrite_ndlinear(
            gm, sites, lambda s: cast(NdLinear, mode.make_layer(s, entries[s.name], opts, data))
        )


def _finish(
    result: nn.Module,
    example: ExampleInputs,
    reference: Any,
    report: ConversionReport,
    opts: ConvertOptions,
    mode: Mode,
) -> nn.Module:
    mode.finish(result, opts)
    report.params_after = count_parameters(result)
    if opts.verify:
        verify_outputs(
            result, example, reference, report, strict=mode.strict(opts), eval_mode=False
        )
    result.report = report  # type: ignore[assignment]
    return result


def _shapes_pass(inputs: tuple) -> Pass:
    def annotate_shapes_pass(gm: fx.GraphModule) -> PassResult:
        annotate_shapes(gm, inputs)
        return PassResult(gm, False)

    return annotate_shapes_pass


def optimize(
    gm: fx.GraphModule | nn.Module, example_input: Any, *, optimizer: str = "auto"
) -> fx.GraphModule:
    """Run the exact passes and return the optimized graph module.

    Pipeline (:func:`~ndcompile.passes.runner.run_passes`): inline NdLinear layers
    (ours and the reference package's) as planned contractions, fuse connected linear
    regions into one optimally ordered network each, cancel/compose transposes,
    remove dead code.
    The function is unchanged up to floating-point rounding.

    Args:
        gm: A traced ``GraphModule`` (optimized in place) or an ``nn.Module``
            (traced first; the module itself is not modified).
        example_input: Example input(s), for shapes.
        optimizer: Contraction-order optimizer.

    Returns:
        The optimized ``GraphModule``; ``gm.meta["ndcompile_fused"]`` lists the fused
        regions with FLOPs before/after.
    """
    check_optimizer(optimizer)
    inputs = as_tuple(example_input)
    if not isinstance(gm, fx.GraphModule):
        gm = trace(copy.deepcopy(gm))
    propagate_shapes(gm, inputs)
    optimized, _ = run_passes(
        gm,
        [
            functools.partial(inline_ndlinear, optimizer=optimizer),
            _shapes_pass(inputs),
            functools.partial(fuse_contractions, optimizer=optimizer),
            eliminate_transposes,
            dead_code_elimination,
        ],
    )
    return optimized
