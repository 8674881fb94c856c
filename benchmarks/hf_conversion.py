"""The variants of a Hugging Face model: ``ndcompile.convert`` per variant, what it did, errors.

Each variant but ``dense`` is ``ndcompile.convert(dense, {"input_ids": ids}, **kwargs)``
with the keyword arguments of :data:`VARIANTS`; its summary gives the layers
converted and their share of the model's ``nn.Linear`` parameters.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import ndcompile
from ndcompile.report import ConversionReport, report_of

from bench_models import _rel_err

__all__ = ["VARIANTS", "convert_variants", "output_errors"]

#: Conversion keyword arguments per variant (``None``: the dense model itself).
VARIANTS: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "fresh r1": {"mode": "fresh", "rank": 1},
    "fresh r4": {"mode": "fresh", "rank": 4},
    "factorize r4": {"mode": "factorize", "rank": 4},
}


def _linear_params(model: nn.Module) -> dict[str, int]:
    """Parameters (weight and bias) of every ``nn.Linear`` of ``model``, by name."""
    return {
        name: sum(p.numel() for p in m.parameters(recurse=False))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }


def _conversion_summary(
    dense: nn.Module, report: ConversionReport, seconds: float
) -> dict[str, Any]:
    """Layers converted, their share of the Linear parameters, and the report."""
    linear = _linear_params(dense)
    done = sum(linear.get(e.name, e.params_before) for e in report.converted)
    return {
        "convert_s": seconds,
        "layers_converted": len(report.converted),
        "layers_found": len(report.layers),
        "linear_layers": len(linear),
        "linear_param_share": done / max(sum(linear.values()), 1),
        "report_output_rel_error": report.output_rel_error,
        "report": report.to_dict(),
    }


def convert_variants(
    dense: nn.Module, ids: Tensor, names: Sequence[str], seed: int
) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """The model of every variant, and what each conversion did.

    Args:
        dense: The dense model.
        ids: Example ``input_ids`` (the benchmark's input).
        names: Variants (keys of :data:`VARIANTS`).
        seed: Seed set before every conversion (fresh layers are random).

    Returns:
        ``(models, summaries)`` by variant name.
    """
    models: dict[str, nn.Module] = {}
    info: dict[str, dict[str, Any]] = {}
    for name in names:
        kwargs = VARIANTS[name]
        if kwargs is None:
            models[name], info[name] = dense, {}
            continue
        torch.manual_seed(seed)
        start = time.perf_counter()
        models[name] = ndcompile.convert(dense, {"input_ids": ids}, **kwargs).eval()
        seconds = time.perf_counter() - start
        info[name] = _conversion_summary(dense, report_of(models[name]), seconds)
        print(f"  {name}: {_conversion_line(info[name])}", flush=True)
    return models, info


def _conversion_line(info: Mapping[str, Any]) -> str:
    """One printed line of a conversion summary (layers, parameter share, time)."""
    report = info["report"]
    return (
        f"{info['layers_converted']}/{info['linear_layers']} Linear layers converted "
        f"({info['linear_param_share']:.0%} of Linear params), params "
        f"{report['params_before']:,} -> {report['params_after']:,}, "
        f"convert {info['convert_s']:.1f} s"
    )


def output_errors(models: Mapping[str, nn.Module], x: Tensor) -> dict[str, float | None]:
    """Relative output error vs dense of the variants that approximate it (not ``fresh``)."""
    with torch.no_grad():
        ref = models["dense"](x)
        return {
            name: None
            if name == "dense" or (VARIANTS[name] or {}).get("mode") == "fresh"
            else _rel_err(ref, model(x))
            for name, model in models.items()
        }
