"""``ndcompile.convert``: trace, find Linear sites, rewrite, verify, report."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.infra.pass_manager import PassManager

from ndcompile.compress.hybrid import budget_layer
from ndcompile.compress.layer_fits import capture_grams, capture_inputs, factorized_layer
from ndcompile.errors import NdCompileError, UntraceableError
from ndcompile.frontend.partial import convert_partially
from ndcompile.frontend.sites import LinearSite, ShapeOverrides, find_linear_sites
from ndcompile.frontend.trace import (
    as_tuple,
    is_reference_ndlinear,
    propagate_shapes,
    run_reference,
    trace,
)
from ndcompile.ir.network import check_optimizer
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.passes import (
    annotate_shapes,
    dead_code_elimination,
    eliminate_transposes,
    fuse_contractions,
    inline_ndlinear,
    rewrite_ndlinear,
)
from ndcompile.pipeline.checks import (
    count_parameters,
    exact_entries,
    fill_layer_stats,
    layer_entry,
    relative_error,
    verify_outputs,
)
from ndcompile.report import ConversionReport

__all__ = ["MODES", "convert", "optimize", "relative_error"]

MODES = ("fresh", "exact", "factorize", "adapter")


def convert(
    model: nn.Module,
    example_input: Any,
    *,
    mode: str = "fresh",
    rank: int | Mapping[str, int] | None = None,
    tol: float | None = None,
    budget: float | None = None,
    max_rank: int = 64,
    shapes: ShapeOverrides | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    calibration: Iterable[Any] | None = None,
    n_modes: int = 2,
    min_features: int = 16,
    optimizer: str = "auto",
    autotune: bool = False,
    skip_larger: bool = True,
    alpha: float = 1.0,
    zero_init: bool = True,
    verify: bool = True,
    leaf_modules: Sequence[type[nn.Module]] = (),
    fallback: bool = True,
    _name_prefix: str = "",
) -> fx.GraphModule:
    """Convert ``model``'s dense layers into NdLinear contractions.

    The model is never modified: it is deep-copied, traced with torch.fx, and the
    copy is rewritten. The result is an ``fx.GraphModule`` with a ``report``
    attribute (:class:`~ndcompile.report.ConversionReport`).

    Args:
        model: The model to convert.
        example_input: A tensor (or tuple of tensors) the model accepts.
        mode: ``"fresh"`` (new, trainable NdLinear layers), ``"exact"`` (only
            function-preserving rewrites of NdLinear layers already present) or
            ``"factorize"`` (nearest rank-R Kronecker sum of trained weights) or
            ``"adapter"`` (frozen dense base + trainable NdLinear adapter, NdLinear-LoRA).
        rank: Kronecker rank (``fresh``: default 1; ``factorize``: give ``rank`` or ``tol``),
            or a mapping ``{layer name: rank}`` (unlisted layers get rank 1).
        tol: ``factorize``: smallest rank whose relative weight error is <= tol.
        budget: ``factorize``: parameter budget per layer as a fraction of the dense
            weight (``0.2`` = 20%); the form with the lowest output error among
            Kronecker sums and Kronecker + low-rank hybrids is chosen per layer.
        max_rank: Upper bound of the ``tol`` search.
        shapes: Per-layer overrides ``{"fc1": ((32, 32), (16, 16))}``.
        include: Glob patterns of layer names to convert (default: all).
        exclude: Glob patterns of layer names to keep dense.
        calibration: ``factorize``: an iterable of example inputs; the fit then
            minimises the output error on these activations (activation-aware)
            instead of the weight error.
        n_modes: Modes to split a feature size into when the graph gives none.
        min_features: Layers with fewer input or output features stay dense.
        optimizer: Contraction-order optimizer (see ``ndcompile.ir.network.OPTIMIZERS``).
        alpha: ``adapter``: scale of the adapter update ``ΔW = alpha * (A1 ⊗ ... ⊗ AN)``.
        zero_init: ``adapter``: start with ``ΔW = 0`` so the model is unchanged.
        skip_larger: Keep a layer dense when its factorization would have more
            parameters than the dense layer (otherwise convert it anyway).
        verify: Check the converted model against the original on the example
            input (``exact`` raises if they differ beyond fp tolerance).
        leaf_modules: Extra module types to keep opaque while tracing.
        fallback: If the whole model cannot be traced, convert its largest
            traceable submodules instead (the result is then the model's own class
            with converted children, not a GraphModule) and report what was left.

    Returns:
        The converted ``fx.GraphModule``; ``.report`` describes every layer.

    Raises:
        NdCompileError: On an unknown mode/optimizer, an untraceable model, an
            example input the model rejects, or a failed exact verification.
    """
    if mode not in MODES:
        raise NdCompileError(f"unknown mode {mode!r}; valid modes are: {', '.join(MODES)}")
    check_optimizer(optimizer)
    if mode == "factorize" and rank is None and tol is None and budget is None:
        raise NdCompileError(
            "mode='factorize' needs rank=R, tol=t or budget=b",
            hint="e.g. rank=4, tol=0.1 or budget=0.2",
        )
    if budget is not None and (rank is not None or tol is not None):
        raise NdCompileError("give only one of rank=, tol=, budget=")
    if budget is not None and not 0 < budget <= 1:
        raise NdCompileError(f"budget must be in (0, 1] (a fraction of dense params), got {budget}")
    ranks = rank.values() if isinstance(rank, Mapping) else [rank]
    if any(r is not None and r < 1 for r in ranks):
        raise NdCompileError(f"rank must be >= 1, got {rank}")
    # Options forwarded to per-submodule conversions when the model is not traceable.
    locals_for_fallback = {
        "mode": mode,
        "rank": rank,
        "tol": tol,
        "budget": budget,
        "max_rank": max_rank,
        "include": include,
        "exclude": exclude,
        "calibration": None,
        "n_modes": n_modes,
        "min_features": min_features,
        "optimizer": optimizer,
        "autotune": autotune,
        "skip_larger": skip_larger,
        "alpha": alpha,
        "zero_init": zero_init,
        "verify": False,
        "leaf_modules": leaf_modules,
        "fallback": True,
    }
    if isinstance(model, nn.Linear | NdLinear) or is_reference_ndlinear(model):
        raise NdCompileError(
            f"the model is a bare {type(model).__name__}; convert() rewrites the layers "
            "inside a model",
            layer=type(model).__name__,
            hint="wrap it: ndcompile.convert(nn.Sequential(layer), x)",
        )
    inputs = as_tuple(example_input)
    work = copy.deepcopy(model)
    reference = run_reference(model, inputs) if verify else None
    report = ConversionReport(mode=mode, params_before=count_parameters(model))
    try:
        gm = trace(work, leaf_modules=leaf_modules)
    except UntraceableError as exc:
        if not fallback:
            raise
        options = dict(locals_for_fallback)
        result = convert_partially(
            work,
            inputs,
            lambda name, module, args: convert(
                module, args, **options, shapes=shapes, _name_prefix=f"{_name_prefix}{name}."
            ),
            report,
            str(exc).splitlines()[0],
            name_prefix=_name_prefix,
        )
        if mode == "adapter":
            from ndcompile.compress.adapters import freeze_all_but_adapters

            freeze_all_but_adapters(result)
        report.params_after = count_parameters(result)
        if verify:
            strict = mode == "exact" or (mode == "adapter" and zero_init)
            verify_outputs(result, inputs, reference, report, strict=strict)
        result.report = report  # type: ignore[assignment]
        return result  # type: ignore[return-value]
    propagate_shapes(gm, inputs)

    if mode == "exact":
        gm = optimize(gm, inputs, optimizer=optimizer)
        report.layers.extend(exact_entries(gm))
        for region in gm.meta.get("ndcompile_fused", []):
            report.notes.append(
                f"fused linear region ending at {region.node!r}: {region.contractions} "
                f"contractions, FLOPs {region.flops_before:,} -> {region.flops_after:,}"
            )
    else:
        sites = find_linear_sites(
            gm,
            shapes=shapes,
            include=include,
            exclude=exclude,
            n_modes=n_modes,
            min_features=min_features,
            name_prefix=_name_prefix,
        )
        entries = {site.name: layer_entry(site) for site in sites}
        report.layers.extend(entries.values())
        names = [s.name for s in sites if s.convertible]
        acts = capture_inputs(gm, names, inputs) if mode == "factorize" else {}
        grams = (
            capture_grams(gm, names, calibration)
            if mode == "factorize" and calibration is not None
            else {}
        )

        def make_layer(site: LinearSite) -> NdLinear:
            if mode == "fresh":
                layer = _fresh_layer(site, _rank_of(rank, site.name) or 1, optimizer)
            elif budget is not None:
                layer = budget_layer(
                    site,
                    entries[site.name],
                    budget=budget,
                    optimizer=optimizer,
                    x=acts.get(site.name),
                    gram=grams.get(site.name),
                )
            else:
                layer = factorized_layer(
                    site,
                    entries[site.name],
                    rank=_rank_of(rank, site.name),
                    tol=tol,
                    max_rank=max_rank,
                    optimizer=optimizer,
                    x=acts.get(site.name),
                    gram=grams.get(site.name),
                )
            fill_layer_stats(entries[site.name], layer, site, autotune)
            return layer

        for site in sites:
            if site.convertible and mode == "factorize" and budget is not None:
                smallest = sum(h * d for h, d in zip(site.out_shape, site.in_shape, strict=True))
                allowed = budget * site.module.in_features * site.module.out_features
                if smallest > allowed:
                    site.skip_reason = entries[site.name].reason = (
                        f"one Kronecker term ({smallest:,} params) exceeds the budget "
                        f"({int(allowed):,} = {budget:g} of the dense weight)"
                    )
            elif site.convertible and mode == "factorize" and skip_larger:
                r = _rank_of(rank, site.name) or 1
                after = r * sum(h * d for h, d in zip(site.out_shape, site.in_shape, strict=True))
                if after >= site.module.in_features * site.module.out_features:
                    site.skip_reason = entries[site.name].reason = (
                        f"rank {r} factors ({after:,} params) are not smaller than the dense "
                        f"weight ({site.module.weight.numel():,}); pass skip_larger=False to force"
                    )
        if mode == "adapter":
            from ndcompile.compress.adapters import apply_adapters

            apply_adapters(
                gm,
                sites,
                entries,
                rank=rank if isinstance(rank, Mapping) else (rank or 1),
                alpha=alpha,
                zero_init=zero_init,
                optimizer=optimizer,
            )
        else:
            rewrite_ndlinear(gm, sites, make_layer)
    dead_code_elimination(gm)
    report.params_after = count_parameters(gm)
    if verify:
        strict = mode == "exact" or (mode == "adapter" and zero_init)
        verify_outputs(gm, inputs, reference, report, strict=strict)
    gm.report = report  # type: ignore[assignment]
    # GraphModule.__deepcopy__ keeps attributes listed here.
    gm.meta.setdefault("_user_preserved_attributes", {})["report"] = report
    return gm


def _shapes_pass(inputs: tuple) -> Callable[[fx.GraphModule], PassResult]:
    def annotate(gm: fx.GraphModule) -> PassResult:
        annotate_shapes(gm, inputs)
        return PassResult(gm, False)

    return annotate


def optimize(
    gm: fx.GraphModule | nn.Module, example_input: Any, *, optimizer: str = "auto"
) -> fx.GraphModule:
    """Run the exact passes and return the optimized graph module.

    Pipeline (a ``PassManager``): inline NdLinear layers (ours and the reference
    package's) as planned contractions, fuse connected linear regions into one
    optimally ordered network each, cancel/compose transposes, remove dead code.
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
    manager = PassManager(
        passes=[
            functools.partial(inline_ndlinear, optimizer=optimizer),
            _shapes_pass(inputs),
            functools.partial(fuse_contractions, optimizer=optimizer),
            eliminate_transposes,
            dead_code_elimination,
        ],
        steps=1,
    )
    return manager(gm).graph_module


def _rank_of(rank: int | Mapping[str, int] | None, name: str) -> int | None:
    """The rank for layer ``name``: a global rank or a per-layer mapping (default 1)."""
    if isinstance(rank, Mapping):
        return int(rank.get(name, 1))
    return rank


def _fresh_layer(site: LinearSite, rank: int, optimizer: str) -> NdLinear:
    w = site.module.weight
    return NdLinear(
        site.in_shape,
        site.out_shape,
        rank=rank,
        bias=site.module.bias is not None,
        optimizer=optimizer,
        device=w.device,
        dtype=w.dtype,
    )
