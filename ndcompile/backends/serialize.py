"""Save and load converted models: safetensors weights plus a description of every layer.

:func:`save` writes the converted model's ``state_dict`` with
``safetensors.torch.save_file`` and one metadata entry, ``"ndcompile"``, a JSON
string (safetensors metadata values must be strings) describing the format, the
ndcompile version, the conversion mode, the example input and every NdLinear
(qualified name, in/out modes, rank, bias kind, plan optimizer).

:func:`load` rebuilds the converted model from the original architecture without
factorizing anything: it calls :func:`ndcompile.convert` in ``"fresh"`` mode with
the recorded shapes (or ``"exact"`` mode for files from an exact conversion),
then loads the weights with ``strict=True``. Every mismatch between the file and
the model is an :class:`~ndcompile.errors.NdCompileError` naming the layer.

Example::

    save(converted, "model.safetensors")
    restored = load("model.safetensors", MyModel())
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from ndcompile.backends.rebuild import layer_specs, rebuild_layers
from ndcompile.compress.adapters import freeze_all_but_adapters
from ndcompile.errors import NdCompileError
from ndcompile.fileio import atomic_write
from ndcompile.frontend.trace import as_tuple
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.pipeline.attention import split_saved
from ndcompile.report import ConversionReport, LayerReport, report_of

__all__ = ["FORMAT", "FORMAT_VERSION", "METADATA_KEY", "load", "read_metadata", "save"]

#: Identifies ndcompile files.
FORMAT = "ndcompile.safetensors"
#: Version of the metadata layout written by :func:`save`.
FORMAT_VERSION = 1
#: Versions :func:`load` understands.
SUPPORTED_VERSIONS = (1,)
#: The safetensors metadata key holding the JSON description.
METADATA_KEY = "ndcompile"

_BIAS_NAMES = {True: "full", False: "none", "modes": "modes"}
#: Conversion modes :func:`load` can rebuild.
REBUILDABLE_MODES = ("fresh", "factorize", "exact")
_INSTALL_HINT = 'install safetensors: pip install -e ".[dev]"'


def _safetensors() -> Any:
    try:
        import safetensors.torch as st
    except ImportError as exc:
        raise NdCompileError("saving needs the 'safetensors' package", hint=_INSTALL_HINT) from exc
    return st


def _version() -> str:
    from ndcompile import __version__

    return __version__


def _input_specs(converted: nn.Module, example_input: Any) -> list[dict[str, Any]]:
    if example_input is not None:
        tensors = as_tuple(example_input)
        if not all(isinstance(t, Tensor) for t in tensors):
            raise NdCompileError("example_input must be a tensor or a tuple of tensors")
        return [
            {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in tensors
        ]
    if not isinstance(converted, fx.GraphModule):
        raise NdCompileError(
            f"{type(converted).__name__} is a partially converted model: its input shapes "
            "are not recorded",
            hint="pass example_input=... to save()",
        )
    specs = []
    for node in converted.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None:
            raise NdCompileError(
                f"the graph input {node.name!r} has no recorded shape",
                hint="pass example_input=... to save()",
            )
        specs.append({"shape": list(meta.shape), "dtype": str(meta.dtype).removeprefix("torch.")})
    return specs


def _layer_specs(converted: nn.Module, report: ConversionReport) -> list[dict[str, Any]]:
    rewritten = {e.name for e in report.converted}
    layers = []
    for name, module in converted.named_modules():
        if isinstance(module, NdLinear):
            layers.append(
                {
                    "name": name,
                    "in_shape": list(module.in_shape),
                    "out_shape": list(module.out_shape),
                    "rank": module.rank,
                    "bias": _BIAS_NAMES[module.bias_kind],
                    "lowrank": int(getattr(module, "lowrank", 0)),
                    "optimizer": module.optimizer,
                    "converted": name in rewritten,
                }
            )
    return layers


def _tensors(converted: nn.Module) -> dict[str, Tensor]:
    """The state dict as contiguous CPU tensors; tied entries get their own copy."""
    out: dict[str, Tensor] = {}
    storages: set[int] = set()
    for key, value in converted.state_dict().items():
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save(converted: nn.Module, path: str | os.PathLike, *, example_input: Any = None) -> Path:
    """Write a converted model's weights and layer description to a safetensors file.

    Args:
        converted: A model returned by :func:`ndcompile.convert` (or :func:`load`):
            a GraphModule, or the model's own class when only submodules were
            traceable (then ``example_input`` is required).
        path: Destination file (conventionally ``*.safetensors``).
        example_input: The example input to record; by default the shapes recorded
            in the graph's inputs at conversion time.

    Returns:
        The path written.

    Raises:
        NdCompileError: If ``converted`` carries no conversion report, or the
            input shapes are unknown.
    """
    report = getattr(converted, "report", None)
    if not isinstance(report, ConversionReport):
        raise NdCompileError(
            f"save expects a model returned by ndcompile.convert, got "
            f"{type(converted).__name__} without a conversion report",
            hint="for a plain module use torch.save(model.state_dict(), ...)",
        )
    if not Path(path).parent.is_dir():
        raise NdCompileError(
            f"cannot save to {os.fspath(path)!r}: the folder {os.fspath(Path(path).parent)!r} "
            "does not exist",
            hint="create the folder first",
        )
    module_output = report.output == "module"
    if report.mode not in REBUILDABLE_MODES and not module_output:
        raise NdCompileError(
            f"save handles graph conversions of modes {list(REBUILDABLE_MODES)}, not "
            f"{report.mode!r}",
            hint="convert with output='module' (the default), or use "
            "ndcompile.compress.adapters.adapter_state_dict",
        )
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ndcompile_version": _version(),
        "torch_version": torch.__version__.split("+")[0],
        "mode": report.mode,
        "output": report.output,
        "example_inputs": (
            []
            if module_output and example_input is None
            else _input_specs(converted, example_input)
        ),
        "layers": layer_specs(converted) if module_output else _layer_specs(converted, report),
        "report": report.to_dict(),
    }
    dest = Path(path)
    tensors, metadata = _tensors(converted), {METADATA_KEY: json.dumps(meta, default=str)}
    atomic_write(
        dest, lambda tmp: _safetensors().save_file(tensors, os.fspath(tmp), metadata=metadata)
    )
    return dest


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The validated ndcompile description stored in ``path``.

    Raises:
        NdCompileError: If the file is missing, not safetensors, has no ndcompile
            metadata, or has an unknown format version.
    """
    _safetensors()
    from safetensors import safe_open

    where = os.fspath(path)
    if not os.path.isfile(where):
        raise NdCompileError(f"no such file: {where!r}")
    try:
        with safe_open(where, framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:
        raise NdCompileError(f"{where!r} is not a readable safetensors file: {exc}") from exc
    if raw is None:
        raise NdCompileError(
            f"{where!r} has no {METADATA_KEY!r} metadata: it was not written by ndcompile.save"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise NdCompileError(f"{where!r}: ndcompile metadata is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise NdCompileError(f"{where!r}: metadata format is not {FORMAT!r}")
    version = meta.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise NdCompileError(
            f"{where!r} has format version {version!r}; this ndcompile "
            f"({_version()}) reads versions {list(SUPPORTED_VERSIONS)}",
            hint="load it with the ndcompile version that wrote it "
            f"({meta.get('ndcompile_version', 'unknown')})",
        )
    for key in ("mode", "example_inputs", "layers"):
        if key not in meta:
            raise NdCompileError(f"{where!r}: metadata lacks {key!r}")
    if not isinstance(meta["layers"], list):
        raise NdCompileError(f"{where!r}: metadata 'layers' is not a list")
    if meta.get("output") != "module":  # module files are checked by rebuild_layers
        for layer in meta["layers"]:
            _check_layer_entry(layer)
    return meta


def _check_layer_entry(layer: Any) -> None:
    try:
        name = str(layer["name"])
        ins, outs = (
            tuple(int(d) for d in layer["in_shape"]),
            tuple(int(h) for h in layer["out_shape"]),
        )
        rank = int(layer["rank"])
        lowrank = int(layer.get("lowrank", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise NdCompileError(f"malformed layer entry in metadata: {layer!r}") from exc
    if len(ins) != len(outs) or not ins or min(ins + outs) < 1 or rank < 1 or lowrank < 0:
        raise NdCompileError(
            f"invalid shapes {ins} -> {outs}, rank {rank} or lowrank {lowrank}", layer=name
        )
    if layer.get("bias") not in _BIAS_NAMES.values():
        raise NdCompileError(f"unknown bias kind {layer.get('bias')!r}", layer=name)


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


def _check_tensors(meta: Mapping[str, Any], tensors: Mapping[str, Tensor], where: str) -> None:
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


def _example(meta: Mapping[str, Any], example_input: Any) -> tuple[Any, ...]:
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


def _rebuild(model: nn.Module, meta: Mapping[str, Any], inputs: tuple[Any, ...]) -> nn.Module:
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


def _check_rebuilt(gm: nn.Module, meta: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
    built = {
        name: {
            "in_shape": list(m.in_shape),
            "out_shape": list(m.out_shape),
            "rank": m.rank,
            "bias": _BIAS_NAMES[m.bias_kind],
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
                hint="pass the same model architecture that was converted and saved",
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
            hint="pass the same model architecture that was converted and saved",
        )


def _restore_report(
    meta: Mapping[str, Any], fallback: ConversionReport, where: str
) -> ConversionReport:
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


def load(path: str | os.PathLike, model: nn.Module, example_input: Any = None) -> nn.Module:
    """Rebuild a converted model from ``model``'s architecture and a file from :func:`save`.

    No factorization is run: the NdLinear layers are created with the recorded
    modes and rank and receive the saved weights. ``model`` is not modified.

    Args:
        path: A file written by :func:`save`.
        model: The original (unconverted) architecture; its weights are not used.
        example_input: An input the model accepts; by default zeros of the
            recorded example shapes and dtypes.

    Returns:
        The converted model with the saved weights (a GraphModule, or ``model``'s
        class with converted children when it is not traceable as a whole);
        ``.report`` is the saved conversion report.

    Raises:
        NdCompileError: On a missing or foreign file, an unknown format version,
            metadata that does not match the tensors (edited shapes, missing
            tensors), layers of different ranks, or a model of another architecture.
    """
    where = os.fspath(path)
    meta = read_metadata(where)
    tensors = _safetensors().load_file(where)
    if meta.get("output") == "module":
        return _load_module(meta, tensors, model, where)
    _check_tensors(meta, tensors, where)
    inputs = _example(meta, example_input)
    try:
        gm = _rebuild(model, meta, inputs)
    except NdCompileError as exc:
        raise NdCompileError(
            f"cannot rebuild the saved conversion on {type(model).__name__}: {exc}",
            hint="pass the same model architecture that was converted and saved",
        ) from exc
    _check_rebuilt(gm, meta, tensors)
    gm.load_state_dict(tensors, strict=True)
    gm.report = _restore_report(meta, report_of(gm), where)  # type: ignore[assignment]
    return gm


def _load_module(
    meta: Mapping[str, Any], tensors: Mapping[str, Tensor], model: nn.Module, where: str
) -> nn.Module:
    """Rebuild a module-surgery conversion: install the recorded layers, load the weights."""
    try:
        rebuilt = copy.deepcopy(model)
        split_saved(rebuilt, tensors)
        rebuilt = rebuild_layers(rebuilt, meta["layers"])
    except NdCompileError as exc:
        raise NdCompileError(
            f"cannot rebuild the saved conversion on {type(model).__name__}: {exc}",
            hint="pass the same model architecture that was converted and saved",
        ) from exc
    if meta.get("mode") == "adapter":
        freeze_all_but_adapters(rebuilt)
    _check_state(rebuilt, tensors)
    rebuilt.load_state_dict(tensors, strict=True)
    fallback = ConversionReport(mode=str(meta.get("mode")), output="module")
    rebuilt.report = _restore_report(meta, fallback, where)  # type: ignore[assignment]
    return rebuilt
