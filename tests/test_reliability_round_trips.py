"""Reliability of converted models through state_dict files, export, copy, pickle, re-conversion."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.fx as fx
from torch import nn

from ndcompile import NdLinear, convert

from reliability_models import (
    DataDependent,
    PlainDataDependent,
    PlainMLP,
    TokenMLP,
    assert_same_state,
    rel_error,
    state,
)

pytestmark = pytest.mark.usefixtures("isolated_cache")


# -------------------------------------------------------------------- round-trips


def _fresh_pair() -> tuple[nn.Module, torch.Tensor, fx.GraphModule, fx.GraphModule]:
    model = TokenMLP()
    x = torch.randn(3, 5, 64)
    torch.manual_seed(1)
    a = convert(model, x, mode="fresh")
    torch.manual_seed(2)
    b = convert(model, x, mode="fresh")
    assert not torch.equal(a(x), b(x))
    return model, x, a, b


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_state_dict_file_round_trip(tmp_path, fmt: str) -> None:
    _, x, gm, other = _fresh_pair()
    path = tmp_path / f"weights.{fmt}"
    if fmt == "torch":
        torch.save(gm.state_dict(), path)
        loaded = torch.load(path, weights_only=True)
    else:
        st = pytest.importorskip("safetensors.torch")
        st.save_file(gm.state_dict(), str(path))
        loaded = st.load_file(str(path))
    assert set(loaded) == set(gm.state_dict()) and "fc1.factors.0" in loaded
    other.load_state_dict(loaded)
    assert torch.equal(other(x), gm(x))


def test_torch_export_round_trip(tmp_path) -> None:
    _, x, gm, _ = _fresh_pair()
    exported = torch.export.export(gm, (x,))
    torch.export.save(exported, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2")
    assert torch.equal(loaded.module()(x), gm(x))


def test_deepcopy_round_trip() -> None:
    _, x, gm, _ = _fresh_pair()
    dup = copy.deepcopy(gm)
    assert torch.equal(dup(x), gm(x))
    with torch.no_grad():
        dup.get_submodule("fc1").factors[0].add_(1.0)
    assert not torch.equal(dup(x), gm(x))


def test_deepcopy_keeps_report() -> None:
    _, _, gm, _ = _fresh_pair()
    assert copy.deepcopy(gm).report.to_dict() == gm.report.to_dict()


@pytest.mark.parametrize(
    "cls",
    [
        PlainMLP,
        PlainDataDependent,
        TokenMLP,
        DataDependent,
    ],
)
def test_pickle_round_trip(cls: type[nn.Module]) -> None:
    x = torch.randn(4, 64)
    result = convert(cls(), x, mode="fresh")
    loaded = pickle.loads(pickle.dumps(result))
    if isinstance(result, fx.GraphModule):
        assert isinstance(loaded, fx.GraphModule)
    else:
        assert type(loaded) is type(result)
    assert torch.equal(loaded(x), result(x))
    assert_same_state(state(loaded), state(result))
    assert loaded.report.to_dict() == result.report.to_dict()


@pytest.mark.parametrize("source_mode", ["fresh", "factorize"])
def test_exact_conversion_of_converted_model_is_noop(source_mode: str) -> None:
    model = TokenMLP().double()
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    kwargs = {"rank": 2} if source_mode == "factorize" else {}
    gm = convert(model, x, mode=source_mode, output="graph", **kwargs)
    again = convert(gm, x, mode="exact")
    assert rel_error(gm(x), again(x)) < 1e-12
    assert sorted(n for n, _ in again.named_modules()) == sorted(n for n, _ in gm.named_modules())
    assert_same_state(state(again), state(gm))
    assert again.report.params_after == again.report.params_before
    assert not again.report.converted


def test_exact_conversion_keeps_ndlinear_modules() -> None:
    x = torch.randn(3, 64)
    gm = convert(TokenMLP(), x, mode="fresh")
    again = convert(gm, x, mode="exact")
    assert isinstance(again.get_submodule("fc1"), NdLinear)
    torch.testing.assert_close(
        again.get_submodule("fc1").to_dense().weight, gm.fc1.to_dense().weight
    )
