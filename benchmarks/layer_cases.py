"""Layer benchmark cases: shapes and batch, their selection, the reference layer and its FLOPs.

A case is one NdLinear shape ``(B, *in_shape) -> (B, *out_shape)``. Every variant of
a case starts from the reference ``ndlinear.NdLinear`` built here, and
:func:`reference_flops` counts what that layer's own order of contractions costs.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

from torch import nn

__all__ = [
    "CASES",
    "DEFAULT_CASES",
    "QUICK_CASES",
    "Case",
    "reference_flops",
    "reference_layer",
    "select_cases",
    "tltorch_rank",
]


@dataclass(frozen=True)
class Case:
    """One benchmark shape: ``(B, *in_shape) -> (B, *out_shape)``."""

    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    batch: int
    note: str = ""

    def describe(self) -> str:
        """``(32,32,3)->(32,32,3) B=64``."""
        fmt = ",".join
        return f"({fmt(map(str, self.in_shape))})->({fmt(map(str, self.out_shape))}) B={self.batch}"


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("image32", (32, 32, 3), (32, 32, 3), 64, "image-like, paper's CIFAR case"),
        Case("cube16_b256", (16, 16, 16), (16, 16, 16), 256, "cubic"),
        Case("cube16_b512", (16, 16, 16), (16, 16, 16), 512, "cubic, large batch"),
        Case("wide64", (64, 64, 8), (32, 32, 8), 32, "large modes, shrinking"),
        Case("mlp768", (24, 32), (48, 64), 4096, "transformer MLP 768->3072, B*T=4096"),
        Case("4mode8", (8, 8, 8, 8), (8, 8, 8, 8), 64, "four modes"),
        Case("tiny", (8, 8, 4), (8, 8, 4), 16, "smoke-test size"),
    )
}
DEFAULT_CASES = ("image32", "cube16_b256", "cube16_b512", "wide64", "mlp768", "4mode8")
QUICK_CASES = ("tiny", "image32")


def select_cases(patterns: str | None, quick: bool) -> list[Case]:
    """Cases matching comma-separated names or globs (default: the full or quick set).

    Args:
        patterns: The ``--cases`` text (None or empty: the default set).
        quick: Default to :data:`QUICK_CASES` instead of :data:`DEFAULT_CASES`.

    Returns:
        The matching cases, each once, in the order first matched.

    Raises:
        SystemExit: If a pattern matches no case.
    """
    if not patterns:
        return [CASES[n] for n in (QUICK_CASES if quick else DEFAULT_CASES)]
    chosen: list[Case] = []
    for pat in patterns.split(","):
        hits = [c for n, c in CASES.items() if fnmatch.fnmatch(n, pat.strip())]
        if not hits:
            raise SystemExit(f"--cases: no case matches {pat!r}; cases are: {', '.join(CASES)}")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def reference_layer(case: Case) -> nn.Module:
    """A new reference ``ndlinear.NdLinear`` of the case's shapes (random weights).

    Raises:
        SystemExit: If the reference package ``ndlinear`` is not installed.
    """
    try:
        import ndlinear
    except ImportError as exc:  # pragma: no cover - dev dependency
        raise SystemExit(
            "the reference package `ndlinear` is required: pip install ndlinear"
        ) from exc
    return ndlinear.NdLinear(case.in_shape, case.out_shape)


def reference_flops(case: Case) -> int:
    """FLOPs of the reference layer's own order: one Linear per mode, first to last.

    Mode ``k`` maps ``d_k -> h_k`` while modes before it already have their output
    sizes and modes after it their input sizes.
    """
    total = 0
    for k, (d, h) in enumerate(zip(case.in_shape, case.out_shape, strict=True)):
        rows = case.batch * math.prod(case.out_shape[:k]) * math.prod(case.in_shape[k + 1 :])
        total += 2 * rows * d * h
    return total


def tltorch_rank(case: Case) -> int:
    """CP rank with the parameters of the rank-1 NdLinear: ``Σ dᵢhᵢ / (Σ dᵢ + Σ hᵢ)``."""
    nd = sum(d * h for d, h in zip(case.in_shape, case.out_shape, strict=True))
    return max(1, round(nd / (sum(case.in_shape) + sum(case.out_shape))))
