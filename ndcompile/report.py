"""Conversion reports: per-layer shapes, params, FLOPs, errors and skip reasons."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ConversionReport", "LayerReport", "format_count", "format_shape", "report_of"]


@dataclass
class LayerReport:
    """What happened to one layer.

    Attributes:
        name: Qualified module name.
        kind: Original layer type (``Linear``, ``NdLinear``, ``ndlinear.NdLinear``).
        status: ``"converted"``, ``"inlined"`` or ``"skipped"``.
        in_features: Input features (flattened).
        out_features: Output features (flattened).
        in_shape: Chosen input modes.
        out_shape: Chosen output modes.
        mode_source: Where the modes came from (``graph``, ``factored``, ``override``).
        rank: Kronecker rank.
        params_before: Parameters of the original layer.
        params_after: Parameters of the converted layer.
        flops_before: FLOPs of the original layer on the example input.
        flops_after: FLOPs of the planned contraction on the example input.
        naive_flops: FLOPs of contracting the network in one naive step.
        largest_intermediate: Elements of the plan's largest intermediate.
        plan: The plan, printed.
        weight_rel_error: ``|W - W_hat| / |W|`` (lossy modes).
        output_rel_error: Relative output error of the layer on the example input.
        reason: Why the layer was skipped.
        extra: Mode-specific details (singular spectrum, LoRA comparison, ...).
    """

    name: str
    kind: str = "Linear"
    status: str = "skipped"
    in_features: int = 0
    out_features: int = 0
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    mode_source: str = ""
    rank: int | None = None
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    naive_flops: int = 0
    largest_intermediate: int = 0
    plan: str = ""
    weight_rel_error: float | None = None
    output_rel_error: float | None = None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def format_count(n: int) -> str:
    """``1234567 -> '1.23M'``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_shape(shape: tuple[int, ...] | None) -> str:
    """``(32, 32, 3) -> '32x32x3'``."""
    return "x".join(map(str, shape)) if shape else "-"


def _fmt_err(err: float | None) -> str:
    return "-" if err is None else f"{err:.2e}"


@dataclass
class ConversionReport:
    """The result of :func:`ndcompile.convert`, printable as a table.

    Attributes:
        mode: The conversion mode.
        layers: One entry per Linear/NdLinear layer found.
        params_before: Parameters of the whole original model.
        params_after: Parameters of the whole converted model.
        output_rel_error: Whole-model relative output error on the example input
            (None when not comparable, e.g. ``fresh`` mode).
        notes: Extra remarks (fallbacks, verification results).
        output: ``"module"`` (the user's class, layers swapped) or ``"graph"``.
        options: The conversion's options (:meth:`ConvertOptions.to_json`), replayed
            by ``load``.
    """

    mode: str
    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    output_rel_error: float | None = None
    notes: list[str] = field(default_factory=list)
    output: str = "graph"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def converted(self) -> list[LayerReport]:
        """Layers that were rewritten."""
        return [layer for layer in self.layers if layer.status != "skipped"]

    @property
    def skipped(self) -> list[LayerReport]:
        """Layers left as they were, each with a reason."""
        return [layer for layer in self.layers if layer.status == "skipped"]

    def layer(self, name: str) -> LayerReport:
        """The entry of layer ``name``."""
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise KeyError(f"no layer {name!r} in the report; layers: {[e.name for e in self.layers]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        data = asdict(self)
        data["converted"] = len(self.converted)
        data["skipped"] = len(self.skipped)
        return data

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON."""
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def __str__(self) -> str:
        header = ("layer", "status", "modes in -> out", "rank", "params", "FLOPs", "error")
        rows = [header]
        for e in self.layers:
            if e.status == "skipped":
                rows.append((e.name, "skipped", "-", "-", format_count(e.params_before), "-", "-"))
                continue
            err = e.output_rel_error if e.output_rel_error is not None else e.weight_rel_error
            rows.append(
                (
                    e.name,
                    e.status,
                    f"{format_shape(e.in_shape)} -> {format_shape(e.out_shape)}",
                    f"{e.rank}+{e.extra['lowrank']}"
                    if e.extra.get("lowrank")
                    else str(e.rank or "-"),
                    f"{format_count(e.params_before)} -> {format_count(e.params_after)}",
                    f"{format_count(e.flops_before)} -> {format_count(e.flops_after)}",
                    _fmt_err(err),
                )
            )
        widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
        lines = [f"ConversionReport(mode={self.mode!r})"]
        for k, row in enumerate(rows):
            lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
            if k == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        ratio = self.params_before / max(self.params_after, 1)
        lines.append(
            f"  model params: {self.params_before:,} -> {self.params_after:,} ({ratio:.2f}x fewer)"
        )
        if self.mode == "adapter":
            trainable = sum(e.params_after for e in self.converted)
            lines.append(f"  trainable (adapter) params: {trainable:,}")
        if self.output_rel_error is not None:
            lines.append(f"  model output relative error: {self.output_rel_error:.2e}")
        for e in self.skipped:
            lines.append(f"  skipped {e.name}: {e.reason}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def report_of(model: object) -> ConversionReport:
    """The ``.report`` that :func:`ndcompile.convert` attached to ``model``.

    Raises:
        TypeError: If ``model`` carries no conversion report.
    """
    report = getattr(model, "report", None)
    if not isinstance(report, ConversionReport):
        raise TypeError(f"{type(model).__name__} carries no ndcompile conversion report")
    return report
