"""Scaling sweeps of the layer benchmark: forward time against batch size and mode size.

Reference ``ndlinear.NdLinear`` and ndcompile ``NdLinear`` (eager, same weights) are
timed interleaved at every point; the sweeps are printed as tables and, where
matplotlib is installed, drawn as a log-log plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ndcompile.layers.ndlinear import NdLinear

from layer_cases import Case, reference_layer
from layer_tables import scaling_table
from layer_variants import phase_callables
from timing import time_interleaved, timing_fields

__all__ = ["SCALING_BATCHES", "SCALING_MODES", "SCALING_MODE_BATCH", "run_scaling"]

SCALING_BATCHES = (16, 32, 64, 128, 256, 512, 1024)
SCALING_MODES = (8, 12, 16, 24, 32, 48, 64)
SCALING_MODE_BATCH = 32


def run_scaling(
    device: torch.device, *, quick: bool, plot: Path | None, time_kw: dict[str, Any]
) -> dict[str, Any]:
    """Forward time of reference vs ndcompile eager against batch size and mode size.

    Sweeps the batch of ``(16,16,16)->(16,16,16)`` and the mode size ``n`` of
    ``(n,n,n)->(n,n,n)`` at batch 32; prints a table and saves a log-log plot.
    """
    batches = (16, 64) if quick else SCALING_BATCHES
    modes = (8, 16) if quick else SCALING_MODES
    sweeps: dict[str, list[dict[str, Any]]] = {"batch": [], "mode": []}
    points = [("batch", b, Case(f"b{b}", (16,) * 3, (16,) * 3, b)) for b in batches]
    points += [("mode", n, Case(f"n{n}", (n,) * 3, (n,) * 3, SCALING_MODE_BATCH)) for n in modes]
    for sweep, value, case in points:
        ref = reference_layer(case).to(device)
        nd = NdLinear.from_reference(ref)
        nd.replan(plan_batch=case.batch)
        x = torch.randn(case.batch, *case.in_shape, device=device)
        fns = {"ref": phase_callables(ref, x)[0], "nd": phase_callables(nd, x)[0]}
        timings = time_interleaved(fns, device, **time_kw)
        t_ref, t_nd = timings["ref"], timings["nd"]
        sweeps[sweep].append(
            {
                "value": value,
                "case": case.describe(),
                "plan_flops": int(nd.plan().flops),
                **timing_fields("ref_eager", t_ref),
                **timing_fields("nd_eager", t_nd),
            }
        )
    for sweep, title in (
        ("batch", "batch size B, (16,16,16)->(16,16,16)"),
        ("mode", f"mode size n, (n,n,n)->(n,n,n), B={SCALING_MODE_BATCH}"),
    ):
        print(f"\n## Scaling: forward ms vs {title}")
        print(scaling_table(sweep, sweeps[sweep]))
    result: dict[str, Any] = {"sweeps": sweeps, "plot": None}
    if plot is not None:
        result["plot"] = _plot_scaling(sweeps, plot)
    return result


def _plot_scaling(sweeps: dict[str, list[dict[str, Any]]], path: Path) -> str | None:
    """Log-log plot of both sweeps (median solid, fastest sample dotted) at ``path``.

    Returns:
        The path written, or None when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no scaling plot")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = {"batch": "batch size (16,16,16)", "mode": f"mode size n, B={SCALING_MODE_BATCH}"}
    for ax, (sweep, pts) in zip(axes, sweeps.items(), strict=True):
        xs = [p["value"] for p in pts]
        for key, marker, color, label in (
            ("ref_eager", "o", "C0", "ndlinear.NdLinear eager"),
            ("nd_eager", "s", "C1", "ndcompile NdLinear eager"),
        ):
            ax.loglog(xs, [p[f"{key}_ms"] for p in pts], marker + "-", color=color, label=label)
            ax.loglog(
                xs,
                [p[f"{key}_min_ms"] for p in pts],
                marker + ":",
                color=color,
                alpha=0.5,
                label=f"{label}, fastest sample",
            )
        ax.set_xlabel(labels[sweep])
        ax.set_ylabel("forward ms (median; dotted: fastest)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return str(path)
