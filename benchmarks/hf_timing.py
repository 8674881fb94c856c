"""Timing the Hugging Face variants under ``torch.compile``, and their speedups over dense.

Eager latencies come from ``bench_models.time_models``; here the compiled ones are
measured so that a variant ``torch.compile`` fails on records the error and keeps
its eager numbers, instead of stopping the benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bench_models import _phases, _rel_err
from timing import time_interleaved, timing_fields

__all__ = ["PHASES", "speedups", "time_compiled"]

#: Timed phases: (record key prefix, ``_phases`` index, compiled).
PHASES = (
    ("eager_fwd", 0, False),
    ("eager_train", 1, False),
    ("compiled_fwd", 0, True),
    ("compiled_train", 1, True),
)


def _error_text(exc: BaseException, limit: int = 2000) -> str:
    """``"Type: message"`` of an exception, cut to ``limit`` characters (``...`` marks a cut)."""
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _recompile_room(n_models: int) -> Any:
    """A dynamo config patch with room for every variant's forward and training graph.

    The recompile limit counts graphs per code object, and every variant runs the
    same ``forward`` code (default limit 8: exactly four variants).
    """
    config = torch._dynamo.config
    key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch({key: max(getattr(config, key), 4 * n_models + 8)})


def _compile_all(
    models: Mapping[str, nn.Module], x: Tensor, out: dict[str, dict[str, Any]]
) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """Compile every model (first call: forward); failures go to ``out[name]["compile_error"]``."""
    runs = {}
    for name, model in models.items():
        try:
            compiled = torch.compile(model, backend="inductor", dynamic=False)
            with torch.no_grad():
                ref, start = model(x), time.perf_counter()
                got = compiled(x)
                out[name]["compile_fwd_s"] = time.perf_counter() - start
                out[name]["compiled_rel_err"] = _rel_err(ref, got)
        except Exception as exc:  # a compile failure is a result, not a crash
            out[name]["compile_error"] = f"compiled_fwd: {_error_text(exc)}"
            continue
        runs[name] = _phases(compiled, x)  # type: ignore[arg-type]
    return runs


def _time_phase(
    fns: Mapping[str, Callable[[], None]],
    label: str,
    out: dict[str, dict[str, Any]],
    device: torch.device,
    time_kw: Mapping[str, Any],
) -> None:
    """Time one compiled phase of every model; a failing model gets ``compile_error``."""

    def on_error(name: str, exc: BaseException) -> None:
        out[name]["compile_error"] = f"{label}: {_error_text(exc)}"

    for name, t in time_interleaved(fns, device, on_error=on_error, **time_kw).items():
        out[name].update(timing_fields(label, t))


def time_compiled(
    models: Mapping[str, nn.Module],
    x: Tensor,
    device: torch.device,
    time_kw: Mapping[str, Any],
) -> dict[str, dict[str, Any]]:
    """Compiled forward and training-step latencies, interleaved across the models.

    Like ``bench_models.time_models`` with ``compile_=True``, except that a model
    ``torch.compile`` fails on (while compiling or running either phase) is dropped
    from the later phases and its error text stored as ``compile_error``.

    Args:
        models: Models by variant name (``model(x) -> Tensor``).
        x: Their input.
        device: Device to synchronise on.
        time_kw: Keyword arguments of ``common.time_interleaved``.

    Returns:
        Per model: ``compiled_{fwd,train}_{ms,iqr_ms,min_ms}``, ``compiled_rel_err``
        (compiled vs eager output), ``compile_fwd_s`` (the first, compiling, forward
        call) and, on failure, ``compile_error``.
    """
    torch._dynamo.reset()
    out: dict[str, dict[str, Any]] = {name: {} for name in models}
    with _recompile_room(len(models)):
        runs = _compile_all(models, x, out)
        for label, index, compiled in PHASES:
            if compiled:
                fns = {n: r[index] for n, r in runs.items() if "compile_error" not in out[n]}
                _time_phase(fns, label, out, device, time_kw)
    return out


def speedups(sides: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Dense over variant: parameters and the latency of every phase (None where missing)."""
    dense = sides["dense"]
    ratios: dict[str, dict[str, float | None]] = {}
    for name, side in sides.items():
        r: dict[str, float | None] = {"params": dense["params"] / side["params"]}
        for label, _, _ in PHASES:
            for key in (f"{label}_ms", f"{label}_min_ms"):
                a, b = dense.get(key), side.get(key)
                r[key] = a / b if a and b else None
        ratios[name] = r
    return ratios
