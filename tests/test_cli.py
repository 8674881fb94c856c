"""Tests for the ``ndcompile`` command (convert / inspect / bench) and its loading helpers.

A few end-to-end runs go through real subprocesses (the console script and
``python -m ndcompile.cli``); the many bad-input cases call ``main()`` in-process.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ndcompile
from ndcompile.cli.loading import (
    UsageError,
    build_model,
    load_calibration,
    load_checkpoint,
    load_factory,
    load_state_dict_strict,
    parse_factory_spec,
    parse_shape,
    parse_shapes_json,
)
from ndcompile.cli.main import EXIT_FAILED, EXIT_USAGE, format_error, main
from ndcompile.cli.output import Progress, StagedOutputs
from ndcompile.errors import NdCompileError

FIXTURE = Path(__file__).parent / "fixtures" / "cli_models.py"
TINY = f"{FIXTURE}:tiny_net"
SHAPE = (8, 16, 16)
SHAPE_ARG = ",".join(map(str, SHAPE))
CLI = Path(sys.executable).with_name("ndcompile")


class Pickled:
    """An object only full unpickling can load (for the refused-checkpoint case)."""


def start_cli(*args: str, console_script: bool = False) -> subprocess.Popen:
    """Start the command in a fresh process (one thread), capturing its output."""
    module = [sys.executable, "-m", "ndcompile.cli"]
    cmd = [str(CLI)] if console_script and CLI.exists() else module
    return start([*cmd, *args])


def start(cmd: list[str], cwd: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    """Wait for a started process: (exit status, stdout, stderr)."""
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


def trained_weights(seed: int = 123) -> dict[str, torch.Tensor]:
    """A state_dict for the fixture model that differs from the factory's weights."""
    gen = torch.Generator().manual_seed(seed)
    model = build_model(TINY)
    return {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in model.state_dict().items()}


