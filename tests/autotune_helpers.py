"""Test helper: fake autotune timings given per (candidate, mode, tile) job."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["jobs_timed_by"]

#: ``fake(cand, operands, reps, mode, tile) -> µs`` for one timing job.
FakeTime = Callable[..., float]


def jobs_timed_by(fake: FakeTime) -> Callable[..., list[float]]:
    """A stand-in for ``ndcompile.planner.timed.time_jobs`` that asks ``fake`` per job.

    Args:
        fake: Called as ``fake(cand, operands, reps, mode, tile)`` for every job, in
            the order the planner lists them.

    Returns:
        ``time_jobs(jobs, operands, reps, recompute=...) -> [µs per job]``.
    """

    def time_jobs(
        jobs: Sequence[tuple[Any, str, int]],
        operands: list[torch.Tensor],
        reps: int,
        *,
        recompute: bool = True,
    ) -> list[float]:
        return [fake(cand, operands, reps, mode, tile) for cand, mode, tile in jobs]

    return time_jobs
