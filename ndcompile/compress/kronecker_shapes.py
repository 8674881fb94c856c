"""Mode shapes of Kronecker sums: checks, balanced splits of a size, parameter counts.

An NdLinear over input modes ``in_shape = (d1, ..., dN)`` and output modes
``out_shape = (h1, ..., hN)`` stands for a ``(prod(h), prod(d))`` dense weight. The
checks here name the layer and the mismatch; :func:`plan_mode_shapes` proposes
balanced modes for a feature count, and the counts compare a rank-R Kronecker sum
with the dense weight.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from fractions import Fraction

from torch import Tensor

from ndcompile.errors import NdCompileError

__all__ = ["dense_params", "kronecker_params", "plan_mode_shapes"]


def _check_modes(in_shape: Sequence[int], out_shape: Sequence[int], layer: str | None) -> None:
    ok = len(in_shape) == len(out_shape) >= 1 and all(
        isinstance(s, int) and s >= 1 for s in (*in_shape, *out_shape)
    )
    if not ok:
        raise NdCompileError(
            f"invalid mode shapes in_shape={tuple(in_shape)}, out_shape={tuple(out_shape)}: "
            "they must be non-empty tuples of positive ints of equal length",
            layer=layer,
            hint="pass one input and one output size per mode, e.g. (24, 32) and (48, 64)",
        )


def _check_weight(
    w: Tensor, in_shape: Sequence[int], out_shape: Sequence[int], layer: str | None
) -> None:
    _check_modes(in_shape, out_shape, layer)
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise NdCompileError(
            f"weight must be a 2-D floating-point tensor (out_features, in_features), got {shape}",
            layer=layer,
            hint="pass the nn.Linear weight, e.g. layer.weight.detach()",
        )
    if math.prod(out_shape) != w.shape[0] or math.prod(in_shape) != w.shape[1]:
        raise NdCompileError(
            f"mode shapes do not match weight of shape {tuple(w.shape)}: prod(out_shape="
            f"{tuple(out_shape)})={math.prod(out_shape)} must equal {w.shape[0]} and "
            f"prod(in_shape={tuple(in_shape)})={math.prod(in_shape)} must equal {w.shape[1]}",
            layer=layer,
            hint="choose mode shapes whose products are out_features and in_features "
            "(see plan_mode_shapes)",
        )


def _max_rank(in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """Largest rank worth asking for: min(n) for N = 2, prod(n)/max(n) in general."""
    n = [h * d for h, d in zip(out_shape, in_shape, strict=True)]
    return math.prod(n) // max(n)


def _check_rank(
    rank: int, in_shape: Sequence[int], out_shape: Sequence[int], layer: str | None
) -> None:
    top = _max_rank(in_shape, out_shape)
    if not isinstance(rank, int) or rank < 1 or rank > top:
        raise NdCompileError(
            f"rank={rank} is invalid for in_shape={tuple(in_shape)}, "
            f"out_shape={tuple(out_shape)}: it must be between 1 and {top}",
            layer=layer,
            hint=f"use a rank in [1, {top}]; rank {top} already represents any weight exactly",
        )


@functools.lru_cache(maxsize=1024)
def plan_mode_shapes(n: int, modes: int) -> tuple[int, ...] | None:
    """Split ``n`` into ``modes`` integer factors (each >= 2) as balanced as possible.

    Balance is measured by the ratio max/min; the result is sorted ascending and
    among equally balanced splits the lexicographically smallest is returned.

    Args:
        n: The number to split (e.g. in_features).
        modes: Number of factors.

    Returns:
        The factors, e.g. ``plan_mode_shapes(768, 2) == (24, 32)``, or ``None`` if no
        split without a factor of 1 exists (prime ``n`` for ``modes >= 2``, too small ``n``).

    Raises:
        NdCompileError: If ``n`` or ``modes`` is not a positive int.
    """
    if not isinstance(n, int) or not isinstance(modes, int) or n < 1 or modes < 1:
        raise NdCompileError(
            f"plan_mode_shapes needs positive ints, got n={n!r}, modes={modes!r}",
            hint="pass the feature count and the number of modes, e.g. (768, 2)",
        )
    best: tuple[Fraction, tuple[int, ...]] | None = None

    def search(rest: int, left: int, lo: int, prefix: tuple[int, ...]) -> None:
        nonlocal best
        if left == 1:
            if rest >= lo:
                cand = (*prefix, rest)
                key = (Fraction(cand[-1], cand[0]), cand)
                if best is None or key < best:
                    best = key
            return
        f = lo
        while f**left <= rest:
            if rest % f == 0:
                search(rest // f, left - 1, f, (*prefix, f))
            f += 1

    search(n, modes, 2, ())
    return None if best is None else best[1]


def kronecker_params(in_shape: Sequence[int], out_shape: Sequence[int], rank: int) -> int:
    """Parameter count of a rank-R Kronecker sum: ``rank * sum(h_i * d_i)``."""
    _check_modes(in_shape, out_shape, None)
    return rank * sum(h * d for h, d in zip(out_shape, in_shape, strict=True))


def dense_params(in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """Parameter count of the dense weight: ``prod(h) * prod(d)``."""
    _check_modes(in_shape, out_shape, None)
    return math.prod(out_shape) * math.prod(in_shape)
