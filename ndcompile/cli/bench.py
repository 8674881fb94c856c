"""``ndcompile bench``: time the original and the converted model on this machine."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ndcompile.frontend.inputs import example_inputs

__all__ = ["format_timings", "median_times_ms", "time_models"]


def median_times_ms(
    fns: Sequence[Callable[[], Any]],
    *,
    repeat: int = 20,
    warmup: int = 3,
    min_warmup_s: float = 0.2,
) -> list[float]:
    """Median wall time of each ``fn()`` in milliseconds.

    The functions are warmed up (at least ``warmup`` calls each and ``min_warmup_s``
    seconds in all, so thread pools and allocators settle), then timed in turns,
    ``repeat`` times each, so that a slow phase of the machine hits all of them alike.
    """
    with torch.inference_mode():
        start, calls = time.perf_counter(), 0
        while calls < warmup or time.perf_counter() - start < min_warmup_s:
            for fn in fns:
                fn()
            calls += 1
        times: list[list[float]] = [[] for _ in fns]
        for _ in range(max(repeat, 1)):
            for fn, acc in zip(fns, times, strict=True):
                begin = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - begin)
    return [1e3 * statistics.median(acc) for acc in times]


def time_models(
    original: torch.nn.Module,
    converted: torch.nn.Module,
    example: Any,
    *,
    repeat: int = 20,
    warmup: int = 3,
) -> dict[str, Any]:
    """Median forward times of both models on ``example`` (any form convert takes), their ratio."""
    call = example_inputs(example)
    original_ms, converted_ms = median_times_ms(
        [lambda: call(original), lambda: call(converted)], repeat=repeat, warmup=warmup
    )
    return {
        "original_ms": original_ms,
        "converted_ms": converted_ms,
        "speedup": original_ms / converted_ms if converted_ms > 0 else float("inf"),
        "repeat": repeat,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "example_shapes": [list(t.shape) for t in call.tensors()],
        "example": call.describe(),
    }


def format_timings(result: dict[str, Any]) -> str:
    """The result of :func:`time_models` as a short table."""
    return "\n".join(
        [
            f"bench ({result.get('mode', '?')}): median of {result['repeat']} runs after "
            f"warm-up, {result['threads']} threads, input {result['example']}",
            f"  original   {result['original_ms']:9.3f} ms",
            f"  converted  {result['converted_ms']:9.3f} ms  "
            f"({result['speedup']:.2f}x {'faster' if result['speedup'] >= 1 else 'slower'})",
        ]
    )
