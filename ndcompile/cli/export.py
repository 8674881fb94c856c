"""``-o OUT.pt2``: ``torch.export`` the converted module, check it, save it.

The program is traced on a few rows of the example with the batch dimension of
every input dynamic, and checked against the module on the whole example; where
that fails it is exported with the example's shapes (noted in the report). Models
whose forward takes ``use_cache`` (Hugging Face decoders) return a cache object
``torch.export`` cannot represent; when export fails for such a model, it is
exported again with ``use_cache=False`` fixed (the program then takes only the
example's inputs, and the report says so).
"""

from __future__ import annotations

import copy
import functools
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ndcompile.cli.examples import describe_example
from ndcompile.cli.output import deferred_signals
from ndcompile.errors import NdCompileError, first_line
from ndcompile.frontend.inputs import ExampleInputs, example_inputs
from ndcompile.pipeline.checks import relative_error

__all__ = ["EXPORT_ROWS", "EXPORT_TOLERANCE", "export_error", "export_program", "save_program"]

#: Rows of the example input an exported program is traced (and stored) with.
EXPORT_ROWS = 2

#: Largest relative error of an exported program vs the module, per dtype (default 1e-2).
EXPORT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}

#: Keyword arguments fixed, in this order, when export fails without them.
_FIXED_KWARGS: tuple[tuple[str, Any], ...] = (("use_cache", False),)

_HINT = "save the weights with --state-dict-out or --save FILE.safetensors instead"


def _first_line(exc: BaseException) -> str:
    """``Type: first sentence of the message``."""
    first = first_line(exc).split(". ", 1)[0].rstrip(".")
    return f"{type(exc).__name__}: {first}".rstrip(": ")


def _few_rows(example: ExampleInputs) -> ExampleInputs:
    """The first :data:`EXPORT_ROWS` rows of every tensor (repeated if it has fewer), copied.

    A copy, so the program stores a small tensor rather than a view of the whole input.
    """

    def rows(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        if t.dim() == 0:
            return t.clone()
        if t.shape[0] >= EXPORT_ROWS:
            return t[:EXPORT_ROWS].clone()
        reps = -(-EXPORT_ROWS // max(t.shape[0], 1))
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:EXPORT_ROWS].clone()

    return ExampleInputs(tree_map(rows, example.args), tree_map(rows, example.kwargs))


def _dtype(example: ExampleInputs) -> torch.dtype | None:
    floats = [t.dtype for t in example.tensors() if t.is_floating_point()]
    return floats[0] if floats else None


def export_error(program: Any, module: nn.Module, example: Any) -> float:
    """Relative error of ``program`` vs ``module`` on ``example`` (any form ``convert`` takes).

    Raises:
        NdCompileError: Beyond floating-point tolerance for the module's dtype.
        Exception: Whatever running the program raises (e.g. a shape guard).
    """
    call = example_inputs(example)
    with torch.no_grad():
        want, got = call(module), call(program.module())
    err = relative_error(want, got)
    dtype = _dtype(call) or next((p.dtype for p in module.parameters()), torch.float32)
    if err > EXPORT_TOLERANCE.get(dtype, 1e-2):
        raise NdCompileError(
            f"the exported program differs from the converted module (relative error {err:.2e})",
            hint=_HINT + ", and report the model",
        )
    return err


def _dynamic_shapes(module: nn.Module, example: ExampleInputs) -> dict[str, Any] | None:
    """Dim 0 of every batched tensor input dynamic, keyed by the forward's argument names."""
    from torch.export import Dim

    def spec(t: Any) -> Any:
        return {0: Dim.DYNAMIC} if isinstance(t, Tensor) and t.dim() > 0 else None

    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    if len(example.args) > len(names):
        return None
    shapes = {name: tree_map(spec, a) for name, a in zip(names, example.args, strict=False)}
    shapes.update({k: tree_map(spec, v) for k, v in example.kwargs.items()})
    return shapes


def _with_fixed(module: nn.Module, fixed: dict[str, Any]) -> nn.Module:
    """A shallow copy of ``module`` (same parameters and names) whose forward binds ``fixed``."""
    if not fixed:
        return module
    bound = copy.copy(module)
    bound.forward = functools.partial(module.forward, **fixed)  # type: ignore[method-assign]
    return bound


def _fixable(module: nn.Module, example: ExampleInputs) -> dict[str, Any]:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in _FIXED_KWARGS if k in params and k not in example.kwargs}


def _export(module: nn.Module, example: ExampleInputs) -> tuple[Any, str | None, float]:
    """Export with a dynamic batch dim, else statically; (program, note, error) or raise."""
    batched = _dynamic_shapes(module, example)
    if batched is not None and any(t.dim() > 0 for t in example.tensors()):
        try:
            few = _few_rows(example)
            program = torch.export.export(module, few.args, few.kwargs, dynamic_shapes=batched)
            return program, None, export_error(program, module, example)
        except Exception as exc:
            reason = _first_line(exc)[:200]
    else:
        reason = "the inputs have no batch dimension"
    program = torch.export.export(module, example.args, example.kwargs)
    program.example_inputs = None  # the whole example would be stored otherwise
    note = (
        f"exported program has static input shapes {describe_example(example)} (only this batch "
        f"size runs): dynamic batch export failed: {reason}"
    )
    return program, note, export_error(program, module, example)


def export_program(module: nn.Module, example: Any) -> tuple[Any, str | None, float]:
    """``torch.export`` ``module`` on ``example`` (see the module docstring) and check it.

    Returns:
        The ``ExportedProgram``, a note for the report (``None`` when it has a
        dynamic batch dimension and takes exactly the example's inputs) and its
        relative error vs ``module`` on ``example``.

    Raises:
        NdCompileError: If export fails, with and without the fixed keyword
            arguments, or the program differs from the module.
    """
    call = example_inputs(example)
    try:
        return _export(module, call)
    except NdCompileError:
        raise  # exported, but wrong: not a failure a fixed argument explains
    except Exception as exc:
        failure = _first_line(exc)[:300]
    fixed = _fixable(module, call)
    if fixed:
        shown = ", ".join(f"{k}={v!r}" for k, v in fixed.items())
        try:
            program, note, err = _export(_with_fixed(module, fixed), call)
        except Exception as exc:
            failure += f"; with {shown}: {_first_line(exc)[:300]}"
        else:
            notes = [f"exported with {shown} fixed (export failed otherwise: {failure})"]
            return program, "; ".join(notes + ([note] if note else [])), err
    raise NdCompileError(
        f"torch.export failed on the converted model: {failure}",
        layer=type(module).__name__,
        hint=_HINT,
    )


def save_program(
    module: nn.Module, example: Any, path: Path, notes: list[str] | None = None
) -> tuple[Any, float]:
    """Export ``module`` (see :func:`export_program`), check it, ``torch.export.save`` it.

    Args:
        module: The converted module.
        example: The example call (the batch dimension is exported dynamic when possible).
        path: The file to write.
        notes: Where notes on fixed arguments or a static fallback are appended.

    Returns:
        The ``ExportedProgram`` and its relative error vs ``module`` on ``example``.

    Raises:
        NdCompileError: If export fails or the program differs from the module.
    """
    program, note, err = export_program(module, example)
    if note is not None and notes is not None:
        notes.append(note)
    with open(path, "wb") as handle, deferred_signals():
        # a handle, so the archive is not named after the temp file; signals are held
        # because torch's zip writer calls handle.write from C++
        torch.export.save(program, handle)
    return program, err
