"""Tests for ndcompile.backends.dense.to_dense: converted models back to dense nn.Linear."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

import ndcompile
from ndcompile.backends.dense import find_contraction_sites, to_dense
from ndcompile.errors import NdCompileError
from ndcompile.frontend.trace import trace
from ndcompile.layers.ndlinear import NdLinear

from reliability_models import SmallUntraceable


class ImageMLP(nn.Module):
    """Flattened (H, W, C) input: fc1's modes come from the graph, fc2's are factored."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4 * 6 * 2, 32)
        self.fc2 = nn.Linear(32, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class NdModel(nn.Module):
    """NdLinear layers of every bias kind (one with a low-rank residual), chained, one
    of them called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = NdLinear((4, 6), (5, 3), rank=2, lowrank=2)
        nn.init.normal_(self.a.lowrank_u, std=0.3)  # starts at zero; make it count
        self.b = NdLinear((5, 3), (4, 4), rank=1, bias="modes")
        self.c = NdLinear((4, 4), (3, 5), rank=3, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.c(self.b(torch.relu(self.a(x))))
        return y, self.a(x)


def _converted(mode: str, dtype: torch.dtype = torch.float32) -> tuple[fx.GraphModule, tuple]:
    torch.manual_seed(0)
    if mode == "exact":
        model, x = NdModel().to(dtype), torch.randn(3, 2, 4, 6, dtype=dtype)
        return ndcompile.convert(model, x, mode="exact"), (x,)
    model, x = ImageMLP().to(dtype), torch.randn(5, 4, 6, 2, dtype=dtype)
    # Two modes keep the factorize fit a fast SVD (three modes need iterative CP-ALS).
    kwargs = {"rank": 2, "shapes": {"fc1": ((8, 6), (4, 8))}} if mode == "factorize" else {}
    return ndcompile.convert(model, x, mode=mode, output="graph", **kwargs), (x,)


def _outputs(module: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(*inputs)
    return list(out) if isinstance(out, tuple) else [out]


CASES = [
    ("fresh", torch.float32, 1e-5),
    ("factorize", torch.float32, 1e-5),
    ("exact", torch.float32, 1e-5),
    ("fresh", torch.float64, 1e-12),
    ("exact", torch.float64, 1e-12),
]


@pytest.mark.parametrize(("mode", "dtype", "tol"), CASES)
def test_to_dense_equals_converted(mode: str, dtype: torch.dtype, tol: float) -> None:
    gm, (x,) = _converted(mode, dtype)
    dense = to_dense(gm)
    for batch in (x, x[:1], torch.cat([x, x])):
        for got, want in zip(_outputs(dense, (batch,)), _outputs(gm, (batch,)), strict=True):
            assert got.shape == want.shape
            assert torch.allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", ["fresh", "factorize", "exact"])
def test_dense_module_has_full_linear_weights(mode: str) -> None:
    gm, _ = _converted(mode)
    layers = {name: m for name, m in gm.named_modules() if isinstance(m, NdLinear)}
    assert layers
    dense = to_dense(gm)
    assert not any(isinstance(m, NdLinear) for m in dense.modules())
    for name, layer in layers.items():
        linear = dense.get_submodule(name)
        assert type(linear) is nn.Linear
        assert linear.weight.shape == (layer.out_features, layer.in_features)
        assert torch.allclose(linear.weight, layer.dense_weight())
        bias = layer.full_bias()
        assert (linear.bias is None) == (bias is None)
        if bias is not None:
            assert torch.allclose(linear.bias, bias)
    targets = [n.target for n in dense.graph.nodes if n.op in ("get_attr", "call_module")]
    assert not any(".factors." in t or ".mode_biases." in t for t in targets)
    assert sorted(t for t in targets if t in layers) == sorted(
        s.layer for s in find_contraction_sites(gm)
    )


def test_to_dense_leaves_the_converted_model_alone() -> None:
    gm, _ = _converted("factorize")
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    code = gm.code
    to_dense(gm)
    assert gm.code == code
    assert isinstance(gm.get_submodule("fc1"), NdLinear)
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_sites_found_for_each_call() -> None:
    gm, _ = _converted("exact")
    sites = find_contraction_sites(gm)
    assert [s.layer for s in sites] == ["a", "b", "c", "a"]
    assert not any(s.flat for s in sites)
    assert sites[1].input.op != "placeholder" and sites[0].input.op == "placeholder"


def test_call_module_ndlinear_is_replaced() -> None:
    gm = trace(nn.Sequential(NdLinear((4, 8), (8, 4), rank=2)))
    assert any(n.op == "call_module" for n in gm.graph.nodes)
    x = torch.randn(3, 4, 8)
    dense = to_dense(gm)
    assert type(dense.get_submodule("0")) is nn.Linear
    assert torch.allclose(dense(x), gm(x), atol=1e-6)


def test_partially_converted_model() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 32)
    gm = ndcompile.convert(SmallUntraceable(), x, mode="fresh", output="graph")
    assert not isinstance(gm, fx.GraphModule)
    assert isinstance(gm.get_submodule("block.fc"), NdLinear)
    dense = to_dense(gm)
    assert type(dense) is SmallUntraceable
    assert type(dense.get_submodule("block.fc")) is nn.Linear
    for batch in (x, -x):  # both branches of the top-level control flow
        assert torch.allclose(dense(batch), gm(batch), atol=1e-6)


def test_eager_ndlinear_is_an_error() -> None:
    with pytest.raises(NdCompileError, match="called eagerly"):
        to_dense(nn.Sequential(NdLinear((4, 4), (2, 2))))
    plain = nn.Sequential(nn.Linear(4, 4))
    assert torch.equal(to_dense(plain)[0].weight, plain[0].weight)


def test_marked_output_without_region_is_an_error() -> None:
    gm, _ = _converted("fresh")
    relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
    relu.meta["ndcompile_plan"] = "bogus"
    with pytest.raises(NdCompileError, match="carries no region tag"):
        to_dense(gm)


def _tag_of(gm: fx.GraphModule, target: str) -> str:
    return next(n.meta["ndcompile_region"] for n in gm.graph.nodes if n.target == target)


def test_region_leaking_values_is_an_error() -> None:
    gm, _ = _converted("fresh")
    fc1_bias = next(n for n in gm.graph.nodes if n.target == "fc1.bias")
    fc1_bias.meta["ndcompile_region"] = _tag_of(gm, "fc2.bias")
    with pytest.raises(NdCompileError, match="not a single call"):
        to_dense(gm)


def test_wrong_region_is_caught_by_the_check() -> None:
    gm, _ = _converted("fresh")
    relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
    relu.meta["ndcompile_region"] = _tag_of(gm, "fc2.bias")  # relu would be dropped
    with pytest.raises(NdCompileError, match="dense model differs"):
        to_dense(gm)
    assert isinstance(to_dense(gm, check=False), fx.GraphModule)


@pytest.mark.parametrize("mode", ["fresh", "factorize"])
def test_module_surgery_output_densifies(mode: str) -> None:
    torch.manual_seed(0)
    model, x = ImageMLP(), torch.randn(5, 4, 6, 2)
    kwargs = {"rank": 2} if mode == "factorize" else {}
    converted = ndcompile.convert(model, x, mode=mode, **kwargs)
    assert isinstance(converted, ImageMLP)
    dense = ndcompile.to_dense(converted)
    assert not any(isinstance(m, NdLinear) for m in dense.modules())
    with torch.no_grad():
        torch.testing.assert_close(dense(x), converted(x), rtol=1e-5, atol=1e-6)
