"""Restore a saved conversion on the user's architecture, checking the file against it.

A graph conversion is rebuilt by :func:`rebuild_graph` (``convert`` in ``"fresh"``
or ``"exact"`` mode with the recorded shapes, nothing factorized); a module-surgery
conversion by :func:`restore_module` (the recorded layers installed on a copy). Every
mismatch between the file and the model is an
:class:`~ndcompile.errors.NdCompileError` naming the layer.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ndcompile.backends.rebuild import BIAS_NAMES, rebuild_layers
from ndcompile.backends.saved_metadata import REBUILDABLE_MODES
from ndcompile.compress.adapters import freeze_all_but_adapters
from ndcompile.errors import NdCompileError
from ndcompile.frontend.trace import as_tuple
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.pipeline.attention import split_saved
from ndcompile.report import ConversionReport, LayerReport

__all__ = [
    "check_rebuilt",
    "check_tensors",
    "rebuild_failure",
    "rebuild_graph",
    "recorded_example",
    "restore_module",
    "restore_report",
]

_SAME_ARCHITECTURE = "pass the same model architecture that was converted and saved"


def rebuild_failure(model: nn.Module, exc: NdCompileError) -> NdCompileError:
    """The error to raise when the saved conversion cannot be rebuilt on ``model``."""
    return NdCompileError(
        f"cannot rebuild the saved conversion on {type(model).__name__}: {exc}",
        hint=_SAME_ARCHITECTURE,
    )


def _expected_tensors(layer: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    name, rank = layer["name"], int(layer["rank"])
    ins, outs = layer["in_shape"], layer["out_shape"]
    shapes: dict[str, tuple[int, ...]] = {
        f"{name}.factors.{k}": (rank, h, d) for k, (d, h) in enumerate(zip(ins, outs, strict=True))
    }
    if layer["bias"] == "full":
        shapes[f"{name}.bias"] = (math.prod(outs),)
    elif layer["bias"] == "modes":
        shapes.update({f"{name}.mode_biases.{k}": (h,) for k, h in enumerate(outs)})
    lowrank = int(layer.get("lowrank", 0))
    if lowrank:
        shapes[f"{name}.lowrank_u"] = (math.prod(outs), lowrank)
        shapes[f"{name}.lowrank_v"] = (lowrank, math.prod(ins))
    return shapes


def check_tensors(meta: Mapping[str, Any], tensors: Mapping[str, Tensor], where: str) -> None:
    """Check that ``tensors`` hold every NdLinear tensor the metadata records, in its shape."""
    for layer in meta["layers"]:
        for key, shape in _expected_tensors(layer).items():
            if key not in tensors:
                raise NdCompileError(
                    f"tensor {key!r} is missing from {where!r}", layer=layer["name"]
                )
            if tuple(tensors[key].shape) != shape:
                raise NdCompileError(
                    f"tensor {key!r} has shape {tuple(tensors[key].shape)} but the metadata "
                    f"(in_shape={tuple(layer['in_shape'])}, out_shape={tuple(layer['out_shape'])}, "
                    f"rank={layer['rank']}) needs {shape}",
                    layer=layer["name"],
                    hint="the file is inconsistent (edited or truncated); save it again",
                )


def recorded_example(meta: Mapping[str, Any], example_input: Any) -> tuple[Any, ...]:
    """``example_input`` as a tuple, or zeros of the recorded example shapes and dtypes."""
    if example_input is not None:
        return as_tuple(example_input)
    try:
        return tuple(
            torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))
            for spec in meta["example_inputs"]
        )
    except (AttributeError, KeyError, TypeError, RuntimeError) as exc:
        raise NdCompileError(
            f"cannot build an example input from {meta['example_inputs']!r}",
            hint="pass example_input=... to load()",
        ) from exc


def rebuild_graph(model: nn.Module, meta: Mapping[str, Any], inputs: tuple[Any, ...]) -> nn.Module:
    """Convert ``model`` again as the metadata records, without factorizing anything."""
    from ndcompile.pipeline.convert import convert

    layers = [layer for layer in meta["layers"] if layer.get("converted", True)]
    optimizers = {layer.get("optimizer", "auto") for layer in meta["layers"]}
    optimizer = optimizers.pop() if len(optimizers) == 1 else "auto"
    if meta["mode"] not in REBUILDABLE_MODES:
        raise NdCompileError(f"cannot rebuild a conversion of mode {meta['mode']!r}")
    if meta["mode"] == "exact":
        return convert(
            model, inputs, mode="exact", optimizer=optimizer, verify=False, output="graph"
        )
    hybrid = [layer["name"] for layer in layers if layer.get("lowrank", 0)]
    if hybrid:
        raise NdCompileError(
            f"layers {hybrid} carry a low-rank residual (lowrank > 0), which convert() "
            "cannot create in fresh mode",
            hint="save the dense equivalent (ndcompile.backends.dense.to_dense) or the state_dict",
        )
    if not layers:
        return convert(
            model,
            inputs,
            mode="fresh",
            exclude=["*"],
            optimizer=optimizer,
            verify=False,
            output="graph",
        )
    return convert(
        model,
        inputs,
        mode="fresh",
        rank={layer["name"]: int(layer["rank"]) for layer in layers},
        shapes={layer["name"]: (layer["in_shape"], layer["out_shape"]) for layer in layers},
        include=[layer["name"] for layer in layers],
        optimizer=optimizer,
        verify=False,
        output="graph",
    )


def check_rebuilt(gm: nn.Module, meta: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
    """Check that the rebuilt model has the recorded layers and the file's state dict."""
    built = {
        name: {
            "in_shape": list(m.in_shape),
            "out_shape": list(m.out_shape),
            "rank": m.rank,
            "bias": BIAS_NAMES[m.bias_kind],
            "lowrank": int(getattr(m, "lowrank", 0)),
        }
        for name, m in gm.named_modules()
        if isinstance(m, NdLinear)
    }
    recorded = {
        layer["name"]: {
            **{k: layer[k] for k in ("in_shape", "out_shape", "rank", "bias")},
            "lowrank": int(layer.get("lowrank", 0)),
        }
        for layer in meta["layers"]
    }
    for name in sorted(set(built) | set(recorded)):
        if built.get(name) != recorded.get(name):
            raise NdCompileError(
                f"the model rebuilt from the given architecture has {built.get(name)} where "
                f"the file records {recorded.get(name)}",
                layer=name,
                hint=_SAME_ARCHITECTURE,
            )
    _check_state(gm, tensors)


