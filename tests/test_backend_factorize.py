"""Tests of the backend's ``factorize`` option: fitted factors, inductor, tiling, training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ndcompile.backends.dynamo import rewrite_dynamo_graph
from ndcompile.errors import NdCompileError
from ndcompile.ir import tiled
from ndcompile.report import ConversionReport

from backend_helpers import ROOT, backend_compile, capture, tiled_calls

ndlinear = pytest.importorskip("ndlinear")


# ---------------------------------------------------------------- factorize
def _kronecker_linear(rank: int) -> nn.Linear:
    """Linear(48, 64) whose weight is exactly a rank-``rank`` Kronecker sum over (6,8)->(8,8)."""
    gen = torch.Generator().manual_seed(1)
    weight = sum(
        torch.kron(torch.randn(8, 6, generator=gen), torch.randn(8, 8, generator=gen))
        for _ in range(rank)
    )
    layer = nn.Linear(48, 64)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


@pytest.mark.parametrize(
    ("factorize", "lead"), [({"rank": 2}, (6,)), ({"tol": 1e-4, "max_rank": 4}, (2, 3))]
)
def test_factorize_exact_kronecker_weights(factorize: dict, lead: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_kronecker_linear(2), nn.ReLU(), nn.Linear(64, 5)).eval()
    reports: list[ConversionReport] = []
    compiled = backend_compile(model, reports, inductor=False, factorize=factorize)
    for shape in (lead, tuple(n + 2 for n in lead)):  # the second is a dynamic recompile
        x = torch.randn(*shape, 48)
        with torch.no_grad():
            out, ref = compiled(x), model(x)
        assert torch.linalg.norm(out - ref) / torch.linalg.norm(ref) < 1e-4
    assert len(reports) == 2
    entry = reports[0].layer("0")
    assert entry.status == "converted" and entry.rank == 2
    assert entry.in_shape == (6, 8) and entry.out_shape == (8, 8)
    assert entry.weight_rel_error < 1e-5
    assert reports[0].layer("2").status == "skipped"  # 5 outputs: too small
    assert reports[0].params_after < reports[0].params_before


def test_factorize_with_inductor_and_random_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_kronecker_linear(1), nn.Tanh(), nn.Linear(64, 48)).eval()
    reports: list[ConversionReport] = []
    compiled = backend_compile(model, reports, factorize={"tol": 1e-3, "max_rank": 2})
    x = torch.randn(4, 48)
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    first, second = reports[0].layer("0"), reports[0].layer("2")
    assert first.status == "converted" and first.rank == 1
    assert second.status == "skipped" and "tol" in second.reason


def test_factorize_refuses_training() -> None:
    model = nn.Sequential(_kronecker_linear(1))
    compiled = backend_compile(model, inductor=False, factorize={"rank": 1})
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 48))
    inner = getattr(info.value, "inner_exception", info.value.__cause__)
    assert isinstance(inner, NdCompileError) and "no_grad" in str(inner)


def test_small_batches_and_factorize_tiling(monkeypatch) -> None:
    monkeypatch.setattr(tiled, "choose_tile", lambda *args, **kwargs: 16)
    model = ndlinear.NdLinear((4, 6, 3), (5, 2, 3))
    x = torch.randn(16 * tiled.AUTO_WHOLE_TILES, 4, 6, 3)  # few tiles: untiled
    with torch.no_grad():
        (gm, inputs), *_ = capture(model, x)
        assert tiled_calls(rewrite_dynamo_graph(gm, inputs)[0]) == 0
    (gm, inputs), *_ = capture(model, x)  # captured for training: more than two tiles
    assert tiled_calls(rewrite_dynamo_graph(gm, inputs)[0]) == 1
    dense = nn.Sequential(_kronecker_linear(2)).eval()
    x = torch.randn(16 * tiled.AUTO_WHOLE_TILES + 40, 48)
    with torch.no_grad():
        (gm, inputs), *_ = capture(dense, x)
        work, report, _ = rewrite_dynamo_graph(gm, inputs, {"factorize": {"rank": 2}})
        assert report.layer("0").status == "converted" and tiled_calls(work) == 1
        out = backend_compile(dense, inductor=False, factorize={"rank": 2})(x)
        ref = dense(x)
    assert torch.linalg.norm(out - ref) / torch.linalg.norm(ref) < 1e-4


_COLD_CACHE_SCRIPT = """
import torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
config = GPT2Config(n_layer=1, n_embd=128, n_head=2, n_positions=32, vocab_size=512)
model = GPT2LMHeadModel(config).eval()
reports = []
options = {"factorize": {"rank": 4}, "report": reports.append}
compiled = torch.compile(model, backend="ndcompile", options=options)
eager = torch.compile(model, backend="ndcompile", options={**options, "inductor": False})
with torch.no_grad():
    for shape in ((2, 16), (2, 24)):
        ids = torch.randint(0, 512, shape)
        out = compiled(input_ids=ids, use_cache=False).logits
        ref = eager(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
assert any(e.status == "converted" for r in reports for e in r.layers)
print("cold cache ok")
"""


def test_factorize_gpt2_with_cold_inductor_cache(tmp_path: Path) -> None:
    """Factor constants get static shapes, so dynamo can build guards on a cache miss."""
    pytest.importorskip("transformers")
    run = subprocess.run(
        [sys.executable, "-c", _COLD_CACHE_SCRIPT],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")},
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "cold cache ok" in run.stdout
