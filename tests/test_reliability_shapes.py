"""Reliability of converted models on leading (batch) dims other than the example's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ndcompile import NdLinear, convert

from reliability_models import TokenMLP, dense_equivalent, rel_error

pytestmark = pytest.mark.usefixtures("isolated_cache")


# ---------------------------------------------------------------- dynamic shapes


def _leading_dim_cases() -> list:
    cases = []
    for example in [(2, 5), (4,)]:
        for lead in [(1,), (7,), (2, 1), (2, 3), (4, 11), (2, 3, 4), ()]:
            cases.append(pytest.param(example, lead, id=f"{example}->{lead}"))
    return cases


@pytest.mark.parametrize(("example", "lead"), _leading_dim_cases())
def test_converted_mlp_accepts_any_leading_dims(
    example: tuple[int, ...], lead: tuple[int, ...]
) -> None:
    model = TokenMLP()
    gm = convert(model, torch.randn(*example, 64), mode="fresh")
    x = torch.randn(*lead, 64)
    out = gm(x)
    assert out.shape == model(x).shape
    torch.testing.assert_close(out, dense_equivalent(model, gm)(x))
    if lead:  # positions along leading dims are never mixed
        torch.testing.assert_close(out[..., :1, :], gm(x[..., :1, :]))


def _nd_stack() -> nn.Module:
    return nn.Sequential(
        NdLinear((8, 8), (8, 8)), nn.ReLU(), NdLinear((8, 8), (4, 4), rank=2)
    ).double()


@pytest.mark.parametrize(
    ("example", "lead"),
    [
        pytest.param((3,), (3,), id="same"),
        pytest.param((3,), (5,), id="batch"),
        pytest.param((3,), (2, 5), id="extra-dim"),
        pytest.param((3,), (), id="unbatched"),
        pytest.param((2, 3), (2, 5), id="3d-example"),
        pytest.param((2, 3), (), id="3d-example-unbatched"),
    ],
)
def test_exact_mode_keeps_ndlinear_leading_dims(
    example: tuple[int, ...], lead: tuple[int, ...]
) -> None:
    model = _nd_stack()
    gm = convert(model, torch.randn(*example, 8, 8, dtype=torch.float64), mode="exact")
    x = torch.randn(*lead, 8, 8, dtype=torch.float64)
    out = gm(x)
    assert out.shape == model(x).shape
    assert rel_error(model(x), out) < 1e-12


@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param((4, 5, 3), id="4-5-3"),
        pytest.param((16, 24, 8), id="16-24-8"),
    ],
)
@pytest.mark.parametrize(
    "batch",
    [
        1,
        2,
    ],
)
def test_exact_mode_example_batch_size_does_not_matter(
    sizes: tuple[int, int, int], batch: int
) -> None:
    n, h, m = sizes
    net = nn.Sequential(nn.Linear(n, h, bias=False), nn.Linear(h, m, bias=False)).double()
    gm = convert(net, torch.randn(batch, n, dtype=torch.float64), mode="exact")
    assert any("fused linear region" in note for note in gm.report.notes)
    for b in (1, 3):
        x = torch.randn(b, n, dtype=torch.float64)
        assert rel_error(net(x), gm(x)) < 1e-12