def tiny_with_weights(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(TINY)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Input files shared by the tests: checkpoints of every kind, calibration data."""
    d = tmp_path_factory.mktemp("inputs")
    state = trained_weights()
    paths = {k: d / name for k, name in [
        ("ckpt", "ckpt.pt"), ("nested", "nested.pt"), ("st", "ckpt.safetensors"),
        ("pickled", "pickled.pt"), ("garbage", "garbage.pt"), ("wrong", "wrong.pt"),
        ("calib", "calib.pt"), ("calib_bad", "calib_bad.pt"), ("calib_shape", "calib_shape.pt"),
        ("shapes", "shapes.json"),
    ]}  # fmt: skip
    torch.save(state, paths["ckpt"])
    torch.save({"epoch": 3, "state_dict": state}, paths["nested"])
    save_file(state, str(paths["st"]))
    torch.save({"model": Pickled()}, paths["pickled"])
    paths["garbage"].write_bytes(b"this is not a checkpoint")
    wrong = {k: v for k, v in state.items() if k != "fc2.bias"}
    wrong["extra.weight"] = torch.zeros(2)
    wrong["fc1.weight"] = torch.zeros(64, 255)
    torch.save(wrong, paths["wrong"])
    gen = torch.Generator().manual_seed(7)
    torch.save([torch.randn(SHAPE, generator=gen) for _ in range(2)], paths["calib"])
    torch.save({"x": torch.zeros(1)}, paths["calib_bad"])
    torch.save(torch.zeros(4, 15, 16, dtype=torch.float64), paths["calib_shape"])
    paths["shapes"].write_text(json.dumps({"fc1": [[32, 8], [8, 8]]}))
    return paths


# ------------------------------------------------------------ parsing and loading
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("pkg.mod:build", ("pkg.mod", "build")),
        ("path/to/m.py:make_model", ("path/to/m.py", "make_model")),
        ("C:/models/m.py:fn", ("C:/models/m.py", "fn")),
    ],
)
def test_parse_factory_spec(spec: str, expected: tuple[str, str]) -> None:
    assert parse_factory_spec(spec) == expected


@pytest.mark.parametrize("spec", ["pkg.mod", "pkg.mod:", ":fn", "m.py:not-a-name"])
def test_parse_factory_spec_rejects(spec: str) -> None:
    with pytest.raises(UsageError, match="MODULE:FACTORY"):
        parse_factory_spec(spec)


def test_load_factory_from_module_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_cli_models.py").write_text(
        "import torch\ndef build():\n    return torch.nn.Linear(4, 2)\nhelper = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(build_model("my_cli_models:build"), torch.nn.Linear)
    assert isinstance(build_model(f"{tmp_path / 'my_cli_models.py'}:build"), torch.nn.Linear)
    with pytest.raises(UsageError, match=r"(?s)has no callable 'nope'.*defined there: build"):
        load_factory("my_cli_models:nope")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("missing/file.py:f", "does not exist"),
        (f"{FIXTURE}:not_a_module", "returned int, not a torch.nn.Module"),
        (f"{FIXTURE}:broken", "RuntimeError: factory failed on purpose"),
        (f"{FIXTURE}:TINY_NET", "has no callable 'TINY_NET'"),
    ],
)
def test_build_model_errors(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build_model(spec)


@pytest.mark.parametrize(
    ("text", "shape"),
    [("8,3,32,32", (8, 3, 32, 32)), ("4", (4,)), (" 2, 5 ", (2, 5)), ("2x5", (2, 5))],
)
def test_parse_shape(text: str, shape: tuple[int, ...]) -> None:
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", "8,a", "8,0", "8,-1", "8,,3", "1.5"])
def test_parse_shape_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="positive integers"):
        parse_shape(text)


def test_parse_shapes_json(files: dict[str, Path]) -> None:
    assert parse_shapes_json('{"fc1": [[16, 16], [8, 8]]}') == {"fc1": ((16, 16), (8, 8))}
    assert parse_shapes_json(str(files["shapes"])) == {"fc1": ((32, 8), (8, 8))}
    bad_cases = [
        ("{oops", "not valid JSON"),
        ("[1, 2]", "must map"),
        ('{"fc1": [16, 16]}', "must map"),
        ('{"fc1": [[16], [8], [1]]}', "must map"),
    ]
    for bad, message in bad_cases:
        with pytest.raises(UsageError, match=message):
            parse_shapes_json(bad)


@pytest.mark.parametrize("kind", ["ckpt", "nested", "st"])
def test_load_checkpoint_formats(files: dict[str, Path], kind: str) -> None:
    state = load_checkpoint(files[kind])
    want = trained_weights()
    assert set(state) == set(want)
    assert all(torch.equal(state[k], want[k]) for k in want)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("pickled", "needs arbitrary unpickling, which is refused .*GLOBAL .*Pickled"),
        ("garbage", "cannot read"),
        ("shapes", "cannot read .*not a torch checkpoint"),
        ("calib", "does not hold a state_dict"),
    ],
)
def test_load_checkpoint_refuses(files: dict[str, Path], kind: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        load_checkpoint(files[kind])
    with pytest.raises(UsageError, match="does not exist"):
        load_checkpoint(files[kind].with_name("absent.pt"))


def test_pickled_checkpoint_really_needs_unpickling(files: dict[str, Path]) -> None:
    with pytest.raises(pickle.UnpicklingError):
        torch.load(files["pickled"], weights_only=True)


def test_load_state_dict_strict_lists_every_problem(files: dict[str, Path]) -> None:
    model = build_model(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError) as err:
        load_state_dict_strict(model, load_checkpoint(files["wrong"]))
    text = str(err.value)
    assert "missing keys: fc2.bias" in text
    assert "unexpected keys: extra.weight" in text
    assert "fc1.weight (64, 255) vs model (64, 256)" in text
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    load_state_dict_strict(model, load_checkpoint(files["ckpt"]))
    assert torch.equal(model.fc2.bias, trained_weights()["fc2.bias"])


def test_load_calibration(files: dict[str, Path], tmp_path: Path) -> None:
    batches = load_calibration(files["calib"])
    assert [tuple(b.shape) for b in batches] == [SHAPE, SHAPE]
    torch.save(torch.ones(3, 4), tmp_path / "one.pt")
    assert len(load_calibration(tmp_path / "one.pt")) == 1
    with pytest.raises(UsageError, match="must hold a tensor or a list of tensors"):
        load_calibration(files["calib_bad"])


# --------------------------------------------------------------- output helpers
def test_staged_outputs_are_all_or_nothing(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.pt"
    with pytest.raises(RuntimeError), StagedOutputs() as staged:
        staged.stage(a, lambda p: p.write_text("{}"))
        staged.stage(b, lambda p: p.write_bytes(b"partial"))
        raise RuntimeError("a later step failed")
    assert list(tmp_path.iterdir()) == []
    with StagedOutputs() as staged:
        assert staged.stage(a, lambda p: p.write_text("{}") and "result") == "result"
        assert not a.exists()
        assert staged.commit() == [a]
    assert a.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert a.stat().st_mode & 0o777 == 0o666 & ~umask


def test_format_error_is_one_line() -> None:
    err = NdCompileError("bad thing\nmore detail", layer="fc1", hint="do\n this")
    assert format_error(err) == "ndcompile: error: [fc1] bad thing; more detail (hint: do this)"
    assert format_error(KeyError("k")) == "ndcompile: error: KeyError: 'k'"


def test_progress_hidden_without_tty() -> None:
    progress = Progress(["a", "b"], enabled=True)  # pytest's stderr is not a terminal
    with progress.step("a"):
        pass
    assert not progress.shown
    progress.close()


# ------------------------------------------------------- main() in-process: errors
def convert_args(out: Path, *extra: str, model: str = TINY) -> list[str]:
    shape = [] if "--example-shape" in extra else ["--example-shape", SHAPE_ARG]
    return ["convert", model, *shape, "-o", str(out / "m.pt2"),
            "--report", str(out / "r.json"), *extra]  # fmt: skip


BAD_INPUTS = [
    # (extra args or full replacement, exit code, message fragment)
    (["--mode", "fresh"], "model=no_such_module_xyz:f", EXIT_USAGE, "cannot import module"),
    (["--mode", "fresh"], "model=FIX:nope", EXIT_USAGE, "has no callable 'nope'"),
    (["--mode", "fresh"], "model=FIX:broken", EXIT_USAGE, "factory failed on purpose"),
    (["--mode", "fresh", "--example-shape", "8,15,16"], "", EXIT_USAGE,
     "rejects an example input of shape (8, 15, 16): RuntimeError: mat1 and mat2 shapes"),
    (["--mode", "fresh", "--example-shape", "8,16,16", "--example-shape", "8,16,16"], "",
     EXIT_USAGE, "gives 2 positional inputs, but TinyNet.forward takes 1 (x)"),
    (["--mode", "fresh", "--example-shape", "8,a"], "", EXIT_USAGE, "positive integers"),
    (["--mode", "fresh", "--state-dict", "garbage"], "", EXIT_USAGE, "cannot read"),
    (["--mode", "fresh", "--state-dict", "pickled"], "", EXIT_USAGE, "arbitrary unpickling"),
    (["--mode", "fresh", "--state-dict", "wrong"], "", EXIT_USAGE,
     "missing keys: fc2.bias; unexpected keys: extra.weight"),
    (["--mode", "bogus"], "", EXIT_USAGE, "argument --mode: invalid choice: 'bogus'"),
    (["--mode", "fresh", "--optimizer", "fastest"], "", EXIT_USAGE, "invalid choice: 'fastest'"),
    (["--mode", "factorize"], "", EXIT_USAGE, "needs --rank R, --tol T or --budget B"),
    (["--mode", "factorize", "--rank", "2", "--tol", "0.1"], "", EXIT_USAGE, "not allowed with"),
    (["--mode", "factorize", "--rank", "0"], "", EXIT_USAGE, "must be >= 1"),
    (["--mode", "fresh", "--tol", "0.1"], "", EXIT_USAGE, "--tol applies to --mode factorize"),
    (["--mode", "fresh", "--frobnicate"], "", EXIT_USAGE, "unrecognized arguments: --frobnicate"),
    (["--mode", "fresh", "--shapes", "{oops"], "", EXIT_USAGE, "not valid JSON"),
    (["--mode", "fresh", "--shapes", '{"fc1": [[3, 3], [8, 8]]}'], "", EXIT_FAILED,
     "does not match Linear(256, 64)"),
    (["--mode", "factorize", "--rank", "1", "--calibration", "calib_bad"], "", EXIT_USAGE,
     "must hold a tensor or a list of tensors"),
    (["--mode", "factorize", "--rank", "1", "--calibration", "calib_shape"], "", EXIT_USAGE,
     "rejects calibration batch 0 of shape (4, 15, 16)"),
    (["--mode", "fresh", "-o", "OUT/m.txt"], "", EXIT_USAGE, "must end in one of .pt2, .onnx"),
    (["--mode", "fresh", "--state-dict-out", "OUT/w.npz"], "", EXIT_USAGE, "--state-dict-out"),
    (["--mode", "fresh", "-o", "OUT/missing_dir/m.pt2"], "", EXIT_USAGE, "does not exist"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "special", "code", "message"), BAD_INPUTS)
def test_bad_input_exit_code_and_no_output(
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    extra: list[str],
    special: str,
    code: int,
    message: str,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    model = special.removeprefix("model=").replace("FIX", str(FIXTURE)) if special else TINY
    args = [str(files[a]) if a in files else a.replace("OUT", str(out)) for a in extra]
    assert main(convert_args(out, *args, model=model)) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ndcompile: error: "), err
    assert message in err
    assert "Traceback" not in err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "absent.pt2"], "exported program 'absent.pt2' does not exist"),
        (["inspect", TINY], "needs --example-shape"),
        (["convert", TINY, "--example-shape", SHAPE_ARG, "--mode", "fresh"], "needs -o"),
        (["bench"], "the following arguments are required"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_other_commands(
    capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


# ------------------------------------------------------- main() in-process: success
def test_convert_text_output_and_calibration(
    files: dict[str, Path],
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
    args = ["--mode", "factorize", "--rank", "2", "--state-dict", str(files["st"]),
            "--calibration", str(files["calib"]),
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
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["convert", TINY, "--example-shape", SHAPE_ARG, "--mode", "adapter", "--rank", "1",
            "--calibration", str(files["calib"]), "--json",
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


def test_inspect_plan_matches_convert(capsys: pytest.CaptureFixture) -> None:
    args = ["--example-shape", SHAPE_ARG, "--mode", "factorize", "--rank", "2", "--json"]
    assert main(["inspect", TINY, *args]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["layers"]}
    model = build_model(TINY)
    report = ndcompile.convert(model, torch.randn(SHAPE), mode="factorize", rank=2).report
    for entry in report.layers:
        row = rows[entry.name]
        assert row["action"] == ("convert" if entry.status == "converted" else "skip")
        if entry.status == "converted":
            assert tuple(row["in_shape"]) == entry.in_shape
            assert tuple(row["out_shape"]) == entry.out_shape
            assert row["params_after"] == entry.params_after
            assert row["flops_after"] == entry.flops_after
        assert row["flops_before"] == entry.flops_before
        assert row["params_before"] == entry.params_before
    assert "too small" in rows["fc2"]["reason"]


# ----------------------------------------------------------------- subprocesses
# Each process pays for importing torch (seconds), so the runs start together, in
# the background, when the module's first test asks for ``files``; the tests at
# the end of the module collect them.
LOAD_WITHOUT_NDCOMPILE = """
import sys, torch
program = torch.export.load(sys.argv[1])
out = program.module()(torch.load(sys.argv[2], weights_only=True))
assert not any(name.split(".")[0] == "ndcompile" for name in sys.modules), "ndcompile imported"
torch.save(out, sys.argv[3])
"""


@pytest.fixture(scope="module", autouse=True)
def runs(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The subprocess runs of this module, started at once; each test waits for its own."""
    out = tmp_path_factory.mktemp("converted")
    bad = tmp_path_factory.mktemp("bad")
    procs = {
        "out": out,
        "bad_dir": bad,
        "convert": start_cli(
            "convert", TINY, "--state-dict", str(files["ckpt"]), "--example-shape", SHAPE_ARG,
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
            "convert", TINY, "--state-dict", str(files["wrong"]), "--example-shape", SHAPE_ARG,
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
    converted: tuple[dict, Path], files: dict[str, Path], tmp_path: Path
) -> None:
    _, out = converted
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    torch.save(x, tmp_path / "x.pt")
    proc = start(
        [sys.executable, "-c", LOAD_WITHOUT_NDCOMPILE, str(out / "m.pt2"), str(tmp_path / "x.pt"),
         str(tmp_path / "y.pt")], cwd=tmp_path,
    )  # fmt: skip
    model = tiny_with_weights(load_checkpoint(files["ckpt"]))
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


def test_progress_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeTTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    fake = FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    progress = Progress(["load", "export"], enabled=True)
    assert progress.shown
    with progress.step("load"):
        pass
    with progress.step("export"):
        pass
    assert progress.bar is not None and progress.bar.n == 2
    progress.close()
    assert "export" in fake.getvalue()
    assert not Progress(["load"], enabled=False).shown
