"""Tests of the backend's graph rewrites: mode-wise Linear chains (tiled on CPU), Linear chains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ndcompile.backends.dynamo import rewrite_dynamo_graph
from ndcompile.ir import tiled
from ndcompile.report import ConversionReport

from backend_helpers import NdNet, backend_compile, capture, tiled_calls

ndlinear = pytest.importorskip("ndlinear")


def _count(gm: torch.fx.GraphModule, *names: str) -> int:
    total = 0
    for node in gm.graph.nodes:
        target = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        total += node.op in ("call_method", "call_function") and target in names
    return total


def _grads(model: nn.Module, out: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out.square().sum(), list(model.parameters())))


# ------------------------------------------------------------------ the rewrites
def test_ndlinear_rewrite_removes_transposes() -> None:
    torch.manual_seed(0)
    model = NdNet().double()
    x = torch.randn(3, 4, 6, 3, dtype=torch.float64)
    ((gm, example_inputs),) = capture(model, x)
    assert _count(gm, "transpose") > 0
    new_gm, report, constants = rewrite_dynamo_graph(gm, example_inputs, {"passes": ["ndlinear"]})
    assert constants == []
    assert [e.name for e in report.converted] == ["nd1", "nd2"]
    assert _count(new_gm, "transpose", "contiguous", "linear") == 2  # fc1, fc2 remain
    assert _count(new_gm, "matmul", "bmm") >= 6
    assert _count(gm, "transpose") > 0, "the input graph must not be modified"
    new_gm.graph.lint()
    torch.testing.assert_close(new_gm(*example_inputs)[0], model(x), rtol=1e-10, atol=1e-12)
    _, report2, _ = rewrite_dynamo_graph(new_gm, example_inputs, {"passes": ["ndlinear"]})
    assert report2.converted == []


class SmallNdNet(nn.Module):
    """One reference NdLinear and a fusable Linear chain: a cheap model for inductor."""

    def __init__(self) -> None:
        super().__init__()
        self.nd = ndlinear.NdLinear((4, 6), (5, 2))
        self.fc1 = nn.Linear(10, 32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(torch.relu(self.nd(x)).flatten(1)))


@pytest.mark.parametrize(
    ("model_cls", "inductor", "converted"),
    [(NdNet, False, ["nd1", "nd2"]), (SmallNdNet, True, ["fc1+fc2", "nd"])],
)
def test_training_matches_eager_with_dynamic_batch(
    model_cls: type[nn.Module], inductor: bool, converted: list[str]
) -> None:
    torch.manual_seed(0)
    model = model_cls()
    reports: list[ConversionReport] = []
    compiled = backend_compile(model, reports, inductor=inductor)
    in_shape = (4, 6, 3) if model_cls is NdNet else (4, 6)
    for batch in (3, 5):
        x = torch.randn(batch, *in_shape)
        out, ref = compiled(x), model(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(_grads(model, out), _grads(model, ref), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(reports) == 2, "batch 5 must trigger one dynamic recompile"
    for report in reports:
        assert sorted(e.name for e in report.converted) == converted
    with torch.no_grad():
        x = torch.randn(7, *in_shape)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


class ModeMix(nn.Module):
    """Hand-written mode-wise maps on ``(B, 4, 6)`` in several layouts."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.w_last = nn.Linear(6, 5)
        self.w_first = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor):
        y = self.w_last(x)
        if self.variant == "two_modes":
            return self.w_first(y.transpose(1, 2)).transpose(1, 2)
        if self.variant == "permute":
            return self.w_first(y.permute(0, 2, 1)).permute(0, 2, 1).contiguous()
        if self.variant == "not_restored":
            return self.w_first(y.transpose(1, 2))
        if self.variant == "shared_intermediate":
            z = y.transpose(1, 2)
            return self.w_first(z).transpose(1, 2), z
        if self.variant == "one_mode":
            return self.w_first(x.transpose(1, 2)).transpose(1, 2)
        raise AssertionError(self.variant)


@pytest.mark.parametrize(
    ("variant", "rewrites"),
    [
        ("two_modes", 1),
        ("permute", 1),
        ("not_restored", 0),
        ("shared_intermediate", 0),
        ("one_mode", 0),
    ],
)
def test_mode_chain_patterns(variant: str, rewrites: int) -> None:
    torch.manual_seed(0)
    model = ModeMix(variant)
    reports: list[ConversionReport] = []
    compiled = backend_compile(model, reports, inductor=False)
    x = torch.randn(2, 4, 6)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    inlined = [e for r in reports for e in r.layers if e.status == "inlined"]
    assert len(inlined) == rewrites
    if rewrites:
        assert inlined[0].extra["mode_order"] == [1, 0]
        assert inlined[0].in_shape == (4, 6) and inlined[0].out_shape == (3, 5)


class Chain(nn.Module):
    """Linear maps without a nonlinearity between them."""

    def __init__(self, hidden: int, reshape: bool) -> None:
        super().__init__()
        self.reshape = reshape
        self.a = nn.Linear(32, hidden)
        self.b = nn.Linear(hidden, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if self.reshape:
            y = y.reshape(-1, 4, y.shape[-1]).flatten(0, 1)
        return self.b(y)


@pytest.mark.parametrize(
    ("hidden", "reshape", "fused"),
    [(64, False, True), (64, True, True), (2, False, False)],
)
def test_linear_chain_fusion(hidden: int, reshape: bool, fused: bool) -> None:
    torch.manual_seed(0)
    model = Chain(hidden, reshape).double()
    x = torch.randn(16, 4, 32, dtype=torch.float64)
    ((gm, example_inputs),) = capture(model, x)
    new_gm, report, _ = rewrite_dynamo_graph(gm, example_inputs, {"inductor": False})
    assert _count(new_gm, "linear") == (1 if fused else 2)
    (entry,) = report.layers
    assert entry.status == ("fused" if fused else "skipped")
    assert entry.flops_after < entry.flops_before or not fused
    torch.testing.assert_close(new_gm(*example_inputs)[0], model(x), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ CPU tiling
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mode_chain_runs_tiled_on_cpu(dtype: torch.dtype, monkeypatch) -> None:
    monkeypatch.setattr(tiled, "choose_tile", lambda *args, **kwargs: 16)
    torch.manual_seed(0)
    model = ndlinear.NdLinear((4, 6, 3), (5, 2, 3)).to(dtype)
    x = torch.randn(16 * tiled.AUTO_WHOLE_TILES + 40, 4, 6, 3, dtype=dtype)
    (gm, inputs), *_ = capture(model, x)
    work, report, _ = rewrite_dynamo_graph(gm, inputs)
    assert report.layers[0].status == "inlined" and tiled_calls(work) == 1
    compiled = backend_compile(model, inductor=False)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = compiled(xc), model(xe)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-11, "atol": 1e-11}
    torch.testing.assert_close(out, ref, **tol)
    params = list(model.parameters())
    got = torch.autograd.grad(out.square().sum(), [xc, *params])
    want = torch.autograd.grad(ref.square().sum(), [xe, *params])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)
