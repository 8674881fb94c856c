"""Shared helpers of the benchmark scripts: timing, roofline, memory, tables, JSON.

Every timing is a list of per-call wall-clock samples summarised by the median and
the inter-quartile range (IQR), after a warm-up; CUDA work is synchronised before
each clock read. Tables are printed as Markdown so they paste into the README.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Timing",
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
    "write_json",
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


def pick_device(name: str) -> torch.device:
    """The requested device, failing clearly when CUDA is asked for but missing.

    Args:
        name: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        The device.

    Raises:
        SystemExit: If CUDA is requested and unavailable.
    """
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available in this torch build/machine")
    return device


def setup_torch(threads: int | None, seed: int) -> int:
    """Fix the intra-op thread count and the RNG seed.

    Args:
        threads: Threads for intra-op parallelism (None: all cores).
        seed: Seed for ``torch.manual_seed``.

    Returns:
        The thread count in effect.
    """
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(seed)
    return torch.get_num_threads()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock milliseconds of one ``fn()`` call (device work included)."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


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


def measure_roofline(device: torch.device, *, size: int = 2048, repeats: int = 7) -> float:
    """Best achieved GFLOP/s of a large square fp32 matmul (a practical compute roof).

    The fastest of ``repeats`` timed products is used: a roof is what the machine
    can reach, and on a shared machine slower samples measure other load.

    Args:
        device: Where to run.
        size: Matrix size ``n`` (``2 n^3`` FLOPs per product).
        repeats: Timed products.

    Returns:
        GFLOP/s.
    """
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best / 1e9


def measure_bandwidth(device: torch.device, *, mbytes: int = 256, repeats: int = 7) -> float:
    """Best achieved GB/s of a large copy between two resident buffers (read + write).

    The buffers are written once before timing, so page faults are not counted:
    this is the machine's memory roof, which a layer's compulsory traffic (its
    input, weights and output, each moved once) cannot beat.

    Args:
        device: Where to run.
        mbytes: Size of each buffer in MiB (well beyond the caches).
        repeats: Timed copies.

    Returns:
        GB/s, counting the bytes read and the bytes written.
    """
    n = (mbytes << 20) // 4
    src = torch.ones(n, device=device)
    dst = torch.zeros(n, device=device)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n * 4 / best / 1e9


def _rss_peak_kb() -> int | None:
    """Peak RSS of this process since the last reset (Linux ``VmHWM``), in kB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_now_kb() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``) so RSS tracks live memory."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(name).malloc_trim(0)


def _reset_rss_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False when unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> tuple[float, str]:
    """Peak memory growth while running ``fn()`` once.

    On CUDA this is ``torch.cuda.max_memory_allocated`` above the memory allocated
    before the call. On CPU it is the growth of the process's peak resident set:
    freed heap pages are first returned to the OS (``malloc_trim``), then ``VmHWM``
    is reset through ``/proc/self/clear_refs`` and read after the call. Where that
    is unsupported it falls back to the growth of ``ru_maxrss``, which only sees new
    process-wide peaks (method ``"ru_maxrss"``; often 0 after a warm-up).

    Args:
        fn: The work to measure (run once).
        device: Its device.

    Returns:
        ``(megabytes, method)``.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, "cuda_max_allocated"
    _trim_heap()
    if _reset_rss_peak():
        before = _rss_now_kb()
        fn()
        peak = _rss_peak_kb() or before
        return max(peak - before, 0) / 1024, "rss_hwm"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(after - before, 0) / 1024, "ru_maxrss"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    """Where the numbers come from: CPU, cores, threads, torch, device name, load."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


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


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON, creating parent folders."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return out
