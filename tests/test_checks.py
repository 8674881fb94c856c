"""Tests of ndcompile.checks: output comparison, tolerances, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ndcompile.errors import NdCompileError
from ndcompile.pipeline.checks import count_parameters, exact_tolerance, relative_error


def test_relative_error_over_nested_outputs() -> None:
    a = {"x": torch.ones(4), "y": (torch.zeros(2), torch.full((3,), 2.0))}
    b = {"x": torch.ones(4), "y": (torch.zeros(2), torch.full((3,), 2.0) + 0.1)}
    expected = math.sqrt(3 * 0.01) / math.sqrt(4 + 3 * 4.0)
    assert relative_error(a, b) == pytest.approx(expected)
    assert relative_error(a, a) == 0.0


def test_relative_error_structure_mismatch_is_an_error() -> None:
    with pytest.raises(NdCompileError, match="output structure differs"):
        relative_error((torch.ones(2, 3),), (torch.ones(2, 3, 1),))


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)],
)
def test_exact_tolerance_by_dtype(dtype: torch.dtype, tol: float) -> None:
    assert exact_tolerance(torch.zeros(2, dtype=dtype)) == tol


def test_count_parameters_counts_tied_weights_once() -> None:
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert count_parameters(nn.ModuleDict({"emb": emb, "head": head})) == 40
