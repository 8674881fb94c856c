"""Smoke tests: each example's ``main()`` runs with tiny settings and returns its table."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from ndcompile.compress.adapter_sites import lora_params

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread avoids oversubscription on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_example(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import ``examples/<name>.py`` the way ``python examples/<name>.py`` sees it."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    for mod in ("digits_ndlinear", name):
        sys.modules.pop(mod, None)
    return importlib.import_module(name)


def test_digits_ndlinear(monkeypatch, capsys):
    example = load_example("digits_ndlinear", monkeypatch)
    rows = example.main(epochs=1, hidden=32, ranks=(1, 2), seeds=(0,), verbose=True)
    names = [r["model"] for r in rows]
    assert names[:3] == ["dense MLP", "NdLinear rank 1", "NdLinear rank 2"]
    assert names[3].startswith("dense MLP, hidden")
    params = {r["model"]: r["params"] for r in rows}
    assert params["NdLinear rank 1"] < params["NdLinear rank 2"] < params["dense MLP"]
    assert params[names[3]] <= params["NdLinear rank 1"]
    assert all(0.0 <= r["test acc %"] <= 100.0 and r["ms / epoch"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "| model | params | test acc % |" in out and "ConversionReport(mode='fresh')" in out


def test_digits_training_is_seeded(monkeypatch):
    example = load_example("digits_ndlinear", monkeypatch)
    kwargs = {"epochs": 1, "hidden": 32, "ranks": (1,), "seeds": (3,), "verbose": False}
    first, second = example.main(**kwargs), example.main(**kwargs)
    assert [r["test acc %"] for r in first] == [r["test acc %"] for r in second]


def test_compress_mlp(monkeypatch):
    example = load_example("compress_mlp", monkeypatch)
    rows = example.main(epochs=2, finetune_epochs=1, ranks=(1, 2), hidden=32, verbose=False)
    assert [r["model"] for r in rows] == [
        "dense (trained)",
        "factorized rank 1",
        "factorized rank 2",
    ]
    dense, r1, r2 = rows
    assert r1["params"] < r2["params"] < dense["params"]
    for row in (r1, r2):
        assert 0.0 <= row["fc2 weight err"] <= 1.0
        assert row["logit err"] > 0.0
        for key in ("acc converted %", "acc fine-tuned %", "acc fresh init %"):
            assert 0.0 <= row[key] <= 100.0


def test_adapter_finetune(monkeypatch):
    example = load_example("adapter_finetune", monkeypatch)
    d_model, d_ff, depth = 16, 64, 2
    rows = example.main(
        pretrain_epochs=1,
        finetune_epochs=1,
        lora_ranks=(1, 2),
        nd_ranks=(1,),
        d_model=d_model,
        d_ff=d_ff,
        seeds=(0,),
        verbose=False,
    )
    by_name = {r["method"]: r for r in rows}
    assert list(by_name) == [
        "head only",
        "full fine-tuning",
        "LoRA r=1",
        "LoRA r=2",
        "NdLinear adapter R=1",
    ]
    total = sum(p.numel() for p in example.RowTransformer(d_model=d_model, d_ff=d_ff).parameters())
    assert by_name["full fine-tuning"]["trainable params"] == total
    assert by_name["head only"]["excluding head"] == 0
    for r in (1, 2):  # LoRA on both MLP Linears of every block
        lora = depth * (lora_params(d_model, d_ff, r) + lora_params(d_ff, d_model, r))
        assert by_name[f"LoRA r={r}"]["excluding head"] == lora
    # 16 -> 64 as 4x4 -> 8x8 and back: 8*4 + 8*4 factor entries per Linear
    nd = by_name["NdLinear adapter R=1"]["excluding head"]
    assert nd == depth * 2 * (8 * 4 + 8 * 4) < by_name["LoRA r=1"]["excluding head"]
    assert all(0.0 <= r["task B test acc %"] <= 100.0 for r in rows)


def test_huggingface(monkeypatch):
    pytest.importorskip("transformers")
    example = load_example("huggingface", monkeypatch)
    results = example.main(hidden=64, layers=1, verbose=False)
    assert type(results["factorized"]).__name__ == "LlamaForCausalLM"
    assert results["adapter_tokens_equal"] is True
    assert results["reload_error"] == 0.0
    report = results["factorized"].report
    assert len(report.converted) == 8 and report.params_after < report.params_before
