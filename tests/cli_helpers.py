"""Constants, input files and process helpers shared by the ``ndcompile`` command tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ndcompile.cli.loading import build_model

__all__ = [
    "CLI",
    "FIXTURE",
    "SHAPE",
    "SHAPE_ARG",
    "TINY",
    "Pickled",
    "convert_args",
    "finish",
    "start",
    "start_cli",
    "tiny_with_weights",
    "trained_weights",
    "write_input_files",
]

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


def write_input_files(d: Path) -> dict[str, Path]:
    """Write the tests' input files into ``d``: checkpoints of every kind, calibration data."""
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


def convert_args(out: Path, *extra: str, model: str = TINY) -> list[str]:
    """``convert`` arguments writing ``m.pt2`` and ``r.json`` into ``out``, then ``extra``."""
    shape = [] if "--example-shape" in extra else ["--example-shape", SHAPE_ARG]
    return ["convert", model, *shape, "-o", str(out / "m.pt2"),
            "--report", str(out / "r.json"), *extra]  # fmt: skip
