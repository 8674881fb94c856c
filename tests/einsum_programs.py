"""Einsum equations lowered to contraction programs, and seeded operands to run them on."""

from __future__ import annotations

import opt_einsum
import torch

from ndcompile.ir.lowering import compile_path
from ndcompile.ir.program import ContractionProgram

__all__ = ["lower", "operands"]


def lower(equation: str, shapes: list[tuple[int, ...]], optimizer: str, **kw) -> ContractionProgram:
    """``equation`` over operands of ``shapes``, lowered along opt_einsum's ``optimizer`` path."""
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    sizes = {}
    for term, shape in zip(terms, shapes, strict=True):
        sizes.update(zip(term, shape, strict=True))
    path, _ = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=optimizer)
    return compile_path([tuple(t) for t in terms], tuple(out), path, sizes, **kw)


def operands(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    """Seeded float64 operands of ``shapes``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
