"""Tests of the command's loading of user input: factories, shapes, checkpoints, calibration."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

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
from ndcompile.cli.main import EXIT_FAILED, EXIT_USAGE, main

from cli_helpers import FIXTURE, SHAPE, SHAPE_ARG, TINY, trained_weights


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


def test_parse_shapes_json(cli_files: dict[str, Path]) -> None:
    assert parse_shapes_json('{"fc1": [[16, 16], [8, 8]]}') == {"fc1": ((16, 16), (8, 8))}
    assert parse_shapes_json(str(cli_files["shapes"])) == {"fc1": ((32, 8), (8, 8))}
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
def test_load_checkpoint_formats(cli_files: dict[str, Path], kind: str) -> None:
    state = load_checkpoint(cli_files[kind])
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
def test_load_checkpoint_refuses(cli_files: dict[str, Path], kind: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        load_checkpoint(cli_files[kind])
    with pytest.raises(UsageError, match="does not exist"):
        load_checkpoint(cli_files[kind].with_name("absent.pt"))


def test_pickled_checkpoint_really_needs_unpickling(cli_files: dict[str, Path]) -> None:
    with pytest.raises(pickle.UnpicklingError):
        torch.load(cli_files["pickled"], weights_only=True)


def test_load_state_dict_strict_lists_every_problem(cli_files: dict[str, Path]) -> None:
    model = build_model(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError) as err:
        load_state_dict_strict(model, load_checkpoint(cli_files["wrong"]))
    text = str(err.value)
    assert "missing keys: fc2.bias" in text
    assert "unexpected keys: extra.weight" in text
    assert "fc1.weight (64, 255) vs model (64, 256)" in text
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    load_state_dict_strict(model, load_checkpoint(cli_files["ckpt"]))
    assert torch.equal(model.fc2.bias, trained_weights()["fc2.bias"])


def test_load_calibration(cli_files: dict[str, Path], tmp_path: Path) -> None:
    batches = load_calibration(cli_files["calib"])
    assert [tuple(b.shape) for b in batches] == [SHAPE, SHAPE]
    torch.save(torch.ones(3, 4), tmp_path / "one.pt")
    assert len(load_calibration(tmp_path / "one.pt")) == 1
    with pytest.raises(UsageError, match="must hold a tensor or a list of tensors"):
        load_calibration(cli_files["calib_bad"])


# ------------------------------------------------------------- sys.exit in user code
EXITING = """
import sys
import torch
from torch import nn

{top}

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(256, 64)

    def forward(self, x):
        {forward}
        return self.fc(x.flatten(1))

class Stop(BaseException):
    pass

def build():
    {factory}
    return Net()
"""

EXIT_CASES = {
    "import": ({"top": "sys.exit(0)"}, "importing", "it called sys.exit(0)"),
    "factory": ({"factory": "sys.exit()"}, "factory", "it called sys.exit()"),
    "factory code": ({"factory": "sys.exit(3)"}, "factory", "it called sys.exit(3)"),
    "forward": ({"forward": "sys.exit(0)"}, "", "called sys.exit(0)"),
    "base exception": ({"factory": "raise Stop('custom')"}, "factory", "Stop: custom"),
}


@pytest.mark.parametrize("case", list(EXIT_CASES))
def test_sys_exit_in_model_code_fails_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    parts, where, message = EXIT_CASES[case]
    source = EXITING.format(**{"top": "", "forward": "pass", "factory": "pass", **parts})
    (tmp_path / "exiting.py").write_text(source)
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.pt2").write_bytes(b"old output")
    argv = ["convert", f"{tmp_path / 'exiting.py'}:build", "--example-shape", SHAPE_ARG,
            "--mode", "fresh", "-o", str(out / "m.pt2")]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    assert code in (EXIT_USAGE, EXIT_FAILED), err
    assert err.startswith("ndcompile: error: ") and err.count("\n") == 1, err
    assert where in err and message in err, err
    assert sorted(p.name for p in out.iterdir()) == ["m.pt2"]
    assert (out / "m.pt2").read_bytes() == b"old output"


# -------------------------------------------------------------------- --shapes
@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ('{"fc1": [[16.9, 16], [8, 8]]}', "must be positive integers, got 16.9"),
        ('{"fc1": [[16, 16], ["8", 8]]}', 'must be positive integers, got "8"'),
        ('{"fc1": [[16, 16], [8, 8, 0]]}', "must be positive integers, got 0"),
        ('{"fc1": [[16, 16]]}', "must map to [in_modes, out_modes]"),
        ("absent-modes.json", "--shapes file 'absent-modes.json' does not exist"),
    ],
)
def test_shapes_are_checked_not_truncated(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    shapes: str,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["convert", TINY, "--example-shape", SHAPE_ARG, "--mode", "fresh",
            "--shapes", shapes, "-o", str(tmp_path / "m.pt2")]  # fmt: skip
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "not valid JSON" not in err, err
    assert list(tmp_path.iterdir()) == []
