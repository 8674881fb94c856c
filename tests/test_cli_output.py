"""Tests of the command's output handling: staged files, signals, the progress display."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ndcompile.cli.output import Progress, StagedOutputs

from cli_helpers import SHAPE_ARG, TINY


# ------------------------------------------------------------------- staged files
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


# ------------------------------------------------------------------- progress
def test_progress_hidden_without_tty() -> None:
    progress = Progress(["a", "b"], enabled=True)  # pytest's stderr is not a terminal
    with progress.step("a"):
        pass
    assert not progress.shown
    progress.close()


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
