"""Weights on disk: convert a model built on the meta device from its checkpoint.

A model whose parameters live on the meta device (built under
``torch.device("meta")`` or :func:`empty_weights`) costs no memory. ``convert(model,
example, weights="model.safetensors")`` captures and plans it as usual (shapes
are all that needs), reads each replaced layer's weight from the checkpoint only
when its fit runs, and loads the tensors it keeps (embeddings, norms, layers left
dense) straight into the converted copy. The dense model is never in memory at
once: the peak is the converted model plus one layer.

Checkpoints are safetensors files (read one tensor at a time, without a memory
map, so only the tensors kept count as resident memory) or
``torch.save`` state_dicts (``.pt``/``.bin``, opened with ``mmap=True,
weights_only=True``). Keys are the model's ``state_dict`` names; a tied parameter
is found under any of its names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ndcompile.errors import NdCompileError
from ndcompile.frontend.sites import LinearSite
from ndcompile.pipeline.options import ConvertOptions

__all__ = [
    "Checkpoint",
    "empty_weights",
    "fill_from_checkpoint",
    "materialized_site",
    "on_meta",
    "open_weights",
    "tensor_names",
]

SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules with their parameters on the meta device, buffers real.

    Unlike ``with torch.device("meta")``, buffers computed in ``__init__`` (rotary
    frequencies, position ids) keep their values, so a checkpoint that does not hold
    them (non-persistent buffers) still gives a complete model.
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def on_meta(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` that live on the meta device."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in tensors if t.is_meta]


class Checkpoint:
    """Read-only access to a state_dict on disk, one tensor at a time.

    Args:
        path: A ``.safetensors`` file or a ``torch.save`` state_dict.

    Raises:
        NdCompileError: The file is missing, of an unknown kind or not a state_dict.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise NdCompileError(
                f"weights file {str(self.path)!r} does not exist",
                hint="pass the checkpoint of the model's state_dict, e.g. model.safetensors",
            )
        if self.path.suffix not in SUFFIXES:
            raise NdCompileError(
                f"weights file {self.path.name!r} is not {', '.join(SUFFIXES)}",
                hint="save the state_dict with safetensors.torch.save_file or torch.save",
            )
        self._file: Any = None
        self._dict: dict[str, Tensor] = {}
        if self.path.suffix == ".safetensors":
            self._file = SafetensorsFile(self.path)
            self._keys = set(self._file.header)
        else:
            loaded = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
            if not isinstance(loaded, dict) or not all(
                isinstance(v, Tensor) for v in loaded.values()
            ):
                raise NdCompileError(
                    f"weights file {self.path.name!r} does not hold a state_dict of tensors",
                    hint="torch.save(model.state_dict(), path)",
                )
            self._dict, self._keys = loaded, set(loaded)

    def get(self, names: list[str], like: Tensor) -> Tensor:
        """The tensor stored under the first of ``names`` found, as ``like``'s dtype.

        Raises:
            NdCompileError: None of the names is in the file, or the shape differs.
        """
        name = next((n for n in names if n in self._keys), None)
        if name is None:
            raise NdCompileError(
                f"weights file {self.path.name!r} has no tensor {' or '.join(map(repr, names))}",
                layer=names[0],
                hint="pass the checkpoint of this model's state_dict (the same key names)",
            )
        t = self._file.get_tensor(name) if self._file is not None else self._dict[name]
        if tuple(t.shape) != tuple(like.shape):
            raise NdCompileError(
                f"{name!r} in {self.path.name!r} has shape {tuple(t.shape)}, the model "
                f"expects {tuple(like.shape)}",
                layer=name,
                hint="the checkpoint belongs to another configuration of the model",
            )
        return t.to(like.dtype)


