"""Machine constants for the planner's cost model, measured once and cached on disk.

The cost model needs three numbers per device: sustained matmul throughput
(GFLOP/s of a mid-size matmul), memory bandwidth (GB/s of a large copy) and the
fixed overhead of one eager op (µs). One execution choice is measured with them
(:mod:`ndcompile.planner.calibrate`): whether a bias is folded into its GEMM.
:func:`machine_model` measures them once (about a second), caches them under the
user's cache directory keyed by device, thread count and torch version, and honours
overrides.

Overrides, in order: the ``NDCOMPILE_MACHINE`` environment variable (a JSON object,
e.g. ``{"matmul_gflops": 150, "bandwidth_gbs": 12, "op_overhead_us": 6}``, optionally
with ``"bias_in_gemm": false``; true when left out), then the cache file.
``NDCOMPILE_CACHE_DIR`` moves the cache (default ``$XDG_CACHE_HOME/ndcompile`` or
``~/.cache/ndcompile``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ndcompile.errors import NdCompileError
from ndcompile.planner.cache import JsonCache, cache_dir
from ndcompile.planner.calibrate import bias_in_gemm

__all__ = ["MachineModel", "cache_dir", "machine_cache", "machine_model", "measure"]


@dataclass(frozen=True)
class MachineModel:
    """Measured constants of one device.

    Attributes:
        matmul_gflops: Sustained GFLOP/s of a mid-size float32 matmul.
        bandwidth_gbs: GB/s of a large tensor copy (read + write counted).
        op_overhead_us: Fixed cost of launching one op, in microseconds.
        device: Device the numbers were measured on.
        bias_in_gemm: Fold a layer's bias into its last GEMM, else add it in place
            after the GEMM where no gradient is taken (measured on CPUs).
    """

    matmul_gflops: float
    bandwidth_gbs: float
    op_overhead_us: float
    device: str = "cpu"
    bias_in_gemm: bool = True

    def key(self) -> str:
        """A short identifier for cache keys."""
        return f"{self.device}:{self.matmul_gflops:.0f}:{self.bandwidth_gbs:.0f}"


def _best_time(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    """Fastest of ``reps`` runs: other load on the machine only ever slows a run down."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _sync(dev: torch.device) -> Callable[[], None]:
    """A function that waits for ``dev``'s queued work (a no-op off CUDA)."""
    return torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)


def _matmul_gflops(dev: torch.device, reps: int) -> float:
    """GFLOP/s of the fastest of ``reps`` 512x512 float32 matmuls on ``dev``.

    The operands are constants, not random: measuring must leave the caller's random
    stream alone (a converted model's fresh weights come from it).
    """
    n = 512
    a = torch.full((n, n), 0.5, device=dev)
    b = torch.full((n, n), 0.25, device=dev)
    sync = _sync(dev)

    def mm() -> None:
        torch.matmul(a, b)
        sync()

    return 2 * n**3 / _best_time(mm, reps) / 1e9


def measure(device: str = "cpu") -> MachineModel:
    """Measure the constants on ``device`` (about a second on a CPU)."""
    dev = torch.device(device)
    sync = _sync(dev)
    matmul_gflops = _matmul_gflops(dev, 10)
    big = torch.full((8 * 1024 * 1024,), 0.5, device=dev)

    def copy() -> None:
        big.clone()
        sync()

    t_copy = _best_time(copy, 5)
    tiny = torch.full((4,), 0.5, device=dev)

    def op() -> None:
        tiny.add(1.0)
        sync()

    t_op = _best_time(op, 200)
    return MachineModel(
        matmul_gflops=matmul_gflops,
        bandwidth_gbs=2 * big.numel() * 4 / t_copy / 1e9,
        op_overhead_us=t_op * 1e6,
        device=dev.type,
        bias_in_gemm=bias_in_gemm(dev.type),
    )


_MEMO: dict[str, MachineModel] = {}

#: A cached matmul rate this many times below a quick check was measured under load.
STALE_FACTOR = 1.25

_FIELDS = ("matmul_gflops", "bandwidth_gbs", "op_overhead_us")

#: The measured execution choice (a boolean).
_CHOICE = "bias_in_gemm"


def _model(values: list[Any], device: str, fold: bool) -> MachineModel:
    """A :class:`MachineModel` from the ``_FIELDS`` values, in that order, and the choice."""
    matmul_gflops, bandwidth_gbs, op_overhead_us = (float(v) for v in values)
    return MachineModel(matmul_gflops, bandwidth_gbs, op_overhead_us, device, fold)


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _parses_as_device(name: str) -> bool:
    """Whether ``name`` is a device torch can parse (``"cpu"``, ``"cuda"``, ...)."""
    try:
        torch.device(name)
    except RuntimeError:
        return False
    return True


