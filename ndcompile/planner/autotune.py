"""Autotuning: timing candidate plans eagerly or compiled by inductor, and the decision cache.

``autotune="eager"`` (or ``True``) times each candidate program as the eager forward
runs it. ``autotune="inductor"`` compiles each candidate with inductor first and
times the compiled code, for layers that will run under ``torch.compile``: inductor
fuses copies into kernels and folds permutes into GEMM strides, so the fastest eager
plan is not always the fastest compiled one. Compiling costs seconds per candidate,
once per distinct layer shape: decisions are cached on disk, keyed on the mode too.

``"eager-train"`` and ``"inductor-train"`` time a training step instead: the
forward as a training layer runs it (saving only its inputs, or the tiled op) and
the backward to the input and every factor. The plan that runs forward fastest can
train slower: its backward contracts in the reverse order over differently laid out
gradients.
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
    "eager_mode",
    "interleaved_times",
    "is_compiled",
    "is_training",
    "prepare_run",
    "time_program",
    "time_runs",
]

#: Accepted ``autotune`` settings (``False`` is ``"off"``, ``True`` is ``"eager"``).
AUTOTUNE_MODES: tuple[str, ...] = ("off", "eager", "inductor", "eager-train", "inductor-train")


def is_compiled(mode: str) -> bool:
    """Whether ``mode`` times candidates compiled by inductor."""
    return mode.startswith("inductor")


def is_training(mode: str) -> bool:
    """Whether ``mode`` times a training step (forward and backward)."""
    return mode.endswith("-train")


def eager_mode(mode: str) -> str:
    """The eager mode timing the same step as ``mode`` (forward, or forward+backward)."""
    return "eager-train" if is_training(mode) else "eager"


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
        "use it for layers that will run compiled; the '-train' modes time forward and "
        "backward, for layers that will be trained",
    )


def autotune_setting(value: bool | str | None) -> bool | str:
    """The canonical stored form of a setting: ``False``, ``True`` or the mode's name."""
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
    *,
    recompute: bool = True,
) -> str:
    """Cache key of one autotune decision (eager keys keep their historical form).

    A training mode's key also says when the layer saves its intermediates
    (``recompute=False``): its step runs other code than a recomputing layer's.
    """
    key = (
        f"{in_shape}->{out_shape} r{rank} b{batch} {dtype} {device} "
        f"t{torch.get_num_threads()} torch{torch.__version__}"
    )
    if is_training(mode) and not recompute:
        mode = f"{mode} saved"
    return key if mode == "eager" else f"{key} {mode}"


def interleaved_times(
    runs: Sequence[Callable[[], Any]], reps: int, *, cuda: bool = False, warmups: int = 1
) -> list[list[float]]:
    """Seconds of each run in each of ``reps`` interleaved rounds.

    Every run is first called ``warmups`` times; then each round runs each once,
    starting one later every round. Load on the machine and clock changes then fall
    on all runs alike, where timing one run's repetitions after another's would hand
    a slow stretch to whichever ran in it.

    Args:
        runs: The functions to time.
        reps: Timed rounds.
        cuda: Synchronize CUDA after each run.
        warmups: Untimed calls of each run before the rounds.

    Returns:
        Per run (in ``runs``' order), its ``reps`` times.
    """
    for run in runs:
        for _ in range(warmups):
            run()
    if cuda:
        torch.cuda.synchronize()
    times: list[list[float]] = [[] for _ in runs]
    n = len(runs)
    for round_ in range(reps):
        for k in range(n):
            j = (round_ + k) % n
            t0 = time.perf_counter()
            runs[j]()
            if cuda:
                torch.cuda.synchronize()
            times[j].append(time.perf_counter() - t0)
    return times


def time_runs(runs: Sequence[Callable[[], Any]], reps: int, cuda: bool = False) -> list[float]:
    """Median time of each run, in microseconds, timed in interleaved rounds.

    One warm-up call each, then :func:`interleaved_times`.

    Args:
        runs: Prepared runs (:func:`prepare_run`).
        reps: Timed rounds.
        cuda: Synchronize CUDA after each run.

    Returns:
        The medians, in ``runs``' order.
    """
    return [statistics.median(t) * 1e6 for t in interleaved_times(runs, reps, cuda=cuda)]


def _traced(program: ContractionProgram, n_operands: int) -> fx.GraphModule:
    """``program`` as an FX graph (the ops an FX or dynamo capture of the layer holds)."""
    graph = fx.Graph()
    tracer = fx.proxy.GraphAppendingTracer(graph)
    proxies = [fx.Proxy(graph.placeholder(f"operand{k}"), tracer) for k in range(n_operands)]
    graph.output(program.run(*proxies).node)
    return fx.GraphModule(torch.nn.Module(), graph)


