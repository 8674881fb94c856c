"""Where a layer's bias goes, measured once per machine.

``addmm``/``baddbmm`` fold a bias into a GEMM by first copying the broadcast bias
over the whole output and then accumulating the product onto it. A plain GEMM
followed by an in-place add writes the output first and adds the bias while the
rows are still in cache. Which is faster depends on the machine's BLAS and memory:
on the AMD EPYC where folding was introduced it made a 256-row MLP layer about 6%
faster; on two Intel Xeons the in-place add made the MLP layer's last GEMM 3-22%
faster at 1,024 rows (by how much varied with the host's load), and within 5% either
way at 224.

:func:`bias_in_gemm` times both on that GEMM -- the transformer MLP's up-projection
768 -> 3072 as ``(24, 32) -> (48, 64)``, whose last step is a batched ``(48, 24) @
(24, 64)`` -- at a tile's 224 rows and at 1,024, and folds unless the add is faster
at 1,024 rows by :data:`MARGIN` and slower at 224 by less than :data:`MARGIN`.
:mod:`ndcompile.planner.machine` caches the answer with the cost model's constants.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ndcompile.planner.autotune import interleaved_times

__all__ = ["MARGIN", "bias_in_gemm"]

#: Fraction by which the in-place add must beat the folded bias at 1,024 rows.
MARGIN = 0.03

#: The probe: ``(48, 24) @ (24, 64)`` per row, plus a ``(48, 64)`` bias.
_LEFT, _RIGHT = (48, 24), (24, 64)


def _fastest(fns: list[Callable[[], object]], rounds: int) -> list[float]:
    """Fastest seconds of each function over interleaved rounds, after two warm-ups.

    The minimum, not the median: load from other processes only ever slows a run
    down, and interleaving makes it hit every function alike.
    """
    return [min(t) for t in interleaved_times(fns, rounds, warmups=2)]


def _add_over_fold(rows: int, rounds: int) -> float:
    """Time of GEMM then in-place add over time of the folded GEMM, at ``rows`` rows."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(*_LEFT, generator=gen).expand(rows, *_LEFT)
    b = torch.randn(rows, *_RIGHT, generator=gen)
    bias = torch.randn(_LEFT[0], _RIGHT[1], generator=gen)
    out = torch.empty(rows, _LEFT[0], _RIGHT[1])
    fold, add = _fastest(
        [
            lambda: torch.baddbmm(bias, a, b, out=out),
            lambda: torch.bmm(a, b, out=out).add_(bias),
        ],
        rounds,
    )
    return add / fold


def bias_in_gemm(device: str = "cpu", rounds: int = 15) -> bool:
    """Whether a bias is best folded into its GEMM on ``device`` (about 0.1 s on a CPU).

    Only CPUs are measured; other devices fold.

    Args:
        device: The device type.
        rounds: Interleaved timing rounds per size.

    Returns:
        False when the in-place add after the GEMM is clearly faster.
    """
    if torch.device(device).type != "cpu":
        return True
    with torch.no_grad():
        tile = _add_over_fold(224, rounds)
        batch = _add_over_fold(1024, rounds)
    return not (batch < 1 - MARGIN and tile < 1 + MARGIN)
