"""Tests of the backend on whole models and graphs: graph breaks, direct calls, the example."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import nn

from ndcompile.backends.dynamo import ndcompile_backend, rewrite_dynamo_graph
from ndcompile.errors import NdCompileError
from ndcompile.report import ConversionReport

from backend_helpers import ROOT, NdNet, backend_compile, capture

ndlinear = pytest.importorskip("ndlinear")


# -------------------------------------------------------------- whole models
class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.nd = ndlinear.NdLinear((4, 6), (4, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.nd(x)
        if x.sum() > 0:  # data-dependent: a graph break
            return self.nd(y * 0.5)
        return -y


def test_graph_break_compiles_and_matches() -> None:
    torch.manual_seed(0)
    model = Branchy()
    reports: list[ConversionReport] = []
    compiled = backend_compile(model, reports, inductor=False)
    for sign in (1.0, -1.0):
        x = sign * torch.randn(3, 4, 6).abs()
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert len(reports) >= 2
    assert sum(len(r.converted) for r in reports) >= 2


class Block(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


@pytest.mark.parametrize("train", [True, False])
def test_transformer_block_matches_eager(train: bool) -> None:
    torch.manual_seed(0)
    model = Block().train(train)
    model.attn.dropout = 0.0
    compiled = backend_compile(model, inductor=False)
    x = torch.randn(2, 5, 16)
    with torch.set_grad_enabled(train):
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ graphs
def test_report_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = Branchy().nd
    compiled = backend_compile(model, inductor=False, report=True)
    with caplog.at_level(logging.INFO, logger="ndcompile"):
        compiled(torch.randn(2, 4, 6))
    assert "inlined" in caplog.text and "4x6 -> 4x6" in caplog.text


def test_backend_called_directly() -> None:
    torch.manual_seed(0)
    model = NdNet()
    x = torch.randn(2, 4, 6, 3)
    ((gm, example_inputs),) = capture(model, x)
    run = ndcompile_backend(gm, example_inputs, options={"inductor": False})
    torch.testing.assert_close(run(*example_inputs)[0], model(x))
    with pytest.raises(NdCompileError, match="unexpected backend arguments"):
        ndcompile_backend(gm, example_inputs, colour="red")


def test_graph_without_matches_is_unchanged() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    ((gm, example_inputs),) = capture(model, torch.randn(4, 8))
    new_gm, report, constants = rewrite_dynamo_graph(gm, example_inputs)
    assert report.converted == [] and constants == []
    assert "nothing to rewrite" in " ".join(report.notes)
    assert [n.format_node() for n in new_gm.graph.nodes] == [
        n.format_node() for n in gm.graph.nodes
    ]
    assert ndcompile_backend(gm, example_inputs, options={"inductor": False}) == gm.forward


def test_example_smoke() -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import compile_backend
    finally:
        sys.path.pop(0)
    results = compile_backend.main(
        batch=2,
        iters=2,
        warmup=1,
        in_shape=(4, 4, 2),
        hidden=(3, 4, 2),
        backends=("eager", "ndcompile"),
        options={"inductor": False},
        verbose=False,
    )
    assert set(results) == {"eager", "ndcompile"}
    assert all(r["max_abs_diff"] < 1e-4 for r in results.values())
