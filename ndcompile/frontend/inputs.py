"""Example inputs as users call models: positional, keyword, or both.

``convert(model, example)`` accepts what a model's call takes:

- a tensor: ``model(x)``;
- a tuple or list: ``model(*example)`` (positional arguments);
- a dict: ``model(**example)`` (keyword arguments, how Hugging Face models are called);
- a pair ``(args, kwargs)`` of a tuple/list and a dict: ``model(*args, **kwargs)``.

:func:`tensor_leaves` lists every tensor in a model's output, whatever container
holds it (tuples, dicts, dataclasses, ``ModelOutput``), so verification compares
them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ndcompile.errors import NdCompileError, first_line

__all__ = ["ExampleInputs", "describe_value", "example_inputs", "tensor_leaves"]


@dataclass(frozen=True)
class ExampleInputs:
    """Positional and keyword arguments of one model call.

    Attributes:
        args: Positional arguments.
        kwargs: Keyword arguments.
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, model: nn.Module) -> Any:
        """``model(*args, **kwargs)``."""
        return model(*self.args, **self.kwargs)

    def tensors(self) -> list[Tensor]:
        """Every tensor among the arguments."""
        return tensor_leaves((self.args, self.kwargs))

    def failure(self, model: nn.Module, exc: BaseException) -> NdCompileError:
        """The error for ``model`` failing on this example, naming the cause."""
        return NdCompileError(
            f"running the model on the example input {self.describe()} failed: "
            f"{type(exc).__name__}: {first_line(exc)}",
            layer=type(model).__name__,
            hint="give an example input the model accepts: a tensor, a tuple (positional), "
            "a dict (keyword arguments) or (args, kwargs)",
        )

    def describe(self) -> str:
        """A one-line summary of shapes (and non-float32 dtypes), never tensor contents.

        ``[(2, 64)]`` for ``model(x)``; ``{'input_ids': (2, 16) int64}`` for keywords.
        """
        parts = []
        if self.args or not self.kwargs:
            parts.append("[" + ", ".join(describe_value(a) for a in self.args) + "]")
        if self.kwargs:
            items = ", ".join(f"{k!r}: {describe_value(v)}" for k, v in self.kwargs.items())
            parts.append("{" + items + "}")
        return ", ".join(parts)


def describe_value(value: Any) -> str:
    """``(2, 16)`` for a float32 tensor, ``(2, 16) int64`` otherwise; a short repr else."""
    if isinstance(value, Tensor):
        shape = str(tuple(value.shape))
        if value.dtype != torch.float32:
            shape += " " + str(value.dtype).removeprefix("torch.")
        return shape
    if isinstance(value, tuple | list):
        inner = ", ".join(describe_value(v) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe_value(v)}" for k, v in value.items()) + "}"
    text = repr(value)
    return text if len(text) <= 40 else type(value).__name__


def example_inputs(example: Any) -> ExampleInputs:
    """Normalise an example input (tensor, tuple/list, dict or ``(args, kwargs)``).

    Args:
        example: What the model is called with (see the module docstring).

    Returns:
        The call's :class:`ExampleInputs`.

    Raises:
        NdCompileError: If a dict has non-string keys.
    """
    if isinstance(example, ExampleInputs):
        return example
    if (
        isinstance(example, tuple)
        and len(example) == 2
        and isinstance(example[0], tuple | list)
        and isinstance(example[1], Mapping)
    ):
        args, kwargs = tuple(example[0]), dict(example[1])
    elif isinstance(example, Mapping):
        args, kwargs = (), dict(example)
    elif isinstance(example, tuple | list):
        args, kwargs = tuple(example), {}
    else:
        args, kwargs = (example,), {}
    bad = [k for k in kwargs if not isinstance(k, str)]
    if bad:
        raise NdCompileError(
            f"keyword example inputs need string keys, got {bad!r}",
            hint="pass {'input_ids': ids, ...} for model(input_ids=ids, ...)",
        )
    return ExampleInputs(args, kwargs)


def tensor_leaves(value: Any) -> list[Tensor]:
    """Every tensor in ``value``: tensors, sequences, mappings and dataclasses, recursively.

    ``ModelOutput`` (a mapping) and user dataclasses are looked into; other objects
    (caches, strings, numbers) hold no tensors this looks for.
    """
    out: list[Tensor] = []
    _collect(value, out, set())
    return out


def _collect(value: Any, out: list[Tensor], seen: set[int]) -> None:
    if isinstance(value, Tensor):
        out.append(value)
        return
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, Mapping):
        for v in value.values():
            _collect(v, out, seen)
    elif isinstance(value, tuple | list):
        for v in value:
            _collect(v, out, seen)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _collect(getattr(value, f.name, None), out, seen)


def detached(value: Any) -> Any:
    """``value`` with every tensor detached (containers rebuilt where they are plain)."""
    if isinstance(value, Tensor):
        return value.detach()
    return torch.utils._pytree.tree_map(lambda v: v.detach() if isinstance(v, Tensor) else v, value)
