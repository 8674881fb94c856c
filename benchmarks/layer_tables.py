"""Markdown tables of the layer benchmark: per case, summaries across cases, scaling sweeps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common import format_ratio, format_table

__all__ = ["case_table", "scaling_table", "summary_table"]


def case_table(record: dict[str, Any]) -> str:
    """Per-variant table of one case."""
    header = (
        "variant",
        "fwd ms",
        "IQR",
        "min",
        "fwd+bwd ms",
        "IQR",
        "GFLOP/s",
        "% roof",
        "fwd vs ref",
        "fwd vs dense",
        "f+b vs ref",
        "f+b vs dense",
        "rel err",
    )
    rows, skipped = [], []
    for name, v in record["variants"].items():
        if "skipped" in v:
            skipped.append(f"{name}: skipped ({v['skipped']})")
            continue
        r = record["ratios"][name]
        frac = v["roofline_frac"]
        rows.append(
            (
                name,
                f"{v['fwd_ms']:.3f}",
                f"{v['fwd_iqr_ms']:.3f}",
                f"{v['fwd_min_ms']:.3f}",
                f"{v['fwdbwd_ms']:.3f}",
                f"{v['fwdbwd_iqr_ms']:.3f}",
                f"{v['gflops']:.1f}",
                "-" if frac is None else f"{100 * frac:.0f}%",
                format_ratio(r["fwd_vs_ref_eager"]),
                format_ratio(r["fwd_vs_dense"]),
                format_ratio(r["fwdbwd_vs_ref_eager"]),
                format_ratio(r["fwdbwd_vs_dense"]),
                "-" if v["rel_err_vs_ref"] is None else f"{v['rel_err_vs_ref']:.0e}",
            )
        )
    return "\n".join([format_table(header, rows), *skipped])


def summary_table(records: Sequence[dict[str, Any]], phase: str) -> str:
    """One row per case: ndcompile speedups against each baseline (``phase``: see PHASES)."""
    header = (
        "case",
        "ref MFLOP",
        "plan MFLOP",
        "dense MFLOP",
        "ref eager ms",
        "nd+ind ms",
        "nd eager vs ref",
        "nd+ind vs ref",
        "nd+ind vs ref+ind",
        "nd+ind vs dense",
        "ndcompile-backend vs ref",
    )
    rows = []
    for rec in records:
        r = rec["ratios"]
        ref = rec["variants"].get("ref_eager", {})
        nd_ind = rec["variants"].get("nd_inductor", {})

        def get(name: str, key: str, r: dict = r) -> str:
            return format_ratio(r.get(name, {}).get(f"{phase}_{key}"))

        rows.append(
            (
                f"{rec['name']} {rec['description']}",
                f"{rec['reference_flops'] / 1e6:.1f}",
                f"{rec['plan_flops'] / 1e6:.1f}",
                f"{rec['dense_flops'] / 1e6:.0f}",
                f"{ref.get(f'{phase}_ms', float('nan')):.3f}",
                f"{nd_ind.get(f'{phase}_ms', float('nan')):.3f}",
                get("nd_eager", "vs_ref_eager"),
                get("nd_inductor", "vs_ref_eager"),
                get("nd_inductor", "vs_ref_inductor"),
                get("nd_inductor", "vs_dense"),
                get("ref_ndcompile", "vs_ref_eager"),
            )
        )
    return format_table(header, rows)


def scaling_table(sweep: str, points: Sequence[dict[str, Any]]) -> str:
    """One row per point of a scaling sweep: reference vs ndcompile eager forward times.

    Args:
        sweep: The swept quantity (``"batch"`` or ``"mode"``), the first column's title.
        points: The sweep's records (see ``layer_scaling.run_scaling``).

    Returns:
        The table text.
    """
    rows = [
        (
            p["value"],
            f"{p['plan_flops'] / 1e6:.2f}",
            f"{p['ref_eager_ms']:.3f}",
            f"{p['nd_eager_ms']:.3f}",
            format_ratio(p["ref_eager_ms"] / p["nd_eager_ms"]),
            f"{p['ref_eager_min_ms']:.3f}",
            f"{p['nd_eager_min_ms']:.3f}",
            format_ratio(p["ref_eager_min_ms"] / p["nd_eager_min_ms"]),
        )
        for p in points
    ]
    return format_table(
        (
            sweep,
            "plan MFLOP",
            "ref eager ms",
            "nd eager ms",
            "speedup",
            "ref min",
            "nd min",
            "speedup (min)",
        ),
        rows,
    )
