"""Tests of ``ndcompile convert`` in-process: its outputs, calibration and ``--distill`` data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ndcompile
from ndcompile.cli.main import EXIT_USAGE, main

from cli_helpers import SHAPE, SHAPE_ARG, TINY, convert_args


# ------------------------------------------------------- main() in-process: success
def test_convert_text_output_and_calibration(
    cli_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict = {}

    def spy(model: torch.nn.Module, example: tuple, **kwargs: object) -> torch.nn.Module:
        seen.update(kwargs)  # the activation-aware fit itself is tested with factorize
        kwargs.pop("calibration", None)
        return ndcompile.convert(model, example, **kwargs)

    monkeypatch.setattr("ndcompile.cli.convert.convert", spy)
    args = ["--mode", "factorize", "--rank", "2", "--state-dict", str(cli_files["st"]),
            "--calibration", str(cli_files["calib"]),
            "--state-dict-out", str(tmp_path / "w.pt")]  # fmt: skip
    assert main(convert_args(tmp_path, *args)) == 0
    assert [tuple(t.shape) for t in seen["calibration"]] == [SHAPE, SHAPE]
    assert (seen["mode"], seen["rank"], seen["tol"]) == ("factorize", 2, None)
    out = capsys.readouterr().out
    assert "ConversionReport(mode='factorize')" in out
    assert "fc1    converted  16x16 -> 8x8" in out
    assert "(calibration data)" in out and "exported program matches" in out
    for name in ("m.pt2", "r.json", "w.pt"):
        assert f"wrote {tmp_path / name}" in out
    report = json.loads((tmp_path / "r.json").read_text())
    fit = report["layers"][0]
    assert fit["name"] == "fc1" and fit["status"] == "converted" and fit["rank"] == 2
    weights = torch.load(tmp_path / "w.pt", weights_only=True)
    assert sum(v.numel() for v in weights.values()) == report["params_after"]
    assert sorted(k for k in weights if k.startswith("fc1.")) == [
        "fc1.bias", "fc1.factors.0", "fc1.factors.1",
    ]  # fmt: skip


def test_calibration_outside_factorize_only_verifies(
    cli_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["convert", TINY, "--example-shape", SHAPE_ARG, "--mode", "adapter", "--rank", "1",
            "--calibration", str(cli_files["calib"]), "--json",
            "--state-dict-out", str(tmp_path / "w.safetensors")]  # fmt: skip
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["outputs"] == {"state_dict": str(tmp_path / "w.safetensors")}
    assert "export_rel_error" not in data["verification"]
    assert data["verification"]["calibration_rel_error"] < 1e-5  # zero-initialised adapters
    assert any("calibration data used to verify only" in n for n in data["report"]["notes"])


def test_convert_quiet_prints_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["convert", TINY, "--example-shape", SHAPE_ARG, "--mode", "fresh", "--quiet",
            "--state-dict-out", str(tmp_path / "w.pt"),
            "--report", str(tmp_path / "r.json")]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "w.pt"]


# -------------------------------------------------------------------- --distill
@pytest.fixture(scope="module")
def distill_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("distill")
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(24, 16, 16, generator=gen)
    files = {k: d / f"{k}.pt" for k in ("tensor", "named", "wrong_name", "state_dict", "one_row")}
    torch.save(rows, files["tensor"])
    torch.save({"x": rows}, files["named"])
    torch.save({"y": rows}, files["wrong_name"])
    torch.save(
        {"fc1.weight": torch.zeros(64, 256), "fc1.bias": torch.zeros(64)}, files["state_dict"]
    )
    torch.save(rows[:1], files["one_row"])
    return files


@pytest.mark.parametrize("kind", ["tensor", "named"])
def test_distill_accepts_a_tensor_or_named_inputs(
    distill_files: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    argv = ["convert", TINY, "--example-shape", SHAPE_ARG, "--mode", "factorize", "--rank", "1",
            "--distill", str(distill_files[kind]), "--distill-steps", "2",
            "--state-dict-out", str(tmp_path / "w.pt"), "--report", str(tmp_path / "r.json"),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    assert any(n.startswith("distilled: fc1 ") for n in notes), notes


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("wrong_name", "holds a dict with keys ['y'], but the model's forward takes ['x']"),
        ("state_dict", "keys ['fc1.bias', 'fc1.weight'], but the model's forward takes ['x']"),
        ("one_row", "needs at least 2"),
    ],
)
def test_distill_data_that_cannot_work_is_explained(
    distill_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    kind: str,
    message: str,
) -> None:
    argv = ["convert", TINY, "--example-shape", SHAPE_ARG, "--mode", "factorize", "--rank", "1",
            "--distill", str(distill_files[kind]), "-o", str(tmp_path / "m.pt2")]  # fmt: skip
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []
