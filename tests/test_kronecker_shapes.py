"""Tests of ndcompile.compress.kronecker_shapes: balanced mode shapes and parameter counts."""

from __future__ import annotations

import math

import pytest

from ndcompile.compress.kronecker_shapes import dense_params, kronecker_params, plan_mode_shapes
from ndcompile.errors import NdCompileError


@pytest.mark.parametrize(
    ("n", "modes", "expected"),
    [
        (768, 2, (24, 32)),
        (3072, 2, (48, 64)),
        (4096, 3, (16, 16, 16)),
        (4096, 2, (64, 64)),
        (12, 2, (3, 4)),
        (18, 2, (3, 6)),
        (8, 3, (2, 2, 2)),
        (1024, 4, (4, 4, 8, 8)),
        (5, 1, (5,)),
        (7, 2, None),  # prime
        (4099, 3, None),  # prime
        (4, 3, None),  # too small
        (1, 1, None),
        (6, 2, (2, 3)),
    ],
)
def test_plan_mode_shapes(n: int, modes: int, expected: tuple[int, ...] | None) -> None:
    got = plan_mode_shapes(n, modes)
    assert got == expected
    if got is not None:
        assert math.prod(got) == n and list(got) == sorted(got) and min(got) >= 2


def test_plan_mode_shapes_is_cached_and_validates() -> None:
    assert plan_mode_shapes(768, 2) is plan_mode_shapes(768, 2)
    assert plan_mode_shapes.cache_info().hits >= 1
    with pytest.raises(NdCompileError, match="positive"):
        plan_mode_shapes(0, 2)


def test_param_counts() -> None:
    assert kronecker_params((24, 32), (48, 64), 4) == 4 * (48 * 24 + 64 * 32)
    assert dense_params((24, 32), (48, 64)) == 768 * 3072