def _valid_field(name: str, value: Any) -> bool:
    """Whether ``name: value`` may appear in a machine cache file."""
    if name == "device":
        return isinstance(value, str) and bool(value) and _parses_as_device(value)
    if name == _CHOICE:
        return isinstance(value, bool)
    return name in _FIELDS and _positive_number(value)


def machine_cache(device: str = "cpu") -> JsonCache:
    """The cache file of ``device`` at the current thread count and torch version."""
    key = f"{torch.device(device).type}-t{torch.get_num_threads()}-torch{torch.__version__}"
    return JsonCache(cache_dir() / f"machine-{key}.json", validate=_valid_field)


def _from_override(env: str, device: str) -> MachineModel:
    try:
        data = json.loads(env)
        values = [data[name] for name in _FIELDS]
        if not all(_positive_number(v) for v in values):
            raise ValueError("not positive numbers")
        fold = data.get(_CHOICE, True)
        if not isinstance(fold, bool):
            raise ValueError("bias_in_gemm is not a boolean")
        return _model(values, str(data.get("device", device)), fold)
    except (ValueError, KeyError, TypeError) as exc:
        raise NdCompileError(
            f"NDCOMPILE_MACHINE={env!r} is not a JSON object with matmul_gflops, "
            "bandwidth_gbs and op_overhead_us (positive numbers), and optionally "
            "bias_in_gemm (a boolean)",
        ) from exc


def _unless_stale(model: MachineModel, cache: JsonCache) -> MachineModel:
    """``model``, or the constants measured again when a quick check beats them.

    Constants measured while other processes loaded the machine would stay in the
    cache for good (seen: 36 GFLOP/s and 3 GB/s cached on a 2-core Xeon that runs
    its matmuls at 320 GFLOP/s and copies at 23 GB/s). So a cached model is checked
    once per process by three 512x512 matmuls (a few milliseconds): when they run
    :data:`STALE_FACTOR` times faster than the cache says, everything is measured
    again, each constant keeps the better of its measurements (the quick check's
    rate among them; load only ever slows a run down), the bias choice follows the
    measurement made on the quieter machine (the faster matmuls), and the cache is
    rewritten. Repeated, this converges on the unloaded machine's constants.
    """
    quick = _matmul_gflops(torch.device(model.device), 3)
    if quick < STALE_FACTOR * model.matmul_gflops:
        return model
    fresh = measure(model.device)
    best = dataclasses.replace(
        fresh if fresh.matmul_gflops > model.matmul_gflops else model,
        matmul_gflops=max(model.matmul_gflops, fresh.matmul_gflops, quick),
        bandwidth_gbs=max(model.bandwidth_gbs, fresh.bandwidth_gbs),
        op_overhead_us=min(model.op_overhead_us, fresh.op_overhead_us),
    )
    cache.update(asdict(best))
    return best


def machine_model(device: str = "cpu", *, refresh: bool = False) -> MachineModel:
    """The cost-model constants for ``device``: override, cache, or a fresh measurement.

    A cache file that is corrupt or holds values the cost model cannot use (missing,
    zero, negative, not numbers) is ignored with a
    :class:`~ndcompile.planner.cache.CacheWarning` naming it, and rewritten with a
    fresh measurement. Cached constants that a quick matmul shows were measured on a
    loaded machine are measured again (:func:`_unless_stale`).

    Raises:
        NdCompileError: If ``NDCOMPILE_MACHINE`` is set but is not valid JSON with the
            three fields as positive numbers.
    """
    env = os.environ.get("NDCOMPILE_MACHINE")
    if env:
        return _from_override(env, device)
    cache = machine_cache(device)
    key = cache.path.name
    if key in _MEMO and not refresh:
        return _MEMO[key]
    if not refresh:
        data = cache.load()
        missing = [name for name in (*_FIELDS, "device") if name not in data]
        if not missing:
            fold = data.get(_CHOICE)
            if fold is None:  # a cache written before the choice was measured
                fold = bias_in_gemm(data["device"])
                cache.update({_CHOICE: fold})
            model = _model([data[name] for name in _FIELDS], data["device"], fold)
            model = _unless_stale(model, cache)
            _MEMO[key] = model
            return model
        if data:
            cache.warn("lacks " + ", ".join(missing))
    model = measure(device)
    _MEMO[key] = model
    cache.update(asdict(model))  # a read-only cache only costs a re-measurement next time
    return model
