"""Timing candidate plans as a layer runs them: whole or tiled, forward or training step.

:func:`timed_candidates` turns the planner's candidates into timing jobs (a
candidate, an autotune mode and a tile), times them all in the same interleaved
rounds (:func:`ndcompile.planner.autotune.time_runs`) and keeps, per candidate, the
faster of its whole program and its tiled op where the layer could run either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ndcompile.ir.program import ContractionProgram
from ndcompile.ir.tiled import AUTO_WHOLE_TILES, choose_tile, row_elements, should_tile
from ndcompile.planner import autotune as tuning

if TYPE_CHECKING:
    from ndcompile.planner.plan import Candidate

__all__ = ["Job", "candidate_tile", "time_jobs", "timed_candidates"]

#: One timing job: a candidate, how it runs (an autotune mode) and its tile (0: whole).
Job = tuple["Candidate", str, int]


def candidate_tile(
    program: ContractionProgram,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    rank: int,
    itemsize: int,
) -> int:
    """Rows per tile a layer running ``program`` uses on the CPU (its automatic tile)."""
    modes = zip(in_shape, out_shape, strict=True)
    shapes = [(rank, h, d) if rank > 1 else (h, d) for d, h in modes]
    return choose_tile(row_elements(program, in_shape, shapes), itemsize)


def time_jobs(
    jobs: Sequence[Job], operands: list[torch.Tensor], reps: int, *, recompute: bool = True
) -> list[float]:
    """Median µs of each job, all prepared (compiled) first, then timed interleaved.

    Args:
        jobs: ``(candidate, mode, tile)`` triples.
        operands: Input and factors to time on.
        reps: Interleaved rounds.
        recompute: How a training layer runs (see
            :func:`~ndcompile.planner.autotune.prepare_run`).

    Returns:
        The medians, in ``jobs``' order.
    """
    runs = [
        tuning.prepare_run(c.plan.program, operands, mode, tile, recompute=recompute)
        for c, mode, tile in jobs
    ]
    return tuning.time_runs(runs, reps, operands[0].is_cuda)


def _jobs(
    cands: Sequence[Candidate],
    batch: torch.Tensor,
    mode: str,
    shapes: tuple[tuple[int, ...], tuple[int, ...], int, int],
    recompute: bool,
) -> list[tuple[int, Job]]:
    """Each candidate's whole program, and its tiled op where the layer may run that.

    A CPU batch of more than :data:`AUTO_WHOLE_TILES` tiles (two in training) runs
    the tiled op (whose tiles run eagerly, under inductor too); the whole program,
    compiled or not, is a choice too. So is a recomputing training step: the tiled op
    recomputes each tile in backward, the whole program the whole batch at once. A
    layer saving its intermediates never tiles a step.
    """
    tiles = recompute or not tuning.is_training(mode)
    whole = 2 if tuning.is_training(mode) else AUTO_WHOLE_TILES  # as the layer runs
    jobs: list[tuple[int, Job]] = []
    for k, cand in enumerate(cands):
        jobs.append((k, (cand, mode, 0)))
        tile = candidate_tile(cand.plan.program, *shapes) if tiles else 0
        if tile and should_tile(batch, tile, whole):
            jobs.append((k, (cand, tuning.eager_mode(mode), tile)))
    return jobs


def timed_candidates(
    cands: Sequence[Candidate],
    operands: list[torch.Tensor],
    reps: int,
    mode: str,
    shapes: tuple[tuple[int, ...], tuple[int, ...], int, int],
    *,
    recompute: bool = True,
) -> list[Candidate]:
    """``cands`` with their measured times, as the layer runs them.

    Args:
        cands: Candidates to time.
        operands: Input and factors to time on.
        reps: Interleaved rounds.
        mode: The autotune mode (not ``"off"``).
        shapes: ``(in_shape, out_shape, rank, itemsize)``, to size tiles.
        recompute: How a training layer runs.

    Returns:
        The candidates with ``measured_us`` set; ``whole`` set where the whole
        program beat the tiled op the layer would otherwise run.
    """
    owned = _jobs(cands, operands[0], mode, shapes, recompute)
    jobs = [job for _, job in owned]
    medians = time_jobs(jobs, operands, reps, recompute=recompute)
    whole: dict[int, float] = {}
    tiled: dict[int, float] = {}
    for (k, (_, _, tile)), us in zip(owned, medians, strict=True):
        (tiled if tile else whole)[k] = us
    timed = []
    for k, cand in enumerate(cands):
        if k not in tiled or whole[k] < tiled[k]:
            timed.append(dataclasses.replace(cand, measured_us=whole[k], whole=k in tiled))
        else:
            timed.append(dataclasses.replace(cand, measured_us=tiled[k]))
    return timed
