"""Shared helpers of the benchmark scripts: Markdown tables and JSON, and one import for the rest.

Tables are printed as Markdown so they paste into the README; results are written
as indented JSON. Timing (:mod:`timing`), the machine and its roofs
(:mod:`machine`) and peak memory (:mod:`peak_memory`) live in their own modules
and are re-exported here, so a script imports what it needs from one place.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from machine import (
    add_machine_options,
    machine_info,
    measure_bandwidth,
    measure_roofline,
    pick_device,
    setup_torch,
)
from peak_memory import peak_memory_mb
from timing import (
    Timing,
    summarise,
    time_call,
    time_interleaved,
    timing_fields,
)

__all__ = [
    "Timing",
    "add_machine_options",
    "format_ratio",
    "format_table",
    "machine_info",
    "measure_bandwidth",
    "measure_roofline",
    "peak_memory_mb",
    "pick_device",
    "setup_torch",
    "summarise",
    "time_call",
    "time_interleaved",
    "timing_fields",
    "write_json",
]


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with right-aligned numeric-looking columns.

    Args:
        header: Column titles.
        rows: One sequence of cells per row (converted with ``str``).

    Returns:
        The table text.
    """
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        padded = [
            c.ljust(w) if k == 0 else c.rjust(w)
            for k, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("| " + " | ".join(padded) + " |")
    return "\n".join(lines)


def format_ratio(value: float | None) -> str:
    """A speedup or ratio cell: ``"2.50x"``, or ``"-"`` where it is missing.

    Args:
        value: The ratio (None: not measured).

    Returns:
        The cell text.
    """
    return "-" if value is None else f"{value:.2f}x"


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON, creating parent folders.

    Args:
        path: The file to write.
        data: JSON-able results (other values are written with ``str``).

    Returns:
        The path written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return out
