"""The machine under the numbers: device, threads, seed, compute and memory roofs, description."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Any

import torch

from timing import best_seconds

__all__ = [
    "TIMING_ENV",
    "add_machine_options",
    "machine_info",
    "measure_bandwidth",
    "measure_roofline",
    "pick_device",
    "setup_torch",
]


def add_machine_options(parser: argparse.ArgumentParser) -> None:
    """Add the ``--device``, ``--threads`` and ``--seed`` options, in that order.

    Args:
        parser: The script's parser; the options parse into ``device``, ``threads``
            and ``seed`` (inputs of :func:`pick_device` and :func:`setup_torch`).
    """
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all)")
    parser.add_argument("--seed", type=int, default=0)


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
    best = best_seconds(lambda: torch.matmul(a, b, out=out), device, repeats)
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
    best = best_seconds(lambda: dst.copy_(src), device, repeats)
    return 2.0 * n * 4 / best / 1e9


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: Environment variables that change CPU timings (the allocator's page faults above
#: all: see the README's CPU notes); recorded with the results when set.
TIMING_ENV: tuple[str, ...] = (
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_ARENA_MAX",
    "MALLOC_CONF",
    "THP_MEM_ALLOC_ENABLE",
    "LD_PRELOAD",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OMP_PROC_BIND",
    "KMP_AFFINITY",
    "GOMP_CPU_AFFINITY",
)


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    """Where the numbers come from: CPU, cores, threads, torch, device name, load.

    Args:
        device: The benchmark's device.
        threads: The intra-op thread count in effect.

    Returns:
        JSON-able description (``loadavg`` where the OS has it, ``gpu`` on CUDA,
        ``env``: the :data:`TIMING_ENV` variables that are set).
    """
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
    info["env"] = {k: os.environ[k] for k in TIMING_ENV if k in os.environ}
    return info
