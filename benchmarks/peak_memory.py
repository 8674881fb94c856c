"""Peak memory growth of one call: CUDA allocator peak, or the process's peak resident set on CPU.

On CPU the resident set counts what the heap keeps: freed pages are handed back
to the OS first (glibc ``malloc_trim``) and the kernel's peak counter is reset
(``/proc/self/clear_refs``), so the growth seen is that of the call alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import resource
from collections.abc import Callable
from typing import Any

import torch

from timing import sync_device

__all__ = ["peak_memory_mb"]


def _proc_status_kb(field: str) -> int | None:
    """One ``kB`` field of ``/proc/self/status`` (``"VmHWM:"``, ``"VmRSS:"``).

    Args:
        field: The line's prefix, colon included.

    Returns:
        Its value in kB, or None where the file or the field is missing.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_peak_kb() -> int | None:
    """Peak RSS of this process since the last reset (Linux ``VmHWM``), in kB."""
    return _proc_status_kb("VmHWM:")


def _rss_now_kb() -> int:
    """Current RSS (Linux ``VmRSS``) in kB; elsewhere the process's ``ru_maxrss``."""
    now = _proc_status_kb("VmRSS:")
    if now is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return now


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
        sync_device(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync_device(device)
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
