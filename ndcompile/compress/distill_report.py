"""The report of :func:`ndcompile.distill`: what was trained, how long, and the errors."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ndcompile.compress.distill_layers import LayerDistill
from ndcompile.compress.distill_model import WholeModelDistill

__all__ = ["DistillReport"]


@dataclass
class DistillReport:
    """What :func:`distill` did, printable as a table.

    Attributes:
        layers: One entry per layer-wise fitted layer.
        whole_model: The whole-model phase, if it ran.
        data: How the data was read (source, batch format, batch counts).
        processes: ``torch.distributed`` world size (1 without it).
    """

    layers: list[LayerDistill] = field(default_factory=list)
    whole_model: WholeModelDistill | None = None
    data: str = ""
    processes: int = 1

    def layer(self, name: str) -> LayerDistill:
        """The entry of layer ``name``."""
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise KeyError(f"no layer {name!r}; layers: {[e.name for e in self.layers]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        return asdict(self)

    def __str__(self) -> str:
        head = ("layer", "error before", "error after", "steps", "early", "statistics", "status")
        rows = [head]
        for e in self.layers:
            stats = "x".join(map(str, e.accumulator_shape))
            rows.append(
                (
                    e.name,
                    f"{e.error_before:.3e}",
                    f"{e.error_after:.3e}",
                    str(e.steps),
                    "yes" if e.stopped_early else "no",
                    f"{e.accumulator} {stats}, {e.rows_seen:,} rows ({e.rows_heldout:,} held out)",
                    e.status,
                )
            )
        widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
        lines = ["DistillReport"]
        if self.data:
            procs = f" on {self.processes} processes" if self.processes > 1 else ""
            lines.append(f"  data: {self.data}{procs}")
        for k, row in enumerate(rows if self.layers else []):
            cells = (v.ljust(w) for v, w in zip(row, widths, strict=True))
            lines.append(("  " + "  ".join(cells)).rstrip())
            if k == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        if self.whole_model is not None:
            lines.extend(_whole_model_lines(self.whole_model))
        return "\n".join(lines)


def _whole_model_lines(m: WholeModelDistill) -> list[str]:
    lines = [
        f"  whole model ({m.loss}: {m.loss_reason}), {m.steps} steps: output error "
        f"{m.error_before:.3e} -> {m.error_after:.3e}, loss {m.loss_before:.3e} -> "
        f"{m.loss_after:.3e} ({m.error_source})",
        f"    trained: {m.trained}",
        f"    budget: {m.budget}; stopped: {m.stop_reason}",
    ]
    if m.agreement_before is not None and m.agreement_after is not None:
        lines.append(
            f"    top-1 agreement with the original: {100 * m.agreement_before:.1f}% -> "
            f"{100 * m.agreement_after:.1f}%"
        )
    return lines
