"""Wall-clock timing of benchmark callables: per-call samples, median and IQR, interleaving.

Every timing is a list of per-call wall-clock samples summarised by the median and
the inter-quartile range (IQR), after a warm-up; CUDA work is synchronised before
each clock read.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = [
    "Timing",
    "best_seconds",
    "summarise",
    "sync_device",
    "time_call",
    "time_interleaved",
    "timing_fields",
]


@dataclass(frozen=True)
class Timing:
    """Summary of per-call timings, in milliseconds.

    Attributes:
        median_ms: Median of the samples.
        iqr_ms: Inter-quartile range (75th minus 25th percentile).
        samples: Number of timed calls.
        min_ms: Fastest sample (least disturbed by other load on a shared machine).
    """

    median_ms: float
    iqr_ms: float
    samples: int
    min_ms: float = 0.0

    def to_dict(self) -> dict[str, float]:
        """Plain-data form."""
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ± {self.iqr_ms / 2:.3f}"


def timing_fields(label: str, timing: Timing) -> dict[str, float]:
    """The record fields of one timing: ``{label}_ms``, ``{label}_iqr_ms``, ``{label}_min_ms``.

    Args:
        label: Prefix of the keys (a phase or variant name).
        timing: The measured timing.

    Returns:
        Median, IQR and fastest sample under their keys, in that order.
    """
    return {
        f"{label}_ms": timing.median_ms,
        f"{label}_iqr_ms": timing.iqr_ms,
        f"{label}_min_ms": timing.min_ms,
    }


def sync_device(device: torch.device) -> None:
    """Wait for the queued work of ``device`` (a no-op on CPU).

    Args:
        device: The device whose work must be finished before a clock read.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock milliseconds of one ``fn()`` call (device work included)."""
    t0 = time.perf_counter()
    fn()
    sync_device(device)
    return (time.perf_counter() - t0) * 1e3


def best_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` timed ``fn()`` calls, in seconds, synchronised around each.

    Args:
        fn: One unit of work (already warm).
        device: Device to synchronise on before and after every call.
        repeats: Timed calls.

    Returns:
        The shortest wall-clock time seen (``inf`` when ``repeats`` is 0).
    """
    best = float("inf")
    for _ in range(repeats):
        sync_device(device)
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        best = min(best, time.perf_counter() - t0)
    return best


def summarise(samples: Sequence[float]) -> Timing:
    """Median, IQR and minimum of per-call samples (ms)."""
    if not samples:
        raise ValueError("no timing samples")
    if len(samples) >= 4:
        q1, _, q3 = statistics.quantiles(samples, n=4)
    else:
        q1 = q3 = samples[0]
    return Timing(statistics.median(samples), q3 - q1, len(samples), min(samples))


def _warm(fn: Callable[[], Any], device: torch.device, warmup: int) -> float:
    """Run ``warmup`` calls (at least 2); the fastest of the last two estimates one call, ms."""
    times = [_timed(fn, device) for _ in range(max(warmup, 2))]
    return max(min(times[-2:]), 1e-4)


def time_call(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 5,
    min_iters: int = 10,
    max_iters: int = 200,
    budget_s: float = 1.0,
) -> Timing:
    """Time ``fn()`` call by call.

    After ``warmup`` calls (the first may compile), the number of timed calls is
    chosen from the speed of the last warm-up calls so that the measurement takes
    about ``budget_s`` seconds, clamped to ``[min_iters, max_iters]``.

    Args:
        fn: A zero-argument callable doing one unit of work.
        device: Device to synchronise on before every clock read.
        warmup: Untimed calls first (compilation, caches, allocator).
        min_iters: Fewest timed calls.
        max_iters: Most timed calls.
        budget_s: Target wall-clock time of the timed calls.

    Returns:
        Median, IQR and minimum of the per-call times.
    """
    per_call_ms = _warm(fn, device, warmup)
    iters = int(min(max_iters, max(min_iters, budget_s * 1e3 / per_call_ms)))
    return summarise([_timed(fn, device) for _ in range(iters)])


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    device: torch.device,
    *,
    warmup: int = 5,
    min_iters: int = 10,
    max_iters: int = 200,
    budget_s: float = 1.0,
    burst_ms: float = 20.0,
    on_error: Callable[[str, BaseException], None] | None = None,
) -> dict[str, Timing]:
    """Time several callables in interleaved rounds, so slow periods hit all alike.

    On a shared machine, load comes and goes over seconds; timing one variant after
    another turns that drift into fake speedups. Here every round runs a short
    burst of each callable in turn (rotating the order): ``k`` timed calls, where
    ``k`` makes the burst about ``burst_ms`` long, after one untimed call that
    brings its weights back into cache. Rounds continue until about
    ``budget_s * len(fns)`` seconds are spent, with at least ``min_iters`` and at
    most ``max_iters`` rounds.

    Args:
        fns: Callables by name.
        device: Device to synchronise on before every clock read.
        warmup: Untimed calls of each callable first (compilation, caches).
        min_iters: Fewest rounds (each callable gets at least this many samples).
        max_iters: Most rounds.
        budget_s: Target seconds of timed calls per callable.
        burst_ms: Target length of one burst.
        on_error: Called with the name and exception of a callable that raises
            (it is then dropped); without it the exception propagates.

    Returns:
        Timings by name (callables dropped after an error are absent).
    """
    per_call: dict[str, float] = {}
    for name, fn in fns.items():
        try:
            per_call[name] = _warm(fn, device, warmup)
        except Exception as exc:
            if on_error is None:
                raise
            on_error(name, exc)
    names = list(per_call)
    if not names:
        return {}
    burst = {n: max(1, min(50, int(burst_ms / per_call[n]))) for n in names}
    round_ms = sum(burst[n] * per_call[n] for n in names)
    rounds = int(min(max_iters, max(min_iters, budget_s * 1e3 * len(names) / round_ms)))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            if burst[name] > 1:
                fn()
            samples[name].extend(_timed(fn, device) for _ in range(burst[name]))
    return {n: summarise(samples[n]) for n in names}
