"""The ndcompile description in a saved safetensors file: its format, writing and validation.

A file written by :func:`ndcompile.save` carries one safetensors metadata entry,
:data:`METADATA_KEY`, a JSON string (safetensors metadata values must be strings)
describing the format, the ndcompile version, the conversion mode, the example
input and every NdLinear. :func:`input_specs` and :func:`graph_layer_specs` write
its parts; :func:`read_metadata` reads it back and checks it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch.fx as fx
from torch import Tensor, nn

from ndcompile.backends.rebuild import BIAS_NAMES
from ndcompile.errors import NdCompileError
from ndcompile.frontend.trace import as_tuple
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.report import ConversionReport

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "REBUILDABLE_MODES",
    "graph_layer_specs",
    "import_safetensors",
    "input_specs",
    "ndcompile_version",
    "read_metadata",
]

#: Identifies ndcompile files.
FORMAT = "ndcompile.safetensors"
#: Version of the metadata layout written by :func:`ndcompile.save`.
#: Version 2 adds "aliases" (state-dict keys of tied tensors, written once).
FORMAT_VERSION = 2
#: Versions :func:`ndcompile.load` understands.
SUPPORTED_VERSIONS = (1, 2)
#: The safetensors metadata key holding the JSON description.
METADATA_KEY = "ndcompile"

#: Conversion modes :func:`ndcompile.load` can rebuild.
REBUILDABLE_MODES = ("fresh", "factorize", "exact")
_INSTALL_HINT = 'install safetensors: pip install -e ".[dev]"'


def import_safetensors() -> Any:
    """The ``safetensors.torch`` module.

    Raises:
        NdCompileError: If safetensors is not installed.
    """
    try:
        import safetensors.torch as st
    except ImportError as exc:
        raise NdCompileError("saving needs the 'safetensors' package", hint=_INSTALL_HINT) from exc
    return st


def ndcompile_version() -> str:
    """The installed ndcompile version (recorded in every file)."""
    from ndcompile import __version__

    return __version__


def input_specs(converted: nn.Module, example_input: Any) -> list[dict[str, Any]]:
    """Shape and dtype of each example input: ``example_input``'s, else the graph's.

    Raises:
        NdCompileError: If ``example_input`` holds a non-tensor, or the shapes are
            not recorded (a partially converted model, a graph input without shape).
    """
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


def graph_layer_specs(converted: nn.Module, report: ConversionReport) -> list[dict[str, Any]]:
    """One entry per NdLinear of a graph conversion (modes, rank, bias, whether converted)."""
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
                    "bias": BIAS_NAMES[module.bias_kind],
                    "lowrank": int(getattr(module, "lowrank", 0)),
                    "optimizer": module.optimizer,
                    "converted": name in rewritten,
                }
            )
    return layers


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The validated ndcompile description stored in ``path``.

    Raises:
        NdCompileError: If the file is missing, not safetensors, has no ndcompile
            metadata, or has an unknown format version.
    """
    import_safetensors()
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
            f"({ndcompile_version()}) reads versions {list(SUPPORTED_VERSIONS)}",
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
    if layer.get("bias") not in BIAS_NAMES.values():
        raise NdCompileError(f"unknown bias kind {layer.get('bias')!r}", layer=name)
