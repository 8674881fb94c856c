"""Save and load converted models: safetensors weights plus a description of every layer.

:func:`save` writes the converted model's ``state_dict`` with
``safetensors.torch.save_file`` and one metadata entry, ``"ndcompile"``, a JSON
string (safetensors metadata values must be strings) describing the format, the
ndcompile version, the conversion mode, the example input and every NdLinear
(qualified name, in/out modes, rank, bias kind, plan optimizer); the format is
:mod:`ndcompile.backends.saved_metadata`.

:func:`load` rebuilds the converted model from the original architecture without
factorizing anything: it calls :func:`ndcompile.convert` in ``"fresh"`` mode with
the recorded shapes (or ``"exact"`` mode for files from an exact conversion),
then loads the weights with ``strict=True`` (:mod:`ndcompile.backends.restore`).
Every mismatch between the file and the model is an
:class:`~ndcompile.errors.NdCompileError` naming the layer.

Example::

    save(converted, "model.safetensors")
    restored = load("model.safetensors", MyModel())
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ndcompile.backends.rebuild import layer_specs
from ndcompile.backends.restore import (
    check_rebuilt,
    check_tensors,
    rebuild_failure,
    rebuild_graph,
    recorded_example,
    restore_module,
    restore_report,
)
from ndcompile.backends.saved_metadata import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_KEY,
    REBUILDABLE_MODES,
    graph_layer_specs,
    import_safetensors,
    input_specs,
    ndcompile_version,
    read_metadata,
)
from ndcompile.errors import NdCompileError
from ndcompile.fileio import atomic_write
from ndcompile.report import ConversionReport, report_of

__all__ = ["load", "save"]


def _tensors(converted: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict as contiguous CPU tensors, each shared tensor written once.

    A key whose tensor is exactly an earlier key's (tied weights: same storage,
    offset, shape and strides) becomes an alias of it. Keys that only overlap
    another's memory (different views) get their own copy.

    Returns:
        ``(tensors, aliases)``: the tensors to write, and alias key -> written key.
    """
    out: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, value in converted.state_dict(keep_vars=True).items():
        value = value.detach()
        if value.numel():
            ident = (
                value.device,
                value.untyped_storage().data_ptr(),
                value.storage_offset(),
                tuple(value.shape),
                value.stride(),
                value.dtype,
            )
            if ident in seen:
                aliases[key] = seen[ident]
                continue
            seen[ident] = key
        t = value.cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out, aliases


def _expand_aliases(
    meta: Mapping[str, Any], tensors: dict[str, Tensor], where: str
) -> dict[str, Tensor]:
    """``tensors`` with every alias the metadata records pointing at its written tensor."""
    aliases = meta.get("aliases", {})
    if not isinstance(aliases, dict):
        raise NdCompileError(f"{where!r}: metadata 'aliases' is not a mapping")
    for alias, key in aliases.items():
        if not isinstance(alias, str) or key not in tensors or alias in tensors:
            raise NdCompileError(
                f"{where!r}: alias {alias!r} -> {key!r} does not name a written tensor",
                hint="the file is inconsistent (edited or truncated); save it again",
            )
        tensors[alias] = tensors[key]
    return tensors


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
        "ndcompile_version": ndcompile_version(),
        "torch_version": torch.__version__.split("+")[0],
        "mode": report.mode,
        "output": report.output,
        "example_inputs": (
            [] if module_output and example_input is None else input_specs(converted, example_input)
        ),
        "layers": layer_specs(converted) if module_output else graph_layer_specs(converted, report),
        "report": report.to_dict(),
    }
    dest = Path(path)
    tensors, meta["aliases"] = _tensors(converted)
    metadata = {METADATA_KEY: json.dumps(meta, default=str)}
    atomic_write(
        dest, lambda tmp: import_safetensors().save_file(tensors, os.fspath(tmp), metadata=metadata)
    )
    return dest


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
    tensors = _expand_aliases(meta, import_safetensors().load_file(where), where)
    if meta.get("output") == "module":
        return restore_module(meta, tensors, model, where)
    check_tensors(meta, tensors, where)
    inputs = recorded_example(meta, example_input)
    try:
        gm = rebuild_graph(model, meta, inputs)
    except NdCompileError as exc:
        raise rebuild_failure(model, exc) from exc
    check_rebuilt(gm, meta, tensors)
    gm.load_state_dict(tensors, strict=True)
    gm.report = restore_report(meta, report_of(gm), where)  # type: ignore[assignment]
    return gm
