"""Partial conversion of models torch.fx cannot trace as a whole.

When the top-level model has data-dependent control flow or unsupported ops,
:func:`convert_partially` converts the largest submodules that *can* be traced
(each with the inputs it really receives on the example), keeps the rest as eager
modules, and reports what was left and why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ndcompile.errors import NdCompileError, UntraceableError
from ndcompile.frontend.trace import is_reference_ndlinear
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.report import ConversionReport, LayerReport

__all__ = ["capture_call_inputs", "convert_partially"]

#: ``(qualified name, submodule, its example inputs) -> converted submodule``.
Converter = Callable[[str, nn.Module, tuple[Any, ...]], nn.Module]


def _has_layers(module: nn.Module) -> bool:
    return any(
        isinstance(m, nn.Linear | NdLinear) or is_reference_ndlinear(m) for m in module.modules()
    )


def capture_call_inputs(model: nn.Module, inputs: tuple[Any, ...]) -> dict[str, tuple | None]:
    """Positional inputs of every submodule's first call (None if called with kwargs)."""
    seen: dict[str, tuple | None] = {}
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, args: tuple, kwargs: dict, *, _n: str = name) -> None:
            if _n not in seen:
                seen[_n] = (
                    None
                    if kwargs
                    else tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
                )

        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def convert_partially(
    work: nn.Module,
    inputs: tuple[Any, ...],
    convert_one: Converter,
    report: ConversionReport,
    reason: str,
    name_prefix: str = "",
) -> nn.Module:
    """Convert the largest traceable submodules of ``work`` (a private copy) in place.

    Args:
        work: A deep copy of the user's model (modified in place).
        inputs: The example inputs of ``work``.
        convert_one: Converts one submodule given its name and example inputs;
            returns the converted module with a ``report``.
        report: The report to extend (layer names get the submodule prefix).
        reason: Why the top level could not be traced (for the notes).
        name_prefix: Where ``work`` sits in the user's model (for messages).

    Returns:
        ``work`` with converted children.
    """
    try:
        calls = capture_call_inputs(work, inputs)
    except Exception as exc:
        raise NdCompileError(
            f"the model fails on the example input: {type(exc).__name__}: {exc}",
            layer=type(work).__name__,
        ) from exc
    report.notes.append(
        f"{type(work).__name__} is not traceable ({reason}); "
        "converted its traceable submodules instead"
    )
    _convert_children(work, "", calls, convert_one, report, name_prefix)
    return work


def _skip(report: ConversionReport, name: str, module: nn.Module, why: str) -> None:
    for sub, m in module.named_modules():
        if isinstance(m, nn.Linear):
            full = f"{name}.{sub}" if sub else name
            report.layers.append(
                LayerReport(
                    name=full,
                    in_features=m.in_features,
                    out_features=m.out_features,
                    params_before=sum(p.numel() for p in m.parameters()),
                    reason=why,
                )
            )


def _convert_children(
    parent: nn.Module,
    prefix: str,
    calls: dict[str, tuple | None],
    convert_one: Converter,
    report: ConversionReport,
    name_prefix: str = "",
) -> None:
    for child_name, child in list(parent.named_children()):
        name = f"{prefix}{child_name}"
        if not _has_layers(child):
            continue
        if isinstance(child, nn.Linear | NdLinear) or is_reference_ndlinear(child):
            owner = f"{name_prefix}{prefix}"[:-1] or "<root>"
            _skip(report, name, child, f"called directly by an untraceable parent {owner!r}")
            continue
        args = calls.get(name)
        if args is None:
            why = (
                "not called on the example input"
                if name not in calls
                else "called with keyword arguments"
            )
            _skip(report, name, child, why)
            continue
        try:
            converted = convert_one(name, child, args)
        except UntraceableError as exc:
            report.notes.append(f"{name}: not traceable ({str(exc).splitlines()[0]}); descending")
            _convert_children(child, f"{name}.", calls, convert_one, report, name_prefix)
            continue
        sub_report: ConversionReport = converted.report  # type: ignore[assignment]
        for entry in sub_report.layers:
            entry.name = f"{name}.{entry.name}"
            report.layers.append(entry)
        report.notes.extend(f"{name}: {note}" for note in sub_report.notes)
        setattr(parent, child_name, converted)
