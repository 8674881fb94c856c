"""Tests of ``convert -o``: the exported program's batch dim and the delegated ONNX export."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from ndcompile.cli.main import EXIT_FAILED, EXIT_USAGE, main
from ndcompile.errors import NdCompileError

from cli_helpers import SHAPE, SHAPE_ARG, TINY


# ------------------------------------------------------------------- ONNX
def fake_export_module(monkeypatch: pytest.MonkeyPatch, fail: bool) -> list:
    calls: list = []

    def export_onnx(
        converted: torch.nn.Module, example: torch.Tensor, path: str
    ) -> types.SimpleNamespace:
        calls.append((converted, example, path))
        Path(path).write_bytes(b"partial onnx")
        if fail:
            raise NdCompileError("onnxruntime disagrees with PyTorch")
        return types.SimpleNamespace(max_abs_error=3e-8)

    monkeypatch.setitem(
        sys.modules, "ndcompile.backends.onnx", types.SimpleNamespace(export_onnx=export_onnx)
    )
    return calls


@pytest.mark.parametrize("fail", [False, True])
def test_onnx_output_is_delegated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, fail: bool
) -> None:
    calls = fake_export_module(monkeypatch, fail)
    argv = ["convert", TINY, "--example-shape", SHAPE_ARG, "--mode", "fresh",
            "-o", str(tmp_path / "m.onnx"), "--report", str(tmp_path / "r.json")]  # fmt: skip
    assert main(argv) == (EXIT_FAILED if fail else 0)
    ((converted, example, path),) = calls
    assert hasattr(converted, "report") and tuple(example.shape) == SHAPE
    assert Path(path).parent == tmp_path and Path(path).suffix == ".onnx"
    if fail:
        assert "onnxruntime disagrees" in capsys.readouterr().err
        assert list(tmp_path.iterdir()) == []
    else:
        assert "onnxruntime matches the converted module (max abs error 3.0e-08)" in (
            capsys.readouterr().out
        )
        assert (tmp_path / "m.onnx").read_bytes() == b"partial onnx"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "r.json"]


def test_onnx_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "ndcompile.backends.onnx", None)
    argv = [
        "convert",
        TINY,
        "--example-shape",
        SHAPE_ARG,
        "--mode",
        "fresh",
        "-o",
        str(tmp_path / "m.onnx"),
    ]
    assert main(argv) == EXIT_USAGE
    assert "ONNX export is not available" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------- the exported program's batch dim
def test_exported_program_has_a_dynamic_batch_and_a_small_sample(tmp_path: Path) -> None:
    out = tmp_path / "m.pt2"
    argv = ["convert", TINY, "--example-shape", "4096,16,16", "--mode", "fresh",
            "-o", str(out), "--report", str(tmp_path / "r.json"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert out.stat().st_size < 256 * 1024  # the 4 MB example input is not embedded
    program = torch.export.load(str(out))
    (sample,), _ = program.example_inputs
    assert sample.shape[1:] == (16, 16) and sample.shape[0] < 8
    for batch in (3, 8, 33):
        x = torch.randn(batch, 16, 16, generator=torch.Generator().manual_seed(batch))
        assert program.module()(x).shape == (batch, 10)
    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    assert not any("static input shapes" in n for n in notes), notes


FIXED_BATCH = """
import torch
from torch import nn


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(256, 64)

    def forward(self, x):
        return self.fc(x.reshape(8, 256))


def build():
    torch.manual_seed(0)
    return FixedBatch()
"""


def test_static_export_fallback_is_reported(tmp_path: Path) -> None:
    (tmp_path / "fixed.py").write_text(FIXED_BATCH)
    out = tmp_path / "m.pt2"
    argv = ["convert", f"{tmp_path / 'fixed.py'}:build", "--example-shape", SHAPE_ARG,
            "--mode", "fresh", "-o", str(out), "--report", str(tmp_path / "r.json"),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    assert any("static input shapes (8, 16, 16)" in n for n in notes), notes
    program = torch.export.load(str(out))
    assert program.example_inputs is None
    assert program.module()(torch.randn(8, 16, 16)).shape == (8, 64)
