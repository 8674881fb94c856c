"""Autotuning: timing candidate plans eagerly or compiled by inductor, and the decision cache.

``autotune="eager"`` (or ``True``) times each candidate program as the eager forward
runs it. ``autotune="inductor"`` compiles each candidate with inductor first and
times the compiled code, for layers that will run under ``torch.compile``: inductor
fuses copies into kernels and folds permutes into GEMM strides, so the fastest eager
plan is not always the fastest compiled one. Compiling costs seconds per candidate,
once per distinct layer shape: decisions are cached on disk, keyed on the mode too.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from ndcompile.errors import NdCompileError, first_line
from ndcompile.ir.program import ContractionProgram

__all__ = [
    "AUTOTUNE_MODES",
    "autotune_key",
    "autotune_setting",
    "check_autotune",
    "compile_program",
    "time_program",
]

#: Accepted ``autotune`` settings (``False`` is ``"off"``, ``True`` is ``"eager"``).
AUTOTUNE_MODES: tuple[str, ...] = ("off", "eager", "inductor")


def check_autotune(value: bool | str | None) -> str:
    """Normalise an ``autotune`` setting to one of :data:`AUTOTUNE_MODES`.

    Args:
        value: ``False``/``True`` or a mode name.

    Returns:
        The mode name.

    Raises:
        NdCompileError: On anything else.
    """
    if value is False or value is None:
        return "off"
    if value is True:
        return "eager"
    if isinstance(value, str) and value in AUTOTUNE_MODES:
        return value
    raise NdCompileError(
        f"unknown autotune setting {value!r}; valid settings are: False, True, "
        + ", ".join(repr(m) for m in AUTOTUNE_MODES),
        hint="'inductor' times candidates compiled by torch.compile's inductor; "
        "use it for layers that will run compiled",
    )


def autotune_setting(value: bool | str | None) -> bool | str:
    """The canonical stored form of a setting: ``False``, ``True`` or ``"inductor"``."""
    mode = check_autotune(value)
    return {"off": False, "eager": True}.get(mode, mode)


def autotune_key(
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    rank: int,
    batch: int,
    dtype: torch.dtype,
    device: str,
    mode: str = "eager",
) -> str:
    """Cache key of one autotune decision (eager keys keep their historical form)."""
    key = (
        f"{in_shape}->{out_shape} r{rank} b{batch} {dtype} {device} "
        f"t{torch.get_num_threads()} torch{torch.__version__}"
    )
    return key if mode == "eager" else f"{key} {mode}"


def _median_us(run: Callable[[], Any], reps: int, cuda: bool) -> float:
    with torch.no_grad():
        run()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _traced(program: ContractionProgram, n_operands: int) -> fx.GraphModule:
    """``program`` as an FX graph (the ops an FX or dynamo capture of the layer holds)."""
    graph = fx.Graph()
    tracer = fx.proxy.GraphAppendingTracer(graph)
    proxies = [fx.Proxy(graph.placeholder(f"operand{k}"), tracer) for k in range(n_operands)]
    graph.output(program.run(*proxies).node)
    return fx.GraphModule(torch.nn.Module(), graph)


def compile_program(
    program: ContractionProgram, operands: Sequence[torch.Tensor]
) -> Callable[..., Any]:
    """``program`` compiled by inductor for ``operands``' shapes (no dynamo, no guards).

    Raises:
        NdCompileError: When inductor cannot compile here (e.g. no C++ compiler).
    """
    from torch._inductor.compile_fx import compile_fx

    gm = _traced(program, len(operands))
    try:
        with torch.no_grad():
            return compile_fx(gm, list(operands))  # type: ignore[return-value]
    except Exception as exc:  # inductor's own errors vary by platform
        raise NdCompileError(
            f"autotune='inductor' could not compile a candidate plan: {type(exc).__name__}: "
            f"{first_line(exc)[:200]}",
            hint="use autotune=True to time the plans eagerly instead",
        ) from exc


def time_program(
    program: ContractionProgram,
    operands: list[torch.Tensor],
    reps: int,
    mode: str = "eager",
    tile: int = 0,
) -> float:
    """Median time of one run of ``program`` on ``operands``, in microseconds.

    Args:
        program: The candidate's program.
        operands: Input and factors, as the program expects them.
        reps: Timed repetitions (after one warm-up run).
        mode: ``"eager"`` or ``"inductor"`` (compiled first; compile time not counted).
        tile: Rows per tile: time the tiled CPU op instead (:mod:`ndcompile.ir.tiled`),
            which runs its tiles eagerly in either mode (inductor cannot see inside).

    Returns:
        The median, in microseconds.
    """
    cuda = operands[0].is_cuda
    if tile:
        from ndcompile.ir.tiled import run_tiled

        text = program.to_text()
        return _median_us(lambda: run_tiled(text, tile, operands[0], operands[1:]), reps, cuda)
    if mode == "inductor":
        compiled = compile_program(program, operands)
        return _median_us(lambda: compiled(*operands), reps, cuda)
    return _median_us(lambda: program.run(*operands), reps, cuda)
