"""Tests for the graph passes: rewrite_ndlinear, inline_ndlinear, dead_code_elimination."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from ndcompile.frontend.sites import LinearSite, find_linear_sites
from ndcompile.frontend.trace import propagate_shapes, trace
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.passes import (
    dead_code_elimination,
    inline_ndlinear,
    rewrite_ndlinear,
    set_submodule,
)
from ndcompile.testing import graph_op_counts

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float64: {"atol": 1e-10, "rtol": 1e-10}}


def traced(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    gm = trace(copy.deepcopy(model))
    propagate_shapes(gm, (x,))
    return gm


def fresh_layer(site: LinearSite) -> NdLinear:
    w = site.module.weight
    return NdLinear(site.in_shape, site.out_shape, bias=site.module.bias is not None, dtype=w.dtype)


def rewrite(gm: fx.GraphModule) -> PassResult:
    return rewrite_ndlinear(gm, find_linear_sites(gm), fresh_layer)


def dense_twin(model: nn.Module, gm: fx.GraphModule) -> nn.Module:
    """``model`` with each rewritten Linear replaced by the dense form of its NdLinear."""
    twin = copy.deepcopy(model)
    for name, module in gm.named_modules():
        if isinstance(module, NdLinear):
            set_submodule(twin, name, module.to_dense())
    return twin


# ------------------------------------------------------------- rewrite_ndlinear


@DTYPES
def test_rewrite_replaces_linears(token_mlp, dtype) -> None:
    model = token_mlp(dtype=dtype)
    x = torch.randn(2, 5, 64, dtype=dtype)
    gm = traced(model, x)
    result = rewrite(gm)
    assert isinstance(result, PassResult)
    assert result.modified
    assert result.graph_module is gm
    gm.graph.lint()
    counts = graph_op_counts(gm)
    assert counts["Linear"] == 0 and counts["NdLinear"] == 0
    assert counts["matmul"] + counts["bmm"] >= 4  # two modes per layer, two layers
    assert {n for n, m in gm.named_modules() if isinstance(m, NdLinear)} == {"fc1", "fc2"}
    get_attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {"fc1.factors.0", "fc1.factors.1", "fc1.bias", "fc2.bias"} <= get_attrs
    torch.testing.assert_close(gm(x), dense_twin(model, gm)(x), **TOL[dtype])
    # Leading dims stay batch dims.
    x2 = torch.randn(3, 64, dtype=dtype)
    torch.testing.assert_close(gm(x2), dense_twin(model, gm)(x2), **TOL[dtype])


def test_rewrite_graph_flatten_site(image_head) -> None:
    model = image_head(dtype=torch.float64)
    x = torch.randn(3, 4, 6, 3, dtype=torch.float64)
    gm = traced(model, x)
    assert rewrite(gm).modified
    assert gm.fc.in_shape == (4, 6, 3)
    assert isinstance(gm.head, nn.Linear)  # too small: skipped
    torch.testing.assert_close(gm(x), dense_twin(model, gm)(x), **TOL[torch.float64])


def test_rewrite_shared_linear_uses_one_layer() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.tanh(self.fc(x)))

    model = Twice().double()
    x = torch.randn(2, 32, dtype=torch.float64)
    gm = traced(model, x)
    assert rewrite(gm).modified
    assert sum(isinstance(m, NdLinear) for m in gm.modules()) == 1
    counts = graph_op_counts(gm)
    assert counts["matmul"] + counts["bmm"] == 2 * gm.fc.plan().program.count("matmul")
    torch.testing.assert_close(gm(x), dense_twin(model, gm)(x), **TOL[torch.float64])


def test_rewrite_second_run_is_noop(token_mlp) -> None:
    x = torch.randn(2, 64)
    gm = traced(token_mlp(), x)
    assert rewrite(gm).modified
    code = gm.code
    again = rewrite(gm)
    assert not again.modified
    assert gm.code == code


def test_rewrite_without_linears_is_unchanged(no_linear) -> None:
    gm = traced(no_linear(), torch.randn(2, 8))
    code, nodes = gm.code, len(gm.graph.nodes)
    result = rewrite(gm)
    assert not result.modified
    assert result.graph_module is gm
    assert gm.code == code and len(gm.graph.nodes) == nodes


def test_rewrite_skips_unconvertible_sites() -> None:
    model = nn.Sequential(nn.Linear(97, 64), nn.ReLU(), nn.Linear(64, 64))
    gm = traced(model, torch.randn(2, 97))
    sites = find_linear_sites(gm)
    assert [s.convertible for s in sites] == [False, True]
    made = []
    result = rewrite_ndlinear(gm, sites, lambda s: made.append(s.name) or fresh_layer(s))
    assert result.modified and made == ["2"]
    assert isinstance(gm.get_submodule("0"), nn.Linear)


# ------------------------------------------------------------- inline_ndlinear


@DTYPES
def test_inline_ndlinear_is_exact(nd_stack, dtype) -> None:
    model = nd_stack(dtype=dtype)
    x = torch.randn(3, 4, 6, 3, dtype=dtype)
    gm = traced(model, x)
    result = inline_ndlinear(gm)
    assert result.modified
    gm.graph.lint()
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x), **TOL[dtype])
    # The user's model keeps its reference layers.
    assert type(model.ref).__module__.startswith("ndlinear")


@pytest.mark.parametrize("transform_outer", [True, False])
def test_inlined_reference_has_no_transposes(transform_outer: bool) -> None:
    ndlinear = pytest.importorskip("ndlinear")
    model = nn.Sequential(ndlinear.NdLinear((8, 6, 4), (4, 6, 8), transform_outer)).double()
    x = torch.randn(5, 8, 6, 4, dtype=torch.float64)
    gm = traced(model, x)
    assert graph_op_counts(gm)["NdLinear"] == 1
    assert inline_ndlinear(gm).modified
    counts = graph_op_counts(gm)
    for op in ("transpose", "contiguous", "NdLinear", "Linear", "linear"):
        assert counts[op] == 0, (op, gm.code)
    assert counts["matmul"] + counts["bmm"] == 3
    assert isinstance(gm.get_submodule("0"), NdLinear)
    torch.testing.assert_close(gm(x), model(x), atol=1e-10, rtol=1e-10)


def test_inline_second_run_is_noop(nd_stack) -> None:
    x = torch.randn(2, 4, 6, 3)
    gm = traced(nd_stack(), x)
    assert inline_ndlinear(gm).modified
    code = gm.code
    again = inline_ndlinear(gm)
    assert not again.modified
    assert gm.code == code


def test_inline_without_ndlinear_is_unchanged(token_mlp) -> None:
    gm = traced(token_mlp(), torch.randn(2, 64))
    code = gm.code
    result = inline_ndlinear(gm)
    assert not result.modified
    assert gm.code == code


def test_inline_with_other_optimizer_is_exact(nd_stack) -> None:
    model = nd_stack(dtype=torch.float64)
    x = torch.randn(2, 4, 6, 3, dtype=torch.float64)
    gm = traced(model, x)
    assert inline_ndlinear(gm, optimizer="greedy").modified
    assert gm.get_submodule("ours").optimizer == "greedy"
    torch.testing.assert_close(gm(x), model(x), atol=1e-10, rtol=1e-10)


# -------------------------------------------------------- dead_code_elimination


class WithDeadBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _ = self.unused(x) * 2
        return self.used(x)


def test_dce_removes_dead_nodes_and_submodules() -> None:
    model = WithDeadBranch()
    x = torch.randn(2, 8)
    gm = traced(model, x)
    before = len(gm.graph.nodes)
    result = dead_code_elimination(gm)
    assert result.modified
    gm.graph.lint()
    assert len(gm.graph.nodes) == before - 2
    assert "unused" not in dict(gm.named_modules())
    assert not any(k.startswith("unused.") for k in gm.state_dict())
    torch.testing.assert_close(gm(x), model(x))
    assert hasattr(model, "unused")


def test_dce_second_run_is_noop() -> None:
    gm = traced(WithDeadBranch(), torch.randn(2, 8))
    assert dead_code_elimination(gm).modified
    code = gm.code
    assert not dead_code_elimination(gm).modified
    assert gm.code == code


def test_dce_on_clean_graph_is_unchanged(token_mlp) -> None:
    gm = traced(token_mlp(), torch.randn(2, 64))
    code = gm.code
    result = dead_code_elimination(gm)
    assert not result.modified
    assert gm.code == code
