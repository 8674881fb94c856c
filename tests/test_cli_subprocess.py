"""Tests of the commands end to end in fresh processes (console script and ``python -m``)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ndcompile
from ndcompile.cli.loading import build_model, load_checkpoint
from ndcompile.cli.main import EXIT_USAGE, main

from cli_helpers import (
    FIXTURE,
    SHAPE,
    SHAPE_ARG,
    TINY,
    finish,
    start,
    start_cli,
    tiny_with_weights,
    trained_weights,
)

# ----------------------------------------------------------------- subprocesses
# Each process pays for importing torch (seconds), so the runs start together, in
# the background, before the module's first test (``runs`` is autouse); each test
# collects its own.
LOAD_WITHOUT_NDCOMPILE = """
import sys, torch
program = torch.export.load(sys.argv[1])
out = program.module()(torch.load(sys.argv[2], weights_only=True))
assert not any(name.split(".")[0] == "ndcompile" for name in sys.modules), "ndcompile imported"
torch.save(out, sys.argv[3])
"""


@pytest.fixture(scope="module", autouse=True)
def runs(cli_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The subprocess runs of this module, started at once; each test waits for its own."""
    out = tmp_path_factory.mktemp("converted")
    bad = tmp_path_factory.mktemp("bad")
    procs = {
        "out": out,
        "bad_dir": bad,
        "convert": start_cli(
            "convert", TINY, "--state-dict", str(cli_files["ckpt"]), "--example-shape", SHAPE_ARG,
            "--mode", "factorize", "--rank", "2", "-o", str(out / "m.pt2"),
            "--report", str(out / "report.json"), "--state-dict-out", str(out / "w.safetensors"),
            "--json", console_script=True,
        ),
        "inspect": start_cli(
            "inspect", f"{FIXTURE}:two_input_net", "--example-shape", "4,48",
            "--example-shape", "4,48", "--mode", "fresh", "--exclude", "nothing*",
        ),
        "bench": start_cli(
            "bench", TINY, "--example-shape", SHAPE_ARG, "--mode", "fresh",
            "--repeat", "3", "--warmup", "1", "--threads", "1", "--json",
        ),
        "bad": start_cli(
            "convert", TINY, "--state-dict", str(cli_files["wrong"]), "--example-shape", SHAPE_ARG,
            "--mode", "fresh", "-o", str(bad / "m.pt2"), console_script=True,
        ),
    }  # fmt: skip
    yield procs
    for proc in procs.values():
        if isinstance(proc, subprocess.Popen) and proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def converted(runs: dict) -> tuple[dict, Path]:
    """The ``ndcompile convert --json`` run: its stdout as JSON and its output folder."""
    code, out, err = finish(runs["convert"])
    assert code == 0, err
    assert "Traceback" not in err
    return json.loads(out), runs["out"]


def test_convert_subprocess_json_report_and_weights(converted: tuple[dict, Path]) -> None:
    data, out = converted
    assert data["command"] == "convert"
    assert data["outputs"] == {
        "program": str(out / "m.pt2"),
        "state_dict": str(out / "w.safetensors"),
        "report": str(out / "report.json"),
    }
    assert data["verification"]["export_rel_error"] < 1e-6
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(json.dumps(data["report"]))
    for key in ("mode", "layers", "params_before", "params_after", "output_rel_error",
                "converted", "skipped"):  # fmt: skip
        assert key in report
    assert report["mode"] == "factorize" and (report["converted"], report["skipped"]) == (1, 1)
    assert 0 < report["output_rel_error"] == data["verification"]["output_rel_error"]
    weights = load_file(str(out / "w.safetensors"))
    assert sum(v.numel() for v in weights.values()) == report["params_after"]
    original = build_model(TINY)
    assert report["params_before"] == sum(p.numel() for p in original.parameters())
    by_layer = {layer["name"]: layer for layer in report["layers"]}
    fc1 = [v for k, v in weights.items() if k.startswith("fc1.")]
    assert by_layer["fc1"]["params_after"] == sum(v.numel() for v in fc1)
    assert torch.equal(weights["fc2.weight"], trained_weights()["fc2.weight"])
    assert sorted(p.name for p in out.iterdir()) == ["m.pt2", "report.json", "w.safetensors"]


