"""``--distill`` input files: a tensor, a list of batches, or a dict of named input tensors.

Files are read with ``torch.load(weights_only=True)`` (or safetensors): nothing is
unpickled beyond tensors and plain containers. Distillation holds out some batches
to measure the error, so the data is cut into at least two batches.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ndcompile.cli.loading import UsageError, load_tensor_file

__all__ = ["DISTILL_FORMATS", "forward_input_names", "load_distill_data", "split_rows"]

#: What ``--distill`` accepts, for error messages.
DISTILL_FORMATS = (
    "a tensor of input rows (torch.save(x, 'data.pt')), a list of input batches, or a dict "
    "of named input tensors with the same number of rows ({'x': x} or .safetensors)"
)


def forward_input_names(model: nn.Module) -> list[str]:
    """Names of the positional inputs of ``model.forward``, in order."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds]


def split_rows(inputs: tuple[Tensor, ...], batch_rows: int) -> list[tuple[Tensor, ...]]:
    """Cut inputs sharing their first dim into batches of ``batch_rows`` rows (at least two).

    Raises:
        UsageError: If the inputs have fewer than two rows.
    """
    rows = inputs[0].shape[0]
    if rows < 2:
        raise UsageError(
            f"--distill data has {rows} row{'s' if rows != 1 else ''}; it needs at least 2 "
            "(some rows are held out to measure the error)"
        )
    size = min(max(batch_rows, 1), math.ceil(rows / 2))
    return list(zip(*(t.split(size) for t in inputs), strict=True))


def _from_mapping(
    data: Mapping[str, Any], name: str, input_names: list[str], batch_rows: int
) -> list[tuple[Tensor, ...]]:
    unknown = [k for k in data if k not in input_names]
    missing = [k for k in input_names if k not in data]
    if unknown or missing:
        keys = sorted(data)
        shown = keys[:4] + (["..."] if len(keys) > 4 else [])
        raise UsageError(
            f"--distill file {name!r} holds a dict with keys {shown}, but the model's forward "
            f"takes {input_names}",
            hint=f"key the input tensors by the forward's argument names; --distill expects "
            f"{DISTILL_FORMATS}",
        )
    inputs = tuple(data[k] for k in input_names)
    rows = {k: t.shape[0] if t.dim() else 0 for k, t in zip(input_names, inputs, strict=True)}
    if len(set(rows.values())) != 1 or 0 in rows.values():
        raise UsageError(
            f"--distill file {name!r}: the input tensors must share their first (batch) dim, "
            f"got rows {rows}"
        )
    return split_rows(inputs, batch_rows)


def load_distill_data(
    path: str | os.PathLike[str], *, batch_rows: int, input_names: list[str]
) -> list[tuple[Tensor, ...]]:
    """The ``--distill`` batches (tuples of model inputs) from ``path``.

    Args:
        path: A ``torch.save`` file or ``.safetensors`` file.
        batch_rows: Rows per batch when the file holds whole tensors (the example
            input's batch size); fewer when the data would not make two batches.
        input_names: The model's forward inputs, to order a dict of named tensors.

    Raises:
        UsageError: If the file is missing, unreadable, needs unpickling, or holds
            something other than :data:`DISTILL_FORMATS`.
    """
    name = str(path)
    if not Path(path).is_file():
        raise UsageError(f"--distill file {name!r} does not exist")
    data = load_tensor_file(Path(path))
    if isinstance(data, Tensor):
        if data.dim() == 0:
            raise UsageError(f"--distill file {name!r} holds a scalar, not input rows")
        return split_rows((data,), batch_rows)
    if isinstance(data, list | tuple) and data and all(isinstance(t, Tensor) for t in data):
        if len(data) == 1:
            return split_rows((data[0],), batch_rows)
        return [(t,) for t in data]
    if (
        isinstance(data, list | tuple)
        and len(data) > 1
        and all(isinstance(b, list | tuple) and all(isinstance(t, Tensor) for t in b) for b in data)
    ):
        return [tuple(b) for b in data]
    if isinstance(data, Mapping) and data and all(isinstance(v, Tensor) for v in data.values()):
        return _from_mapping(data, name, input_names, batch_rows)
    found = type(data).__name__ + (
        " (empty)" if isinstance(data, list | tuple | dict) and not data else ""
    )
    raise UsageError(
        f"--distill file {name!r} holds a {found}; expected {DISTILL_FORMATS}",
    )