def _check_state(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    state = model.state_dict()
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    wrong = sorted(k for k in set(state) & set(tensors) if state[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        details = [
            f"{k}: model {tuple(state[k].shape)} vs file {tuple(tensors[k].shape)}" for k in wrong
        ]
        raise NdCompileError(
            f"the file does not match the model: missing tensors {missing}, unexpected "
            f"tensors {unexpected}, shape mismatches {details}",
            hint=_SAME_ARCHITECTURE,
        )


def restore_report(
    meta: Mapping[str, Any], fallback: ConversionReport, where: str
) -> ConversionReport:
    """The saved conversion report (``fallback`` when the file's is unreadable)."""
    data: Any = meta.get("report")
    try:
        layers = []
        for entry in data["layers"]:
            entry = dict(entry)
            for key in ("in_shape", "out_shape"):
                if entry.get(key) is not None:
                    entry[key] = tuple(entry[key])
            layers.append(LayerReport(**entry))
        fields = ("mode", "params_before", "params_after", "output_rel_error", "notes")
        extra = {k: data[k] for k in ("output", "options") if k in data}
        report = ConversionReport(layers=layers, **{k: data[k] for k in fields}, **extra)
    except (KeyError, TypeError):
        report = fallback
        report.mode = meta["mode"]
    report.notes = [*report.notes, f"loaded from {where}"]
    return report


def restore_module(
    meta: Mapping[str, Any], tensors: Mapping[str, Tensor], model: nn.Module, where: str
) -> nn.Module:
    """Rebuild a module-surgery conversion: install the recorded layers, load the weights."""
    try:
        rebuilt = copy.deepcopy(model)
        split_saved(rebuilt, tensors)
        rebuilt = rebuild_layers(rebuilt, meta["layers"])
    except NdCompileError as exc:
        raise rebuild_failure(model, exc) from exc
    if meta.get("mode") == "adapter":
        freeze_all_but_adapters(rebuilt)
    _check_state(rebuilt, tensors)
    rebuilt.load_state_dict(tensors, strict=True)
    fallback = ConversionReport(mode=str(meta.get("mode")), output="module")
    rebuilt.report = restore_report(meta, fallback, where)  # type: ignore[assignment]
    return rebuilt
