"""The printed results of ``bench_hf_models``: one Markdown table of all models and variants.

Latencies are ``median ±IQR/2`` in ms; speedups are dense latency over variant
latency (medians), eager and inductor; ``error`` marks a compiled phase that failed
(its text is printed under the table by :func:`compile_errors`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ndcompile.report import format_count

from common import format_ratio, format_table

__all__ = ["HEADER", "compile_errors", "results_table"]


def _num(ms: float) -> str:
    """A latency in ms: a whole number from 100 up, else 3 significant digits."""
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _ms_cell(side: Mapping[str, Any], label: str) -> str:
    """``median ±IQR/2`` of one phase; ``error`` for a failed compiled phase, else ``-``."""
    ms = side.get(f"{label}_ms")
    if ms is None:
        return "error" if label.startswith("compiled") and "compile_error" in side else "-"
    return f"{_num(ms)} ±{_num(side[f'{label}_iqr_ms'] / 2)}"


def _ratio_cell(ratios: Mapping[str, float | None], phase: str) -> str:
    """Eager and inductor speedups over dense of one phase, ``eager / inductor``."""
    cells = [ratios.get(f"{kind}_{phase}_ms") for kind in ("eager", "compiled")]
    return " / ".join(format_ratio(r) for r in cells)


def _row(model: str, variant: str, side: Mapping[str, Any], ratios: Mapping[str, Any]) -> list:
    """The table row of one variant (cells in :data:`HEADER` order)."""
    converted = "layers_converted" in side
    layers = f"{side['layers_converted']}/{side['linear_layers']}" if converted else "-"
    share = f"{side['linear_param_share']:.0%}" if converted else "-"
    err = side.get("output_rel_error")
    return [
        model,
        variant,
        layers,
        share,
        format_count(side["params"]),
        f"{ratios['params']:.2f}x",
        format_count(side["flops"]),
        _ms_cell(side, "eager_fwd"),
        _ms_cell(side, "compiled_fwd"),
        _ms_cell(side, "eager_train"),
        _ms_cell(side, "compiled_train"),
        _ratio_cell(ratios, "fwd"),
        _ratio_cell(ratios, "train"),
        f"{side['peak_train_mb']:.1f}",
        f"{side['live_train_mb']:.1f}",
        "-" if err is None else f"{err:.2e}",
    ]


HEADER = (
    "model",
    "variant",
    "layers conv.",
    "Linear params conv.",
    "params",
    "params dense/var",
    "fwd FLOPs",
    "fwd ms eager",
    "fwd ms inductor",
    "train ms eager",
    "train ms inductor",
    "fwd speedup eager / inductor",
    "train speedup eager / inductor",
    "peak train MB (RSS)",
    "live train MB",
    "out err vs dense",
)


def results_table(records: Sequence[Mapping[str, Any]]) -> str:
    """All models and variants in one Markdown table (latency: median ± IQR/2, ms).

    Speedups are dense latency over variant latency (medians), eager and inductor.
    """
    rows = [
        _row(rec["name"], name, side, rec["ratios"][name])
        for rec in records
        for name, side in rec["variants"].items()
    ]
    return format_table(HEADER, rows)


def compile_errors(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """``model / variant: error`` of every variant with a ``compile_error`` (300 chars)."""
    return [
        f"{rec['name']} / {name}: {side['compile_error'][:300]}"
        for rec in records
        for name, side in rec["variants"].items()
        if "compile_error" in side
    ]