def test_inspect_pt2(converted: tuple[dict, Path], capsys: pytest.CaptureFixture) -> None:
    _, out = converted
    assert main(["inspect", str(out / "m.pt2")]) == 0
    text = capsys.readouterr().out
    assert f"exported program {out / 'm.pt2'}" in text
    batch = re.search(r"inputs: x (s\d+)x16x16 torch.float32", text)  # a dynamic batch dim
    assert batch, text
    assert "fc1: rank 2, 16x16 -> 8x8, 576 params (dense 16,448)" in text
    assert "fc1.factors.0  2x8x16" in text
    b = batch.group(1)
    assert f"aten.linear.default(<{b}x64>, fc2.weight<10x64>, fc2.bias<10>) -> {b}x10" in text
    assert "fc1.weight" not in text
    assert main(["inspect", str(out / "m.pt2"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_parameters"] == converted[0]["report"]["params_after"]
    assert [f["name"] for f in info["factorized"]] == ["fc1"]
    assert sorted(p.name for p in out.iterdir()) == ["m.pt2", "report.json", "w.safetensors"]


def test_pt2_loads_without_ndcompile_and_matches(
    converted: tuple[dict, Path], cli_files: dict[str, Path], tmp_path: Path
) -> None:
    _, out = converted
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    torch.save(x, tmp_path / "x.pt")
    proc = start(
        [sys.executable, "-c", LOAD_WITHOUT_NDCOMPILE, str(out / "m.pt2"), str(tmp_path / "x.pt"),
         str(tmp_path / "y.pt")], cwd=tmp_path,
    )  # fmt: skip
    model = tiny_with_weights(load_checkpoint(cli_files["ckpt"]))
    converted_model = ndcompile.convert(model, torch.randn(SHAPE), mode="factorize", rank=2)
    with torch.no_grad():
        want, original = converted_model(x), model(x)
    code, _, err = finish(proc)
    assert code == 0, err
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (original - want).abs().max() > 1e-3  # a lossy fit, not the original model


def test_inspect_factory_subprocess(runs: dict) -> None:
    code, out, err = finish(runs["inspect"])
    assert code == 0, err
    lines = out.splitlines()
    assert "mode 'fresh'" in lines[0] and "[(4, 48), (4, 48)]" in lines[0]
    row = next(line.split() for line in lines if line.strip().startswith("fc "))
    # fc Linear 48 -> 32 | 6x8 -> 4x8 | factored convert | params before -> after | FLOPs
    assert row[:5] == ["fc", "Linear", "48", "->", "32"]
    in_modes, out_modes = (tuple(map(int, m.split("x"))) for m in (row[5], row[7]))
    assert math.prod(in_modes) == 48 and math.prod(out_modes) == 32
    assert row[8:12] == ["factored", "convert", f"{(48 * 32 + 32) / 1e3:.2f}k", "->"]
    factors = sum(h * d for h, d in zip(out_modes, in_modes, strict=True))
    assert row[12] == str(factors + 32)  # rank-1 factors + bias
    assert row[13] == f"{2 * 2 * 4 * 48 * 32 / 1e3:.2f}k"  # called twice on 4 rows


def test_bench_subprocess(runs: dict) -> None:
    code, out, err = finish(runs["bench"])
    assert code == 0, err
    data = json.loads(out)
    assert data["command"] == "bench" and data["mode"] == "fresh" and data["threads"] == 1
    assert data["original_ms"] > 0 and data["converted_ms"] > 0
    assert data["speedup"] == pytest.approx(data["original_ms"] / data["converted_ms"])
    assert data["example_shapes"] == [list(SHAPE)]


def test_bad_input_subprocess_is_one_line(runs: dict) -> None:
    code, out, err = finish(runs["bad"])
    assert code == EXIT_USAGE
    assert out == ""
    assert err.startswith("ndcompile: error: state_dict does not match the model:")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert list(runs["bad_dir"].iterdir()) == []
