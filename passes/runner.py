"""Run a pipeline of passes; every failure surfaces as an ``NdCompileError``.

torch's ``PassManager`` re-raises any failure as a bare ``Exception("An error
occurred when running the ... pass")``, hiding an ``NdCompileError`` in ``__cause__``.
:func:`run_passes` keeps the error type: an ``NdCompileError`` gets the pass name
prepended, anything else becomes an ``NdCompileError`` naming the pass (with the
original as its cause).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ndcompile.errors import NdCompileError

__all__ = ["Pass", "PassResult", "ReportedResult", "run_passes"]

#: A graph pass: ``gm -> PassResult`` (or a subclass carrying report data).
Pass = Callable[[fx.GraphModule], PassResult]


class ReportedResult(PassResult):
    """A ``PassResult`` that also carries what the pass did, for the report.

    Attributes:
        layers: One :class:`~ndcompile.report.LayerReport` per layer the pass
            rewrote or looked at and left.
        notes: Remarks for the report.
        constants: New tensors the rewritten graph takes as extra inputs, by name.
    """

    layers: list[Any]
    notes: list[str]
    constants: dict[str, Any]

    def __new__(
        cls,
        graph_module: fx.GraphModule,
        modified: bool,
        layers: Sequence[Any] = (),
        notes: Sequence[str] = (),
        constants: Mapping[str, Any] | None = None,
    ) -> ReportedResult:
        # PassResult is a NamedTuple; its stubbed __new__ returns the base type.
        self = cast(ReportedResult, super().__new__(cls, graph_module, modified))
        self.layers = list(layers)
        self.notes = list(notes)
        self.constants = dict(constants or {})
        return self


def pass_name(fn: Pass) -> str:
    """A readable name for a pass (``functools.partial`` unwrapped)."""
    inner = getattr(fn, "func", fn)
    return getattr(inner, "__name__", type(inner).__name__)


def run_passes(
    gm: fx.GraphModule, passes: Sequence[Pass]
) -> tuple[fx.GraphModule, list[PassResult]]:
    """Apply ``passes`` in order.

    Args:
        gm: The graph module (passes may modify it in place or return a new one).
        passes: The pipeline.

    Returns:
        The final graph module and each pass's result.

    Raises:
        NdCompileError: If a pass fails; the message starts with the pass name.
    """
    results = []
    for fn in passes:
        name = pass_name(fn)
        try:
            result = fn(gm)
        except NdCompileError as exc:
            exc.args = (f"pass {name!r}: {exc.args[0] if exc.args else ''}", *exc.args[1:])
            raise
        except Exception as exc:
            raise NdCompileError(
                f"pass {name!r} failed: {type(exc).__name__}: {exc}",
                hint="please report this with the model",
            ) from exc
        if not isinstance(result, PassResult):
            raise NdCompileError(f"pass {name!r} returned {type(result).__name__}, not PassResult")
        gm = result.graph_module
        results.append(result)
    return gm, results
