"""``ndcompile.convert``: capture, find Linear sites, rewrite, verify, report.

``convert`` validates its options once (:class:`~ndcompile.pipeline.options.ConvertOptions`)
and dispatches on ``output``: module surgery on a copy of the model
(:mod:`ndcompile.pipeline.surgery`, the default) or a torch.fx graph rewrite
(:func:`~ndcompile.pipeline.graph_rewrite.convert_graph`). Both ask the same mode strategy
(:mod:`ndcompile.pipeline.modes`) which layers to convert and how.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from ndcompile.errors import NdCompileError, UntraceableError
from ndcompile.frontend.inputs import example_inputs
from ndcompile.frontend.sites import ShapeOverrides
from ndcompile.frontend.trace import is_reference_ndlinear
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.pipeline.checks import relative_error
from ndcompile.pipeline.graph_rewrite import convert_graph
from ndcompile.pipeline.options import MODES, ConvertOptions
from ndcompile.pipeline.surgery import convert_module
from ndcompile.report import ConversionReport

__all__ = ["MODES", "ConvertOptions", "convert", "relative_error"]


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
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    calibration: Iterable[Any] | None = None,
    n_modes: int = 2,
    min_features: int = 16,
    optimizer: str = "auto",
    autotune: bool | str = False,
    skip_larger: bool = True,
    alpha: float = 1.0,
    zero_init: bool = True,
    verify: bool = True,
    leaf_modules: Sequence[type[nn.Module]] = (),
    fallback: bool = True,
    output: str = "auto",
    progress: bool = False,
    distributed: bool = False,
    weights: str | os.PathLike[str] | None = None,
    options: ConvertOptions | None = None,
) -> nn.Module:
    """Convert ``model``'s dense layers into NdLinear contractions.

    The model is never modified: a deep copy is converted. By default
    (``output="module"``) the copy keeps the model's own class and every converted
    layer becomes an :class:`~ndcompile.layers.ndlinear.NdLinear` (or adapter) at
    the same qualified name; the layers are found by capturing the model with
    ``torch.export`` (forward hooks where export fails), so models torch.fx cannot
    trace (Hugging Face transformers, ...) convert too. ``output="graph"`` traces
    with torch.fx and returns an ``fx.GraphModule`` with the contractions emitted
    as explicit ops (and, in ``exact`` mode, fused linear regions). The result has
    a ``report`` attribute (:class:`~ndcompile.report.ConversionReport`).

    Args:
        model: The model to convert.
        example_input: How the model is called: a tensor, a tuple (positional
            arguments), a dict (keyword arguments, e.g. ``{"input_ids": ids}``) or
            ``(args, kwargs)``.
        mode: ``"fresh"`` (new, trainable NdLinear layers), ``"exact"`` (only
            function-preserving rewrites of NdLinear layers already present),
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
        include: Glob pattern(s) of layer names to convert (default: all).
        exclude: Glob pattern(s) of layer names to keep dense.
        calibration: ``factorize``: an iterable of example inputs; the fit then
            minimises the output error on these activations (activation-aware)
            instead of the weight error.
        n_modes: Modes to split a feature size into when the input gives none.
        min_features: Layers with fewer input or output features stay dense.
        optimizer: Contraction-order optimizer (see ``ndcompile.ir.network.OPTIMIZERS``).
        autotune: Time the best candidate plans of each layer on the example's shapes
            (``True``: eagerly; ``"inductor"``: compiled by inductor, for a model that
            will run under ``torch.compile``; ``"eager-train"``/``"inductor-train"``:
            forward and backward, for a model that will be trained) instead of
            trusting the cost model.
        skip_larger: Keep a layer dense when its factorization would have more
            parameters than the dense layer (otherwise convert it anyway).
        alpha: ``adapter``: scale of the adapter update ``ΔW = alpha * (A1 ⊗ ... ⊗ AN)``.
        zero_init: ``adapter``: start with ``ΔW = 0`` so the model is unchanged.
        verify: Check the converted model against the original on the example
            input (both in eval mode; ``exact`` and zero-init ``adapter`` raise if
            they differ beyond fp tolerance).
        leaf_modules: ``output="graph"``: extra module types to keep opaque while tracing.
        fallback: ``output="graph"``: if the whole model cannot be traced, convert its
            largest traceable submodules instead and report what was left.
        output: ``"module"`` (the user's class, layers swapped), ``"graph"`` (an
            ``fx.GraphModule``; needs a model torch.fx can trace) or ``"auto"``
            (module, except ``exact`` mode on a traceable model: region fusion
            needs the graph).
        progress: Show a progress bar (layers done / total, ETA; needs ``tqdm``)
            while layers are fitted.
        distributed: Share the per-layer fits over the processes of the initialised
            ``torch.distributed`` group (rank ``i`` fits layers ``i, i + world, ...``;
            the fitted layers are broadcast, so every process returns the whole
            model). Every process must call ``convert`` with the same arguments.
        weights: For a model built on the meta device (``ndcompile.empty_weights()``
            or ``torch.device("meta")``): its state_dict on disk (``.safetensors``,
            or a ``torch.save`` file). Each replaced layer's weights are read when its
            fit runs and the layers kept are loaded into the result, so the dense
            model is never in memory; the result is checked to run on the example
            (the original cannot run, so it is not compared).
        options: A prepared :class:`ConvertOptions` (then the keyword options above
            are ignored).

    Returns:
        The converted model; ``.report`` describes every Linear-like layer.

    Raises:
        NdCompileError: On invalid options, an example input the model rejects, or a
            failed verification.
    """
    if options is None:
        options = ConvertOptions(
            mode=mode,
            rank=rank,
            tol=tol,
            budget=budget,
            max_rank=max_rank,
            shapes=shapes,
            include=include,  # type: ignore[arg-type]
            exclude=exclude,  # type: ignore[arg-type]
            calibration=calibration,
            n_modes=n_modes,
            min_features=min_features,
            optimizer=optimizer,
            autotune=autotune,
            skip_larger=skip_larger,
            alpha=alpha,
            zero_init=zero_init,
            verify=verify,
            leaf_modules=tuple(leaf_modules),
            fallback=fallback,
            output=output,
            progress=progress,
            distributed=distributed,
            weights=None if weights is None else os.fspath(weights),
        )
    if isinstance(model, nn.Linear | NdLinear) or is_reference_ndlinear(model):
        raise NdCompileError(
            f"the model is a bare {type(model).__name__}; convert() rewrites the layers "
            "inside a model",
            layer=type(model).__name__,
            hint="wrap it: ndcompile.convert(nn.Sequential(layer), x)",
        )
    if not isinstance(model, nn.Module):
        raise NdCompileError(
            f"convert() takes an nn.Module, got {type(model).__name__}",
            hint="pass the model object (a torch.nn.Module)",
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise NdCompileError(
            f"{type(model).__name__} is a TorchScript module: its layers cannot be replaced",
            layer=type(model).__name__,
            hint="convert the Python model before torch.jit.script/trace",
        )
    example = example_inputs(example_input)
    if (
        options.output == "auto"
        and options.mode == "exact"
        and not example.kwargs
        and options.weights is None
    ):
        try:
            return convert_graph(model, example, dataclasses.replace(options, fallback=False))
        except UntraceableError as exc:
            converted = convert_module(model, example, options)
            cast(ConversionReport, converted.report).notes.insert(
                0, f"not traceable with torch.fx ({str(exc).splitlines()[0]}): converted modules"
            )
            return converted
    if options.output == "graph":
        return convert_graph(model, example, options)
    return convert_module(model, example, options)
