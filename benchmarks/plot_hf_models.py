"""Plot the whole-model benchmark: speedups over dense and training memory per variant.

Reads the JSON written by ``bench_hf_models.py --json`` and draws one row of three
panels: forward speedup and train-step speedup over the dense model (eager and
``torch.compile``), and the training step's peak of live tensors relative to dense
(1.0 is the dense model; below it the converted model needs less). Needs matplotlib
(``pip install matplotlib``), which the project itself does not.

Usage::

    python benchmarks/plot_hf_models.py benchmarks/results/cpu_hf_models.json \\
        -o benchmarks/results/hf_models.png
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PANELS", "main", "panel_data", "plot"]

#: Panels: (title, [(series label, ratio key)], or a memory panel's key).
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("forward speedup over dense", (("eager", "eager_fwd_ms"), ("inductor", "compiled_fwd_ms"))),
    (
        "train-step speedup over dense",
        (("eager", "eager_train_ms"), ("inductor", "compiled_train_ms")),
    ),
    ("live train memory / dense", (("live tensors", "live_train_mb"),)),
)


def panel_data(
    records: Sequence[Mapping[str, Any]],
) -> tuple[list[str], list[dict[str, list[float | None]]]]:
    """Bar labels (``model: variant``, dense excluded) and each panel's series.

    Speedups are the JSON's ``ratios`` (dense time over the variant's); memory is
    the variant's ``live_train_mb`` over dense's. A missing value is None.

    Args:
        records: The ``models`` list of a ``bench_hf_models.py`` JSON.

    Returns:
        ``(labels, panels)``: one dict per :data:`PANELS` entry, series label to values.
    """
    labels: list[str] = []
    panels: list[dict[str, list[float | None]]] = [
        {name: [] for name, _ in series} for _, series in PANELS
    ]
    for rec in records:
        dense = rec["variants"].get("dense", {})
        for variant, side in rec["variants"].items():
            if variant == "dense":
                continue
            labels.append(f"{rec['name']}: {variant}")
            ratios = rec.get("ratios", {}).get(variant, {})
            for (_, series), values in zip(PANELS, panels, strict=True):
                for name, key in series:
                    if key.endswith("_mb"):
                        base, mine = dense.get(key), side.get(key)
                        values[name].append(mine / base if base and mine is not None else None)
                    else:
                        values[name].append(ratios.get(key))
    return labels, panels


def plot(records: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Draw the three panels of ``records`` into the PNG ``path``.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, panels = panel_data(records)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.2 * len(PANELS), 0.45 * len(labels) + 1.8))
    rows = range(len(labels))
    for ax, (heading, series), values in zip(axes, PANELS, panels, strict=True):
        height = 0.8 / len(series)
        for k, (name, _) in enumerate(series):
            ys = [r + (k - (len(series) - 1) / 2) * height for r in rows]
            xs = [v if v is not None else 0.0 for v in values[name]]
            bars = ax.barh(ys, xs, height=height, label=name)
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(heading, fontsize=10)
        ax.set_yticks(list(rows), labels if ax is axes[0] else [""] * len(labels), fontsize=8)
        ax.invert_yaxis()
        ax.margins(x=0.18)
        if len(series) > 1:
            ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: ``plot_hf_models.py RESULTS.json -o OUT.png``."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("results", type=Path, help="JSON from bench_hf_models.py --json")
    p.add_argument("-o", "--output", type=Path, default=Path("hf_models.png"))
    args = p.parse_args(argv)
    data = json.loads(args.results.read_text())
    meta = data.get("meta", {})
    title = ", ".join(str(meta[k]) for k in ("cpu", "device", "torch") if meta.get(k) is not None)
    out = plot(data["models"], args.output, title=title)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
