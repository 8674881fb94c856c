"""Reliability of ``convert`` on untraceable models (partial conversion) and on bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ndcompile import NdCompileError, NdLinear, convert
from ndcompile.errors import UntraceableError

from reliability_models import (
    DataDependent,
    KeywordCall,
    NestedUntraceable,
    TokenMLP,
    assert_same_state,
    dense_equivalent,
    linear_names,
    state,
)

pytestmark = pytest.mark.usefixtures("isolated_cache")


# ------------------------------------------------------------ untraceable models

FALLBACK_CASES = {
    "top-level if": (
        DataDependent,
        {"block.fc1", "block.fc2"},
        {"head": "untraceable parent '<root>'"},
    ),
    "nested ifs": (
        NestedUntraceable,
        {"gate.block.fc1", "gate.block.fc2"},
        {"gate.head": "untraceable parent", "out": "untraceable parent '<root>'"},
    ),
    "keyword and unused calls": (
        KeywordCall,
        {"used.fc1", "used.fc2"},
        {
            "by_keyword.fc1": "keyword arguments",
            "by_keyword.fc2": "keyword arguments",
            "unused.fc1": "not called on the example input",
            "unused.fc2": "not called on the example input",
        },
    ),
}


@pytest.mark.parametrize("case", list(FALLBACK_CASES))
def test_fallback_converts_traceable_submodules(case: str) -> None:
    cls, converted, skipped = FALLBACK_CASES[case]
    model = cls()
    before = state(model)
    x = torch.randn(4, 64)
    result = convert(model, x, mode="fresh", output="graph")

    assert type(result) is cls and result is not model
    assert_same_state(state(model), before)
    report = result.report
    assert {e.name for e in report.layers} == linear_names(model)
    assert {e.name for e in report.converted} == converted
    for name in converted:
        assert isinstance(result.get_submodule(name), NdLinear), name
    for name, reason in skipped.items():
        entry = report.layer(name)
        assert entry.status == "skipped" and reason in (entry.reason or ""), (name, entry.reason)
        assert type(result.get_submodule(name)) is type(model.get_submodule(name))
    assert any("not traceable" in note and cls.__name__ in note for note in report.notes)
    assert report.params_after < report.params_before
    for batch in (1, 4, 7):
        inp = torch.randn(batch, 64)
        out = result(inp)
        assert out.shape == model(inp).shape
        torch.testing.assert_close(out, dense_equivalent(model, result)(inp))


def test_nested_fallback_names_the_real_parent() -> None:
    result = convert(NestedUntraceable(), torch.randn(4, 64), mode="fresh", output="graph")
    assert "'gate'" in (result.report.layer("gate.head").reason or "")


@pytest.mark.parametrize("cls", [DataDependent, NestedUntraceable, KeywordCall])
def test_no_fallback_raises_untraceable_error(cls: type[nn.Module]) -> None:
    with pytest.raises(UntraceableError, match=rf"cannot trace {cls.__name__}") as info:
        convert(cls(), torch.randn(4, 64), fallback=False, output="graph")
    assert isinstance(info.value, NdCompileError)
    assert info.value.layer == cls.__name__
    assert "control flow" in str(info.value) and info.value.hint


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("cls", [TokenMLP, DataDependent])
def test_model_failing_on_example_input_raises_ndcompile_error(
    cls: type[nn.Module], verify: bool
) -> None:
    with pytest.raises(NdCompileError, match=r"example input") as info:
        convert(cls(), torch.randn(4, 63), verify=verify)
    assert info.value.layer == cls.__name__


def test_example_input_error_names_the_cause() -> None:
    with pytest.raises(NdCompileError, match=r"mat1 and mat2 shapes cannot be multiplied"):
        convert(TokenMLP(), torch.randn(4, 63), verify=False)


BAD_INPUTS = {
    "input of the wrong width": (
        lambda: convert(TokenMLP(), torch.randn(2, 63)),
        r"\[TokenMLP\] running the model on the example input \[\(2, 63\)\] failed",
    ),
    "too many example inputs": (
        lambda: convert(TokenMLP(), (torch.randn(2, 64), torch.randn(2, 64))),
        r"example input \[\(2, 64\), \(2, 64\)\]",
    ),
    "untraceable, fallback=False": (
        lambda: convert(DataDependent(), torch.randn(2, 64), fallback=False, output="graph"),
        r"cannot trace DataDependent with torch.fx: TraceError",
    ),
    "untraceable, bad input": (
        lambda: convert(DataDependent(), torch.randn(2, 63), verify=False, output="graph"),
        r"\[DataDependent\] the model fails on the example input",
    ),
    "unknown mode": (
        lambda: convert(TokenMLP(), torch.randn(2, 64), mode="magic"),
        r"unknown mode 'magic'; valid modes are: fresh, exact",
    ),
    "unknown optimizer": (
        lambda: convert(TokenMLP(), torch.randn(2, 64), optimizer="fast"),
        r"unknown optimizer 'fast'; valid optimizers are: auto",
    ),
    "factorize without rank": (
        lambda: convert(TokenMLP(), torch.randn(2, 64), mode="factorize"),
        r"mode='factorize' needs rank=R",
    ),
    "override of a missing layer": (
        lambda: convert(TokenMLP(), torch.randn(2, 64), shapes={"fc9": ((8, 8), (8, 12))}),
        r"not nn.Linear in the model: \['fc9'\]",
    ),
    "override with wrong sizes": (
        lambda: convert(TokenMLP(), torch.randn(2, 64), shapes={"fc1": ((8, 9), (8, 12))}),
        r"\[fc1\] shapes override \(8, 9\) -> \(8, 12\) does not match Linear\(64, 96\)",
    ),
    "bare Linear as the model": (
        lambda: convert(nn.Linear(64, 64), torch.randn(2, 64)),
        r"the model is a bare Linear",
    ),
    "NdLinear on the wrong shape": (
        lambda: NdLinear((4, 4), (2, 2))(torch.randn(3, 16)),
        r"NdLinear expects input \(\*, 4, 4\), got \(3, 16\)",
    ),
    "NdLinear unknown planner": (
        lambda: NdLinear((4, 4), (2, 2), planner="fast"),
        r"unknown planner 'fast'; valid planners are: cost, flops",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_clear_error(case: str) -> None:
    call, message = BAD_INPUTS[case]
    with pytest.raises(NdCompileError, match=message):
        call()
