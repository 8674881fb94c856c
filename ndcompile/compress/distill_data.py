"""Distillation data: the batches users have, read as model calls, and several processes.

:func:`read_batches` turns what :func:`ndcompile.distill` is given into a stream of
:class:`Batch` (one model call each, plus optional targets):

- a tensor (or a dict of named tensors sharing their first dim): cut into batches
  of rows;
- a list, tuple or generator of batches, or a ``torch.utils.data.DataLoader``; each
  batch is a tensor (``model(x)``), a dict (``model(**batch)``; ``labels`` /
  ``label`` / ``targets`` keys are taken out as targets), a tuple or list of
  positional inputs, an ``(args, kwargs)`` pair, or ``(inputs, targets)``.

A two-element batch is ``(inputs, targets)`` when the model cannot take both as
positional inputs, when the first is a dict, or when the second looks like class
labels (an integer vector over the rows) and the model's second argument is
optional. Anything else raises one :class:`~ndcompile.errors.NdCompileError` that
lists what is accepted.

When ``torch.distributed`` is initialised, :func:`world` gives this process's rank
and the world size, and the ``all_reduce_*`` helpers sum over processes (no-ops in
one process).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ndcompile.errors import NdCompileError
from ndcompile.frontend.inputs import ExampleInputs, describe_value, example_inputs

__all__ = [
    "ACCEPTED",
    "Batch",
    "all_reduce_",
    "all_reduce_floats",
    "broadcast_parameters",
    "read_batches",
    "rows_per_batch",
    "world",
]

#: What ``data`` may be, for error messages.
ACCEPTED = (
    "a tensor of input rows (cut into batches), a dict of named input tensors, or an "
    "iterable (list, generator, DataLoader) of batches, each a tensor, a tuple of "
    "positional inputs, a dict of keyword inputs, an (args, kwargs) pair or "
    "(inputs, targets)"
)

#: Keys of a dict batch that hold targets, not model inputs.
TARGET_KEYS = ("labels", "label", "targets")


@dataclass(frozen=True)
class Batch:
    """One model call and, optionally, its targets.

    Attributes:
        inputs: The call's positional and keyword arguments.
        targets: What the batch says the model should output (None if it says nothing).
    """

    inputs: ExampleInputs
    targets: Any = None

    def to(self, device: torch.device) -> Batch:
        """The batch with every tensor on ``device``."""
        move = _mover(device)
        return Batch(
            ExampleInputs(move(self.inputs.args), move(self.inputs.kwargs)), move(self.targets)
        )

    def rows(self) -> int:
        """Rows of the batch (first dim of its first tensor; 0 if it has none)."""
        tensors = self.inputs.tensors()
        return int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 0


def _mover(device: torch.device) -> Any:
    def move(value: Any) -> Any:
        return torch.utils._pytree.tree_map(
            lambda v: v.to(device) if isinstance(v, Tensor) else v, value
        )

    return move


def rows_per_batch(rows: int) -> int:
    """Batch size a tensor of ``rows`` rows is cut into: 128, fewer to make 10 batches."""
    return max(1, min(128, math.ceil(rows / 10)))


def _split_rows(data: Tensor | Mapping[str, Tensor], batch_size: int | None) -> list[Any]:
    tensors = [data] if isinstance(data, Tensor) else list(data.values())
    if not tensors or any(not isinstance(t, Tensor) or t.dim() == 0 for t in tensors):
        raise NdCompileError(
            f"data {describe_value(data)} has no rows to cut into batches", hint=f"pass {ACCEPTED}"
        )
    rows = int(tensors[0].shape[0])
    if any(int(t.shape[0]) != rows for t in tensors):
        raise NdCompileError(
            f"the named input tensors {describe_value(data)} do not share their first (row) dim",
            hint="give every input the same number of rows",
        )
    size = batch_size or rows_per_batch(rows)
    if isinstance(data, Tensor):
        return list(data.split(size))
    keys = list(data)
    return [
        dict(zip(keys, parts, strict=True))
        for parts in zip(*(t.split(size) for t in tensors), strict=True)
    ]


def _signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return None


def _binds(sig: inspect.Signature | None, *args: Any) -> bool:
    if sig is None:
        return True
    try:
        sig.bind(*args)
    except TypeError:
        return False
    return True


def _looks_like_labels(inputs: Any, second: Any) -> bool:
    """An integer vector with one entry per row of the inputs."""
    first = inputs if isinstance(inputs, Tensor) else None
    return (
        first is not None
        and isinstance(second, Tensor)
        and second.dim() == 1
        and not second.is_floating_point()
        and not second.is_complex()
        and first.dim() >= 2
        and second.shape[0] == first.shape[0]
    )


def _second_is_optional(sig: inspect.Signature | None) -> bool:
    if sig is None:
        return False
    params = [
        p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(params) >= 2 and params[1].default is not inspect.Parameter.empty


def _as_batch(raw: Any, sig: inspect.Signature | None) -> tuple[Batch, str]:
    """One raw batch as a model call; also says how it was read."""
    if isinstance(raw, Tensor):
        return Batch(ExampleInputs((raw,), {})), "tensor"
    if isinstance(raw, Mapping):
        kwargs = {k: v for k, v in raw.items() if k not in TARGET_KEYS}
        targets = next((raw[k] for k in TARGET_KEYS if k in raw), None)
        kind = "dict" + (" (targets taken out)" if targets is not None else "")
        return Batch(example_inputs(kwargs), targets), kind
    if isinstance(raw, tuple | list) and raw:
        if len(raw) == 2 and isinstance(raw[0], tuple | list) and isinstance(raw[1], Mapping):
            return Batch(example_inputs(tuple(raw))), "(args, kwargs)"
        if len(raw) == 2 and (
            isinstance(raw[0], Mapping)
            or not _binds(sig, *raw)
            or (_looks_like_labels(raw[0], raw[1]) and _second_is_optional(sig))
        ):
            inputs, _ = _as_batch(raw[0], sig)
            return Batch(inputs.inputs, raw[1]), "(inputs, targets)"
        if all(not isinstance(v, Mapping) for v in raw):
            return Batch(ExampleInputs(tuple(raw), {})), "positional inputs"
    raise NdCompileError(
        f"cannot read the batch {describe_value(raw)} as model inputs", hint=f"pass {ACCEPTED}"
    )


def read_batches(
    data: Any, model: nn.Module, *, batch_size: int | None = None
) -> tuple[Iterator[Batch], dict[str, str]]:
    """The batches of ``data`` as model calls, lazily, and how they were read.

    Args:
        data: What :func:`ndcompile.distill` accepts (see the module docstring).
        model: The model the batches are for (its ``forward`` signature decides
            whether a pair is two inputs or ``(inputs, targets)``).
        batch_size: Rows per batch when ``data`` is a tensor or a dict of tensors
            (default: :func:`rows_per_batch`).

    Returns:
        An iterator of :class:`Batch` and a dict the iterator fills with ``"format"``
        (how the first batch was read, e.g. ``"(inputs, targets)"``) and ``"source"``.

    Raises:
        NdCompileError: If ``data`` or one of its batches is none of the accepted forms.
    """
    if isinstance(data, Tensor | Mapping):
        source = f"{'tensor' if isinstance(data, Tensor) else 'dict'} {describe_value(data)}"
        data = _split_rows(data, batch_size)
    elif isinstance(data, Iterable) and not isinstance(data, str | bytes):
        source = type(data).__name__
    else:
        raise NdCompileError(
            f"data of type {type(data).__name__} holds no input batches", hint=f"pass {ACCEPTED}"
        )
    sig = _signature(model)
    info = {"source": source, "format": "none"}

    def stream() -> Iterator[Batch]:
        for i, raw in enumerate(data):
            batch, kind = _as_batch(raw, sig)
            if i == 0:
                info["format"] = kind
            yield batch

    return stream(), info


# --------------------------------------------------------------------------- processes
def world() -> tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` unless ``torch.distributed`` is initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over processes in place (a no-op in one process); returns it."""
    if world()[1] > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def all_reduce_floats(values: list[float]) -> list[float]:
    """Sums of ``values`` over processes (the values themselves in one process)."""
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def broadcast_parameters(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process (a no-op in one process)."""
    if world()[1] == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(t.data, src=0)
