"""Reliability and safety of the ``ndcompile`` command on hostile or unusual input.

Crafted ``.pt2`` files whose loading would run code (each would create a canary file),
model code that calls ``sys.exit``, signals during export, ``--shapes`` and
``--distill`` files, and the batch dimension of the exported program.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from ndcompile.cli.main import EXIT_FAILED, EXIT_USAGE, main
from ndcompile.cli.output import StagedOutputs

FIXTURE = Path(__file__).parent / "fixtures" / "cli_models.py"
TINY = f"{FIXTURE}:tiny_net"
SHAPE_ARG = "8,16,16"


class CreatesFile:
    """Unpickling this object creates ``path``: proof that a payload ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def pickled_payload(canary: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(CreatesFile(canary), buffer)
    return buffer.getvalue()


def rewrite_archive(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None]) -> None:
    """Copy a zip archive, passing each record (name without the root folder) through ``edit``.

    ``edit`` returns the new content, or ``None`` to drop the record; it is also asked
    for the records ``"<extra>"`` (native code) and ``"<constant>"`` (an opaque constant)
    to add.
    """
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            data = edit(info.filename.split("/", 1)[1], zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
        extra = edit("<extra>", b"")
        if extra:
            zout.writestr(f"{root}/data/aotinductor/model/model.so", extra)
        constant = edit("<constant>", b"")
        if constant:
            zout.writestr(f"{root}/data/constants/opaque_obj_0", constant)


@pytest.fixture(scope="module")
def good_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small exported program with a dynamic batch dim (so it has shape expressions)."""
    path = tmp_path_factory.mktemp("pt2") / "good.pt2"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def _pickled_weight(canary: Path) -> Callable[[str, bytes], bytes | None]:
    def edit(name: str, data: bytes) -> bytes | None:
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        if name == "data/weights/weight_0":
            return pickled_payload(canary)
        return data

    return edit


def _pickled_sample_inputs(canary: Path) -> Callable[[str, bytes], bytes | None]:
    return lambda name, data: pickled_payload(canary) if name.startswith("data/sample_") else data


def _eval_in_shape_expression(canary: Path) -> Callable[[str, bytes], bytes | None]:
    def edit(name: str, data: bytes) -> bytes | None:
        if name == "models/model.json":
            marker = b'"expr_str": "Symbol('
            assert marker in data
            return data.replace(
                marker, f"\"expr_str\": \"open('{canary}', 'w') and Symbol(".encode()
            )
        return data

    return edit


def _pickled_constant(canary: Path) -> Callable[[str, bytes], bytes | None]:
    def edit(name: str, data: bytes) -> bytes | None:
        if name.endswith("_constants_config.json"):
            meta = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                    "tensor_meta": None}  # fmt: skip
            return json.dumps({"config": {"lut": meta}}).encode()
        return data

    def add(name: str, data: bytes) -> bytes | None:
        if name == "<constant>":
            return pickle.dumps(CreatesFile(canary))
        return None if name == "<extra>" else edit(name, data)

    return add


def _native_code(canary: Path) -> Callable[[str, bytes], bytes | None]:
    return lambda name, data: b"\x7fELF" if name == "<extra>" else data


def _legacy_format(canary: Path) -> Callable[[str, bytes], bytes | None]:
    return lambda name, data: None if name == "archive_version" else data


CRAFTED = {
    "pickled weight": (_pickled_weight, "weight '0.weight' is pickled"),
    "pickled sample inputs": (_pickled_sample_inputs, "sample inputs need arbitrary unpickling"),
    "eval in a shape expression": (_eval_in_shape_expression, "not plain arithmetic"),
    "pickled constant": (_pickled_constant, "constant 'lut' is pickled"),
    "native code": (_native_code, "contains native code"),
    "legacy format": (_legacy_format, "not in the current .pt2 format"),
}


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_inspect_refuses_pt2_that_would_run_code(
    good_pt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture, kind: str
) -> None:
    make_edit, reason = CRAFTED[kind]
    canary = tmp_path / "payload-ran"
    crafted = tmp_path / "crafted.pt2"
    rewrite_archive(good_pt2, crafted, make_edit(canary))
    code = main(["inspect", str(crafted)])
    err = capsys.readouterr().err
    assert not canary.exists(), "the payload ran"
    assert code == EXIT_USAGE, err
    assert err.startswith("ndcompile: error: ") and err.count("\n") == 1, err
    assert "refused for safety" in err and reason in err, err


def test_safe_pt2_still_loads(good_pt2: Path, capsys: pytest.CaptureFixture) -> None:
    from ndcompile.cli.archive import load_exported_program, unsafe_reasons

    with open(good_pt2, "rb") as handle:
        assert unsafe_reasons(handle) == []
    program = load_exported_program(good_pt2)
    torch.testing.assert_close(program.module()(torch.ones(5, 4)).shape, torch.Size([5, 3]))
    assert main(["inspect", str(good_pt2)]) == 0
    assert "aten.linear.default" in capsys.readouterr().out


def test_not_an_archive_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "junk.pt2"
    path.write_bytes(b"not a zip file")
    assert main(["inspect", str(path)]) == EXIT_USAGE
    assert "not a .pt2 archive" in capsys.readouterr().err


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


# ------------------------------------------------------------------- signals
def test_terminated_cleans_up_staged_files(tmp_path: Path) -> None:
    from ndcompile.cli.output import Terminated

    with pytest.raises(Terminated), StagedOutputs() as staged:
        staged.stage(tmp_path / "m.pt2", lambda p: p.write_bytes(b"partial"))
        raise Terminated(signal.SIGTERM)
    assert list(tmp_path.iterdir()) == []


def test_deferred_signals_raise_after_the_block() -> None:
    from ndcompile.cli.output import Terminated, deferred_signals

    done = []
    with pytest.raises(Terminated) as info, deferred_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        done.append("finished")  # the signal waits for the block to end
    assert done == ["finished"] and info.value.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt), deferred_signals():
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


#: Runs ``ndcompile`` with torch.export.save patched to receive ``signal`` from inside
#: the zip writer's write callback, as a user's Ctrl-C or ``kill`` would arrive.
SIGNAL_DRIVER = """
import io, os, signal, sys
import torch

real_save = torch.export.save
signum = getattr(signal, sys.argv[1])


class Sink(io.RawIOBase):
    def __init__(self, target):
        self.target, self.calls = target, 0

    def writable(self):
        return True

    def write(self, data):
        self.calls += 1
        if self.calls == 2:
            os.kill(os.getpid(), signum)
        return self.target.write(data)


def save(program, f, **kwargs):
    return real_save(program, Sink(f), **kwargs)


torch.export.save = save
from ndcompile.cli.main import main

sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
def test_signals_during_export_exit_cleanly_and_leave_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    expected = {"SIGINT": 130, "SIGTERM": 128 + signal.SIGTERM, "SIGHUP": 128 + signal.SIGHUP}
    procs = {}
    for name in expected:
        out = tmp_path / name
        out.mkdir()
        argv = ["convert", TINY, "--example-shape", SHAPE_ARG, "--mode", "fresh",
                "-o", str(out / "m.pt2"), "--report", str(out / "r.json")]  # fmt: skip
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", SIGNAL_DRIVER, name, *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == expected[name], (name, err[-2000:])
        assert "terminate called" not in err and "Traceback" not in err, err[-2000:]
        assert err.strip().splitlines()[-1].startswith("ndcompile: interrupted"), err
        assert list((tmp_path / name).iterdir()) == [], name


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
