"""Tests of the dynamo backend's options and its registration (the entry point included)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from ndcompile.backends.dynamo import OPTION_KEYS, parse_options, register_backend
from ndcompile.errors import NdCompileError

from backend_helpers import ROOT


# ----------------------------------------------------------------------- options
def test_bad_option_lists_valid_keys() -> None:
    with pytest.raises(NdCompileError) as info:
        parse_options({"optimiser": "dp"})
    assert all(key in str(info.value) for key in OPTION_KEYS)
    with pytest.raises(NdCompileError, match="rank, tol, max_rank"):
        parse_options({"ndcompile": {"factorize": {"rnak": 2}}})
    with pytest.raises(NdCompileError, match="exactly one of"):
        parse_options({"factorize": {}})
    with pytest.raises(NdCompileError, match="valid optimizers"):
        parse_options({"optimizer": "best"})
    model = nn.Linear(4, 4)
    compiled = torch.compile(model, backend="ndcompile", options={"bogus": 1})
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 4))
    inner = getattr(info.value, "inner_exception", info.value.__cause__)
    assert isinstance(inner, NdCompileError)
    assert "bogus" in str(inner) and "factorize" in str(inner)


def test_options_nested_and_flat_agree() -> None:
    flat = parse_options({"optimizer": "greedy", "inductor": False, "passes": ["ndlinear"]})
    nested = parse_options(
        {"ndcompile": {"optimizer": "greedy", "inductor": False, "passes": ("ndlinear",)}}
    )
    assert flat == nested
    assert flat.passes == ("ndlinear",) and parse_options(None).inductor is True


def test_register_backend_is_idempotent() -> None:
    register_backend()
    assert register_backend() is False
    assert "ndcompile" in torch._dynamo.list_backends()
    assert register_backend() is False


_ENTRY_POINT_SCRIPT = """
import sys
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
x = torch.randn(3, 8)
if sys.argv[1] == "discovered":
    # torch has seen the entry point; importing ndcompile must not register a duplicate
    assert "ndcompile" in torch._dynamo.list_backends()
    from ndcompile.backends.dynamo import register_backend
    assert register_backend() is False
assert sys.argv[1] == "discovered" or "ndcompile" not in sys.modules
compiled = torch.compile(model, backend="ndcompile", options={"inductor": False})
torch.testing.assert_close(compiled(x), model(x))
assert "ndcompile.backends.dynamo" in sys.modules
from ndcompile.backends.dynamo import register_backend
assert register_backend() is False
print("entry point ok")
"""


def test_entry_point_in_fresh_process() -> None:
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _ENTRY_POINT_SCRIPT, case],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ""},
        )
        for case in ("fresh", "discovered")
    ]
    for run in runs:
        out, err = run.communicate(timeout=180)
        assert run.returncode == 0, err[-3000:]
        assert "entry point ok" in out