def _training_forward(program: ContractionProgram) -> Callable[..., torch.Tensor]:
    """The untiled forward a training layer runs (:func:`run_recomputed`, row-major)."""
    from ndcompile.ir.autodiff import run_recomputed

    def forward(*operands: torch.Tensor) -> torch.Tensor:
        return run_recomputed(program, *operands).contiguous()

    return forward


def _traced_training(program: ContractionProgram, n_operands: int) -> fx.GraphModule:
    """One FX node calling the training forward (AOT autograd traces its backward)."""
    graph = fx.Graph()
    args = tuple(graph.placeholder(f"operand{k}") for k in range(n_operands))
    graph.output(graph.call_function(_training_forward(program), args))
    return fx.GraphModule(torch.nn.Module(), graph)


def _compile_error(exc: Exception, mode: str) -> NdCompileError:
    fallback = "autotune=True" if not is_training(mode) else f"autotune={eager_mode(mode)!r}"
    return NdCompileError(
        f"autotune={mode!r} could not compile a candidate plan: {type(exc).__name__}: "
        f"{first_line(exc)[:200]}",
        hint=f"use {fallback} to time the plans eagerly instead",
    )


def compile_program(
    program: ContractionProgram,
    operands: Sequence[torch.Tensor],
    *,
    train: bool = False,
    recompute: bool = True,
) -> Callable[..., Any]:
    """``program`` compiled by inductor for ``operands``' shapes (no dynamo, no guards).

    Args:
        program: The candidate's program.
        operands: Example input and factors.
        train: Compile for training (``operands`` should require grad): the forward
            now, its backward on the first backward call.
        recompute: With ``train``, the recomputing forward (:func:`run_recomputed`,
            what a layer with ``recompute=True`` runs); else the plain program, whose
            intermediates autograd saves.

    Raises:
        NdCompileError: When inductor cannot compile here (e.g. no C++ compiler).
    """
    from torch._inductor.compile_fx import compile_fx

    n = len(operands)
    gm = _traced_training(program, n) if train and recompute else _traced(program, n)
    try:
        with torch.set_grad_enabled(train):
            return compile_fx(gm, list(operands))  # type: ignore[return-value]
    except Exception as exc:  # inductor's own errors vary by platform
        raise _compile_error(exc, "inductor-train" if train else "inductor") from exc


def prepare_run(
    program: ContractionProgram,
    operands: Sequence[torch.Tensor],
    mode: str = "eager",
    tile: int = 0,
    *,
    recompute: bool = True,
) -> Callable[[], None]:
    """One run of ``program`` on ``operands`` as a layer runs it, ready to time.

    Args:
        program: The candidate's program.
        operands: Input and factors, as the program expects them (left untouched).
        mode: One of :data:`AUTOTUNE_MODES` but ``"off"``: ``"inductor"`` modes
            compile here, the backward too (so no compile time is timed);
            ``"-train"`` modes run the forward and the backward to every operand.
        tile: Rows per tile: run the tiled CPU op instead (:mod:`ndcompile.ir.tiled`),
            which runs its tiles eagerly in either mode (inductor cannot see inside).
        recompute: How a training layer runs (``NdLinear(recompute=...)``): saving
            only its inputs and recomputing the rest in backward, or saving every
            intermediate (the plain program under autograd).

    Returns:
        A function running one forward (no grad) or one training step.

    Raises:
        NdCompileError: When inductor cannot compile the forward or the backward.
    """
    train = is_training(mode)
    ops = [t.detach().requires_grad_(train) for t in operands]
    forward: Callable[..., Any]
    if tile:
        from ndcompile.ir.tiled import run_tiled

        text = program.to_text()

        def forward(x: torch.Tensor, *factors: torch.Tensor) -> Any:
            return run_tiled(text, tile, x, factors)

    elif is_compiled(mode):
        forward = compile_program(program, ops, train=train, recompute=recompute)
    else:
        forward = _training_forward(program) if train and recompute else program.run
    if not train:

        def run() -> None:
            with torch.no_grad():
                forward(*ops)

        return run
    with torch.enable_grad():
        # Ones, not random numbers: timing must leave the caller's random stream alone.
        grad_out = torch.ones_like(forward(*ops))

    def step() -> None:
        with torch.enable_grad():
            torch.autograd.grad(forward(*ops), ops, grad_out)

    if is_compiled(mode) and not tile:
        try:  # inductor compiles the backward on its first call
            step()
        except Exception as exc:
            raise _compile_error(exc, mode) from exc
    return step


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
        mode: How it runs (see :func:`prepare_run`).
        tile: Rows per tile of the tiled CPU op, or 0 (see :func:`prepare_run`).

    Returns:
        The median, in microseconds.
    """
    run = prepare_run(program, operands, mode, tile)
    return time_runs([run], reps, operands[0].is_cuda)[0]
