"""Tests of ``main()``: exit codes and one-line error messages for bad input to every command."""

from __future__ import annotations

from pathlib import Path

import pytest

from ndcompile.cli.main import EXIT_FAILED, EXIT_USAGE, format_error, main
from ndcompile.errors import NdCompileError

from cli_helpers import FIXTURE, SHAPE_ARG, TINY, convert_args


def test_format_error_is_one_line() -> None:
    err = NdCompileError("bad thing\nmore detail", layer="fc1", hint="do\n this")
    assert format_error(err) == "ndcompile: error: [fc1] bad thing; more detail (hint: do this)"
    assert format_error(KeyError("k")) == "ndcompile: error: KeyError: 'k'"


# ------------------------------------------------------- main() in-process: errors
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
    cli_files: dict[str, Path],
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
    args = [str(cli_files[a]) if a in cli_files else a.replace("OUT", str(out)) for a in extra]
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