#: safetensors dtype names.
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    """A ``.safetensors`` file read one tensor at a time with plain reads.

    No memory map: a tensor's bytes are read into a fresh buffer when asked for, so
    the process holds only the tensors it keeps (a mapped file counts every page it
    touched as resident memory until it is closed).

    Raises:
        NdCompileError: The file is not a safetensors file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = f.read(size) if 0 < size < 100_000_000 else b""
        try:
            header = json.loads(raw)
            assert isinstance(header, dict)
        except (ValueError, AssertionError) as exc:
            raise NdCompileError(
                f"{path.name!r} is not a safetensors file (no valid header)",
                hint="save the state_dict with safetensors.torch.save_file",
            ) from exc
        header.pop("__metadata__", None)
        self.header: dict[str, dict[str, Any]] = header
        self._base = 8 + size

    def get_tensor(self, name: str) -> Tensor:
        """The tensor ``name``, read from the file into its own memory."""
        entry = self.header[name]
        start, end = entry["data_offsets"]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise NdCompileError(f"{name!r} in {self.path.name!r} has dtype {entry['dtype']}")
        with self.path.open("rb") as f:
            f.seek(self._base + start)
            data = bytearray(f.read(end - start))
        if not data:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(entry["shape"])


def tensor_names(model: nn.Module) -> dict[int, list[str]]:
    """``id(tensor)`` -> every state_dict name of it (tied parameters have several)."""
    names: dict[int, list[str]] = {}
    for name, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        names.setdefault(id(t), []).append(name)
    return names


def materialized_site(
    site: LinearSite, model: nn.Module, ckpt: Checkpoint, aliases: dict[int, list[str]]
) -> LinearSite:
    """``site`` with a real ``nn.Linear`` holding the layer's weights from ``ckpt``.

    ``aliases`` is :func:`tensor_names` of ``model`` (computed once per conversion).
    A transformers ``Conv1D`` stores its weight as ``(in, out)``; the Linear gets
    the transpose, as :func:`~ndcompile.frontend.module_sites.conv1d_as_linear` does.
    """
    owner = model.get_submodule(site.name)
    weight, bias = owner.weight, getattr(owner, "bias", None)
    assert isinstance(weight, Tensor)
    stored = ckpt.get(aliases.get(id(weight), [f"{site.name}.weight"]), weight)
    linear = nn.Linear(site.module.in_features, site.module.out_features, bias=bias is not None)
    with torch.no_grad():
        linear.weight = nn.Parameter(
            stored.t() if site.kind == "Conv1D" else stored, requires_grad=weight.requires_grad
        )
        if isinstance(bias, Tensor):
            linear.bias = nn.Parameter(
                ckpt.get(aliases.get(id(bias), [f"{site.name}.bias"]), bias),
                requires_grad=bias.requires_grad,
            )
    return dataclasses.replace(site, module=linear)


def fill_from_checkpoint(model: nn.Module, ckpt: Checkpoint) -> int:
    """Load every tensor of ``model`` still on the meta device from ``ckpt`` (in place).

    Tied parameters stay tied (one tensor, loaded once). Returns how many tensors
    were loaded.

    Raises:
        NdCompileError: A tensor is not in the checkpoint or has another shape.
    """
    aliases = tensor_names(model)
    loaded: dict[int, Tensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is None or not t.is_meta:
                    continue
                full = f"{module_name}.{name}" if module_name else name
                if id(t) not in loaded:
                    value = ckpt.get(aliases.get(id(t), [full]), t)
                    if isinstance(t, nn.Parameter):
                        value = nn.Parameter(value, requires_grad=t.requires_grad)
                    loaded[id(t)] = value
                store[name] = loaded[id(t)]
    return len(loaded)


def open_weights(model: nn.Module, opts: ConvertOptions) -> Checkpoint | None:
    """The checkpoint ``opts.weights`` names, checked against where ``model``'s weights are.

    Raises:
        NdCompileError: Parameters on the meta device and no ``weights=`` (unless
            ``mode="fresh"``, which needs none), or ``weights=`` for a model whose
            weights are all in memory.
    """
    meta = on_meta(model)
    if opts.weights is None:
        # fresh layers need no weights: a meta model converts to a meta model
        if meta and opts.mode != "fresh":
            raise NdCompileError(
                f"{len(meta)} tensors of {type(model).__name__} are on the meta device "
                f"(e.g. {meta[0]!r}): there are no weights to {opts.mode}",
                layer=meta[0],
                hint="pass weights='model.safetensors' (its state_dict) to read them from "
                "disk, or load the weights into the model first",
            )
        return None
    if not meta:
        raise NdCompileError(
            f"weights= is for a model built on the meta device; {type(model).__name__} "
            "already holds its weights",
            hint="drop weights=, or build the model under ndcompile.empty_weights()",
        )
    return Checkpoint(opts.weights)
