"""Example inputs for the command line: random tensors of given shapes, or a file of inputs.

``--example-shape 2,16 --example-dtype long`` makes random token ids in
``[0, --example-high)`` (default: the model's ``config.vocab_size`` when it has one);
``--example-shape input_ids=2,16`` passes the tensor as a keyword argument.
``--example FILE`` reads a ``.pt`` (``torch.load(weights_only=True)``) or
``.safetensors`` file: a dict of named tensors becomes keyword arguments, a tensor
or a list of tensors positional ones, ``(args, kwargs)`` both. Every name is checked
against the model's ``forward`` before the model runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ndcompile.cli.loading import UsageError, load_tensor_file, parse_shape
from ndcompile.frontend.inputs import ExampleInputs, describe_value

__all__ = [
    "EXAMPLE_FORMATS",
    "INPUT_DTYPES",
    "ForwardSignature",
    "check_example_names",
    "describe_example",
    "example_high",
    "load_example_file",
    "parse_example_shape",
    "parse_input_dtype",
    "random_example",
    "unnamed_inputs_hint",
]

#: ``--example-dtype`` names (torch's names and the usual aliases).
INPUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "double": torch.float64,
    "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64, "long": torch.int64,
    "int32": torch.int32, "int": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}  # fmt: skip

#: What ``--example`` accepts, for error messages.
EXAMPLE_FORMATS = (
    "a dict of named input tensors (keyword arguments; .pt or .safetensors), a tensor or a "
    "list of tensors (positional arguments), or (args, kwargs) saved with torch.save"
)


def parse_input_dtype(name: str) -> torch.dtype:
    """The dtype called ``name`` in :data:`INPUT_DTYPES`.

    Raises:
        UsageError: Listing the valid names.
    """
    dtype = INPUT_DTYPES.get(name.strip().lower().removeprefix("torch."))
    if dtype is None:
        raise UsageError(
            f"unknown --example-dtype {name!r}; valid dtypes are: {', '.join(INPUT_DTYPES)}"
        )
    return dtype


def parse_example_shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    """``"2,16"`` -> ``(None, (2, 16))``; ``"input_ids=2,16"`` -> ``("input_ids", (2, 16))``.

    Raises:
        UsageError: If the name is not an identifier or the shape is malformed.
    """
    name, sep, shape = text.partition("=")
    if not sep:
        return None, parse_shape(text)
    if not name.strip().isidentifier():
        raise UsageError(
            f"example shape {text!r}: {name.strip()!r} is not an argument name",
            hint="e.g. --example-shape input_ids=2,16 (keyword) or --example-shape 2,16",
        )
    return name.strip(), parse_shape(shape)


@dataclass(frozen=True)
class ForwardSignature:
    """The inputs ``model.forward`` takes.

    Attributes:
        owner: ``Class.forward``, for messages.
        positional: Names of the positional(-or-keyword) parameters, in order.
        keywords: Every name that may be passed by keyword.
        var_positional: Whether it takes ``*args``.
        var_keyword: Whether it takes ``**kwargs``.
    """

    owner: str
    positional: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    var_positional: bool = True
    var_keyword: bool = True

    @classmethod
    def of(cls, model: nn.Module) -> ForwardSignature:
        """The signature of ``model.forward`` (anything accepted when it cannot be read)."""
        owner = f"{type(model).__name__}.forward"
        try:
            params = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):
            return cls(owner)
        kind = inspect.Parameter
        by_position = (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)
        by_name = (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY)
        return cls(
            owner,
            tuple(p.name for p in params if p.kind in by_position),
            tuple(p.name for p in params if p.kind in by_name),
            any(p.kind == kind.VAR_POSITIONAL for p in params),
            any(p.kind == kind.VAR_KEYWORD for p in params),
        )

    def takes(self) -> str:
        """The names it takes, shortened: ``input_ids, attention_mask, ... (+9 more)``."""
        names = list(dict.fromkeys(self.positional + self.keywords))
        shown = ", ".join(names[:6]) + (f", ... (+{len(names) - 6} more)" if len(names) > 6 else "")
        return shown or "no named inputs"


def check_example_names(model: nn.Module, example: ExampleInputs, source: str) -> None:
    """Check ``example`` fits ``model.forward``: argument count and keyword names.

    Raises:
        UsageError: Naming the input the forward does not take.
    """
    sig = ForwardSignature.of(model)
    if len(example.args) > len(sig.positional) and not sig.var_positional:
        raise UsageError(
            f"{source} gives {len(example.args)} positional inputs, but {sig.owner} takes "
            f"{len(sig.positional)} ({', '.join(sig.positional) or 'none'})",
        )
    taken = set(sig.positional[: len(example.args)])
    for name in example.kwargs:
        if name in taken:
            raise UsageError(f"{source} gives {name!r} both by position and by name")
        if name not in sig.keywords and not sig.var_keyword:
            raise UsageError(
                f"{source}: {sig.owner} takes no input named {name!r}; it takes {sig.takes()}",
                hint="name the tensors after the forward's arguments",
            )


def describe_example(example: ExampleInputs) -> str:
    """``(8, 16, 16)`` or ``(2, 16) int64, attention_mask=(2, 16) bool``: shapes, not values."""
    parts = [describe_value(a) for a in example.args]
    parts += [f"{k}={describe_value(v)}" for k, v in example.kwargs.items()]
    return ", ".join(parts)


def unnamed_inputs_hint(model: nn.Module, example: ExampleInputs) -> str | None:
    """A hint when ``example`` passes keywords ``model.forward`` only takes through ``**kwargs``."""
    sig = ForwardSignature.of(model)
    unknown = [k for k in example.kwargs if k not in sig.keywords]
    if not unknown or not sig.keywords:
        return None
    listed = ", ".join(repr(k) for k in unknown)
    return f"{listed} is not a named input of {sig.owner}; it takes {sig.takes()}"


def example_high(model: nn.Module, high: int | None) -> int:
    """Exclusive upper bound of random integer inputs: ``high``, ``config.vocab_size`` or 2."""
    if high is not None:
        return high
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0 else 2


def _random(shape: tuple[int, ...], dtype: torch.dtype, high: int, gen: torch.Generator) -> Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    limit = int(torch.iinfo(dtype).max) + 1
    if high > limit:
        raise UsageError(
            f"--example-high {high} does not fit {str(dtype).removeprefix('torch.')} "
            f"(at most {limit})",
            hint="use --example-dtype long, or a smaller --example-high",
        )
    return torch.randint(0, high, shape, generator=gen, dtype=torch.int64).to(dtype)


def random_example(
    specs: Sequence[str],
    dtypes: Sequence[str] | None,
    *,
    model_dtype: torch.dtype,
    high: int,
    seed: int = 0,
) -> ExampleInputs:
    """Seeded random inputs of the ``--example-shape`` specs (see :func:`parse_example_shape`).

    Args:
        specs: ``D0,D1,..`` (positional) or ``NAME=D0,D1,..`` (keyword), in order.
        dtypes: One ``--example-dtype`` for all inputs or one per spec (default:
            ``model_dtype``).
        model_dtype: The model's dtype, the default of floating inputs.
        high: Integer inputs are drawn from ``[0, high)``.
        seed: Seed of the generator.

    Raises:
        UsageError: On malformed specs, a dtype count that matches neither, or a
            positional spec after a keyword one.
    """
    parsed = [parse_example_shape(s) for s in specs]
    names = [n for n, _ in parsed if n is not None]
    if len(set(names)) != len(names):
        raise UsageError(f"--example-shape names an input twice: {names}")
    first_named = next((k for k, (n, _) in enumerate(parsed) if n is not None), len(parsed))
    if any(n is None for n, _ in parsed[first_named:]):
        raise UsageError("positional --example-shape D0,.. must come before NAME=D0,..")
    kinds = [parse_input_dtype(d) for d in dtypes or []] or [model_dtype]
    if len(kinds) not in (1, len(parsed)):
        raise UsageError(
            f"give one --example-dtype for all inputs or one per --example-shape; got "
            f"{len(kinds)} dtypes for {len(parsed)} shapes"
        )
    kinds = kinds * len(parsed) if len(kinds) == 1 else kinds
    gen = torch.Generator().manual_seed(seed)
    tensors = [
        _random(shape, dtype, high, gen) for (_, shape), dtype in zip(parsed, kinds, strict=True)
    ]
    args = tuple(t for (n, _), t in zip(parsed, tensors, strict=True) if n is None)
    kwargs = {n: t for (n, _), t in zip(parsed, tensors, strict=True) if n is not None}
    return ExampleInputs(args, kwargs)


def _all_tensors(values: Any) -> bool:
    return all(isinstance(v, Tensor) for v in values)


def _as_example(data: Any) -> ExampleInputs | None:
    """The call a loaded file describes, or None when it holds something else."""
    if isinstance(data, Tensor):
        return ExampleInputs((data,))
    if isinstance(data, Mapping):
        if data and all(isinstance(k, str) for k in data) and _all_tensors(data.values()):
            return ExampleInputs((), dict(data))
        return None
    if not isinstance(data, list | tuple) or not data:
        return None
    if _all_tensors(data):
        return ExampleInputs(tuple(data))
    args, kwargs = data if len(data) == 2 else (None, None)
    if (
        isinstance(args, list | tuple)
        and isinstance(kwargs, Mapping)
        and _all_tensors(args)
        and all(isinstance(k, str) for k in kwargs)
        and _all_tensors(kwargs.values())
        and (args or kwargs)
    ):
        return ExampleInputs(tuple(args), dict(kwargs))
    return None


def load_example_file(path: str, model: nn.Module, model_dtype: torch.dtype) -> ExampleInputs:
    """The example call stored in ``path`` (see :data:`EXAMPLE_FORMATS`), checked against ``model``.

    Floating tensors are cast to ``model_dtype``; integer and bool tensors are kept.

    Raises:
        UsageError: If the file is missing, unreadable, needs unpickling, holds
            something else, or names an input the model's forward does not take.
    """
    file = Path(path)
    if not file.is_file():
        raise UsageError(
            f"--example file {path!r} does not exist"
            + (" (it is a folder)" if file.is_dir() else "")
        )
    data = load_tensor_file(file)
    example = _as_example(data)
    if example is None:
        found = type(data).__name__
        if isinstance(data, Mapping | list | tuple):
            found += " (empty)" if not data else " holding non-tensor values"
        raise UsageError(f"--example file {path!r} holds a {found}; expected {EXAMPLE_FORMATS}")
    check_example_names(model, example, f"--example file {path!r}")

    def cast(t: Tensor) -> Tensor:
        return t.to(model_dtype) if t.is_floating_point() else t

    return ExampleInputs(
        tuple(cast(t) for t in example.args), {k: cast(v) for k, v in example.kwargs.items()}
    )
