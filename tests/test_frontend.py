"""Tests for ndcompile.frontend: tracing with NdLinear leaves and shape propagation."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from ndcompile.errors import NdCompileError
from ndcompile.frontend.trace import (
    as_tuple,
    is_reference_ndlinear,
    node_shape,
    propagate_shapes,
    run_reference,
    trace,
)
from ndcompile.layers.ndlinear import NdLinear


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = DataDependent()
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.inner(x))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.fc(x) * scale + y


def call_modules(gm: fx.GraphModule) -> dict[str, type]:
    return {
        n.target: type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"
    }


def test_reference_ndlinear_is_a_leaf(nd_stack) -> None:
    model = nd_stack(dtype=torch.float64)
    gm = trace(model)
    calls = call_modules(gm)
    assert set(calls) == {"ref", "ours", "ref2"}
    assert calls["ours"] is NdLinear
    assert is_reference_ndlinear(model.ref) and is_reference_ndlinear(model.ref2)
    assert not is_reference_ndlinear(model.ours)
    methods = {n.target for n in gm.graph.nodes if n.op in ("call_method", "call_function")}
    assert "transpose" not in methods and torch.transpose not in methods
    x = torch.randn(3, 4, 6, 3, dtype=torch.float64)
    torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)


def test_propagate_shapes_fills_every_node(nd_stack) -> None:
    model = nd_stack()
    gm = trace(model)
    propagate_shapes(gm, (torch.randn(2, 4, 6, 3),))
    shapes = {n.name: node_shape(n) for n in gm.graph.nodes if n.op != "output"}
    assert shapes == {
        "x": (2, 4, 6, 3),
        "ref": (2, 5, 2, 3),
        "ours": (2, 3, 4, 2),
        "tanh": (2, 3, 4, 2),
        "ref2": (2, 2, 3, 2),
    }


def test_node_shape_without_metadata_is_none() -> None:
    gm = trace(nn.Linear(4, 4))
    assert all(node_shape(n) is None for n in gm.graph.nodes)


def test_trace_shares_parameters_and_keeps_model(token_mlp) -> None:
    model = token_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = trace(model)
    assert gm.fc1.weight is model.fc1.weight
    assert type(gm).__name__ == "TokenMLP"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    ("model_cls", "name"), [(DataDependent, "DataDependent"), (Wrapper, "Wrapper")]
)
def test_untraceable_model_names_the_model(model_cls, name: str) -> None:
    with pytest.raises(NdCompileError) as info:
        trace(model_cls())
    err = info.value
    assert err.layer == name
    assert f"cannot trace {name}" in str(err)
    assert "control flow" in str(err)
    assert err.hint and "leaf_modules" in err.hint
    assert isinstance(err.__cause__, Exception)


def test_leaf_modules_make_untraceable_submodule_opaque() -> None:
    model = Wrapper()
    gm = trace(model, leaf_modules=(DataDependent,))
    assert call_modules(gm)["inner"] is DataDependent
    x = torch.randn(2, 8)
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("bad_shape", [(2, 4, 5, 3), (2, 4, 6), (4, 6, 3, 2)])
def test_wrong_example_input_shape(nd_stack, bad_shape) -> None:
    gm = trace(nd_stack())
    with pytest.raises(NdCompileError) as info:
        propagate_shapes(gm, (torch.randn(bad_shape),))
    message = str(info.value)
    assert str(bad_shape) in message
    assert "example input" in message
    assert info.value.layer == "NdStack"


@pytest.mark.parametrize("count", [0, 1, 4])
def test_wrong_number_of_inputs(count: int) -> None:
    gm = trace(TwoInputs())
    with pytest.raises(NdCompileError, match=rf"takes 2..3 inputs \(x, y, scale\), got {count}"):
        propagate_shapes(gm, tuple(torch.randn(2, 8) for _ in range(count)))


def test_optional_inputs_are_accepted() -> None:
    gm = trace(TwoInputs())
    propagate_shapes(gm, (torch.randn(2, 8), torch.randn(2, 8)))
    assert node_shape(next(n for n in gm.graph.nodes if n.op == "call_module")) == (2, 8)


def test_as_tuple_and_run_reference() -> None:
    x = torch.randn(2, 8)
    assert as_tuple(x)[0] is x
    assert as_tuple([x, x]) == (x, x)
    assert as_tuple((x,)) == (x,)
    out = run_reference(nn.Linear(8, 2), (x,))
    assert out.shape == (2, 2) and not out.requires_grad
