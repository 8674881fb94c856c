"""Tests of ``benchmarks/plot_hf_models.py``: the plotted values come from the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import plot_hf_models

RECORDS = [
    {
        "name": "bert",
        "variants": {
            "dense": {"live_train_mb": 100.0},
            "fresh r1": {"live_train_mb": 95.0},
            "fresh r4": {"live_train_mb": None},
        },
        "ratios": {
            "dense": {"eager_fwd_ms": 1.0},
            "fresh r1": {
                "eager_fwd_ms": 4.0,
                "compiled_fwd_ms": 4.5,
                "eager_train_ms": 3.0,
                "compiled_train_ms": 3.5,
            },
            "fresh r4": {"eager_fwd_ms": 2.0},
        },
    }
]


def test_panel_data_reads_ratios_and_memory_against_dense() -> None:
    labels, panels = plot_hf_models.panel_data(RECORDS)
    assert labels == ["bert: fresh r1", "bert: fresh r4"]
    fwd, train, memory = panels
    assert fwd == {"eager": [4.0, 2.0], "inductor": [4.5, None]}
    assert train == {"eager": [3.0, None], "inductor": [3.5, None]}
    assert memory == {"live tensors": [0.95, None]}


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"meta": {"cpu": "test"}, "models": RECORDS}))
    out = plot_hf_models.main([str(results), "-o", str(tmp_path / "p.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
