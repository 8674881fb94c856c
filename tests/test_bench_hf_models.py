"""Smoke tests of ``benchmarks/bench_hf_models.py``: ``--quick`` runs, structure, ratios.

No timing is asserted, only that every row is there, that converted variants have
fewer parameters, that the ratios vs dense are finite positive numbers and that a
``torch.compile`` failure is recorded instead of raised.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_hf_models

VARIANTS = list(bench_hf_models.VARIANTS)


@pytest.fixture(autouse=True)
def _keep_threads() -> Iterator[None]:
    """``main`` sets the thread count; other tests must not see it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _finite_positive(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_quick_run_both_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hf.json"
    result = bench_hf_models.main(["--quick", "--threads", "1", "--json", str(out)])
    table = capsys.readouterr().out
    assert json.loads(out.read_text())["meta"]["compile"] is False
    assert [rec["name"] for rec in result["models"]] == ["bert", "llama"]
    for rec in result["models"]:
        sides, ratios = rec["variants"], rec["ratios"]
        assert list(sides) == VARIANTS
        for name, side in sides.items():
            assert f"| {rec['name']} " in table and f" {name} |" in table
            assert side["eager_fwd_ms"] > 0 and side["eager_train_ms"] > 0
            assert side["peak_train_mb"] >= 0 and side["memory_method"]
            for key in ("params", "eager_fwd_ms", "eager_train_ms"):
                assert _finite_positive(float(ratios[name][key])), (rec["name"], name, key)
            assert "compiled_fwd_ms" not in side
            if name == "dense":
                continue
            assert side["params"] < sides["dense"]["params"]
            assert side["layers_converted"] >= 1 and 0 < side["linear_param_share"] <= 1
        assert sides["dense"]["output_rel_error"] is None
        assert _finite_positive(sides["factorize r4"]["output_rel_error"])


def test_compile_failure_is_recorded(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken_compile(model: torch.nn.Module, **kwargs: Any) -> Any:
        def run(*args: Any) -> Any:
            raise RuntimeError("inductor is unavailable")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    argv = ["--quick", "--compile", "--threads", "1", "--models", "llama"]
    result = bench_hf_models.main([*argv, "--variants", "dense,fresh_r1"])
    printed = capsys.readouterr().out
    (rec,) = result["models"]
    assert list(rec["variants"]) == ["dense", "fresh r1"]
    for side in rec["variants"].values():
        assert "inductor is unavailable" in side["compile_error"]
        assert "compiled_fwd_ms" not in side and side["eager_fwd_ms"] > 0
    assert rec["ratios"]["fresh r1"]["compiled_fwd_ms"] is None
    assert " error |" in printed
    assert "compile error: llama / fresh r1: compiled_fwd: RuntimeError" in printed


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(SystemExit, match="unknown"):
        bench_hf_models.main(["--quick", "--models", "gpt5"])
    with pytest.raises(SystemExit, match="choose from: dense, fresh_r1"):
        bench_hf_models.main(["--quick", "--variants", "fresh_r9"])
