"""Reliability of ``convert`` on awkward layers, layouts, dtypes, devices and sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ndcompile import NdLinear, convert

from reliability_models import (
    ChannelsLastHead,
    FlattenHead,
    NoGradBranch,
    SharedEmbedding,
    TiedTwice,
    TokenMLP,
    WithAttention,
    dense_equivalent,
    linear_names,
    rel_error,
)

pytestmark = pytest.mark.usefixtures("isolated_cache")


# ---------------------------------------------------------------- awkward layers


@pytest.mark.parametrize("bias", [True, False])
def test_linear_without_bias(bias: bool) -> None:
    model = TokenMLP(bias=bias).double()
    x = torch.randn(3, 64, dtype=torch.float64)
    shapes = {"fc1": ((8, 8), (8, 12)), "fc2": ((8, 12), (8, 8))}
    gm = convert(model, x, mode="factorize", rank=64, shapes=shapes, skip_larger=False)
    assert ("fc1.bias" in gm.state_dict()) is bias
    assert (gm.get_submodule("fc1").bias is not None) is bias
    assert rel_error(model(x), gm(x)) < 1e-9
    fresh = convert(model, x, mode="fresh")
    assert (fresh.get_submodule("fc2").bias is not None) is bias
    assert rel_error(dense_equivalent(model, fresh)(x), fresh(x)) < 1e-12


def test_linear_called_twice_becomes_one_ndlinear() -> None:
    model = TiedTwice().double()
    x = torch.randn(5, 64, dtype=torch.float64)
    gm = convert(model, x, mode="fresh", output="graph")
    layer = gm.get_submodule("fc")
    assert isinstance(layer, NdLinear)
    assert [e.name for e in gm.report.layers] == ["fc"]
    assert sum(isinstance(m, NdLinear) for m in gm.modules()) == 1
    n_params = sum(p.numel() for p in gm.parameters())
    assert n_params == layer.num_parameters() == gm.report.params_after
    reads = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert reads.count("fc.bias") == 2 and all(t.startswith("fc.") for t in reads)
    dense = layer.to_dense()
    torch.testing.assert_close(gm(x), dense(torch.relu(dense(x))), rtol=1e-12, atol=1e-12)
    gm(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_weight_shared_with_embedding_is_skipped() -> None:
    model = SharedEmbedding()
    tokens = torch.randint(0, 96, (3, 7))
    gm = convert(model, tokens, mode="fresh")
    entry = gm.report.layer("lm_head")
    assert entry.status == "skipped" and "emb.weight" in (entry.reason or "")
    assert "tied" in (entry.reason or "")
    assert gm.report.layer("mix").status == "converted"
    assert gm.get_submodule("lm_head").weight is gm.get_submodule("emb").weight
    assert gm(tokens).shape == (3, 7, 96)
    torch.testing.assert_close(gm(tokens), dense_equivalent(model, gm)(tokens))


def test_multihead_attention_model_converts_and_runs() -> None:
    model = WithAttention()
    x = torch.randn(2, 5, 64)
    gm = convert(model, x, mode="fresh", output="graph")
    assert gm.report.layer("fc").status == "converted"
    out_proj = gm.report.layer("attn.out_proj")
    assert out_proj.status == "skipped" and "'attn'" in (out_proj.reason or "")
    assert {e.name for e in gm.report.layers} == linear_names(model)
    assert isinstance(gm.get_submodule("attn"), nn.MultiheadAttention)
    torch.testing.assert_close(gm.get_submodule("attn").in_proj_weight, model.attn.in_proj_weight)
    for shape in [(2, 5, 64), (3, 9, 64)]:
        inp = torch.randn(shape)
        torch.testing.assert_close(gm(inp), dense_equivalent(model, gm)(inp))


@pytest.mark.parametrize("mode", ["fresh", "exact"])
def test_no_grad_inside_forward_is_respected(mode: str) -> None:
    model = NoGradBranch()
    x = torch.randn(3, 64)
    model(x).sum().backward()
    assert model.frozen.weight.grad is None
    result = convert(model, x, mode=mode)
    result(x).sum().backward()
    frozen = [p for n, p in result.named_parameters() if n.startswith("frozen.")]
    assert frozen and all(p.grad is None for p in frozen)


LAYOUTS = {
    "transposed 2-D": (TokenMLP, lambda: torch.randn(64, 3).t()),
    "transposed 3-D": (TokenMLP, lambda: torch.randn(5, 7, 64).transpose(0, 1)),
    "sliced": (TokenMLP, lambda: torch.randn(4, 128)[:, ::2]),
    "channels_last": (
        ChannelsLastHead,
        lambda: torch.randn(2, 3, 4, 6).to(memory_format=torch.channels_last),
    ),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_non_contiguous_and_channels_last_inputs(case: str) -> None:
    cls, make_input = LAYOUTS[case]
    model = cls()
    x = make_input()
    assert not x.is_contiguous()
    gm = convert(model, x, mode="fresh")
    assert gm.report.converted
    out = gm(x)
    torch.testing.assert_close(out, gm(x.contiguous()))
    torch.testing.assert_close(out, dense_equivalent(model, gm)(x))


DTYPE_TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 5e-2,
}


@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCE), ids=str)
def test_low_and_high_precision_models(dtype: torch.dtype) -> None:
    model = TokenMLP().to(dtype)
    x = torch.randn(4, 64, dtype=dtype)
    gm = convert(model, x, mode="fresh")
    assert all(p.dtype == dtype for p in gm.parameters())
    out = gm(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_error(dense_equivalent(model, gm)(x), out) < DTYPE_TOLERANCE[dtype]
    shapes = {"fc1": ((8, 8), (8, 12)), "fc2": ((8, 12), (8, 8))}
    fact = convert(model, x, mode="factorize", rank=64, shapes=shapes, skip_larger=False)
    assert rel_error(model(x), fact(x)) < 10 * DTYPE_TOLERANCE[dtype]
    assert fact.report.output_rel_error is not None


def test_meta_device_model_converts_without_allocating() -> None:
    with torch.device("meta"):
        model = TokenMLP()
    x = torch.randn(3, 64, device="meta")
    gm = convert(model, x, mode="fresh")
    assert {e.name for e in gm.report.converted} == {"fc1", "fc2"}
    assert all(p.is_meta for p in gm.parameters())
    out = gm(x)
    assert out.is_meta and out.shape == (3, 64)
    assert gm.report.params_after < gm.report.params_before


class Unsplittable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.prime_in = nn.Linear(97, 64)
        self.prime_out = nn.Linear(64, 97)
        self.tiny_out = nn.Linear(97, 8)
        self.tiny_in = nn.Linear(8, 64)
        self.ok = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tiny_out(self.prime_out(self.prime_in(x)))
        return self.ok(self.tiny_in(y))


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        ("prime_in", "in_features=97 cannot be split"),
        ("prime_out", "out_features=97 cannot be split"),
        ("tiny_out", "too small to factorize"),
        ("tiny_in", "too small to factorize"),
        ("ok", None),
    ],
)
def test_prime_and_tiny_sizes_are_skipped_with_reason(layer: str, reason: str | None) -> None:
    model = Unsplittable()
    x = torch.randn(2, 97)
    gm = convert(model, x, mode="fresh")
    entry = gm.report.layer(layer)
    if reason is None:
        assert entry.status == "converted"
    else:
        assert entry.status == "skipped" and reason in (entry.reason or ""), entry.reason
        assert type(gm.get_submodule(layer)) is nn.Linear
    torch.testing.assert_close(gm(x), dense_equivalent(model, gm)(x))


@pytest.mark.parametrize("kind", FlattenHead.KINDS)
def test_modes_read_from_flatten_idioms(kind: str) -> None:
    model = FlattenHead(kind)
    x = torch.randn(3, 4, 6, 8)
    gm = convert(model, x, mode="fresh")
    entry = gm.report.layer("fc")
    assert entry.status == "converted"
    assert entry.in_shape == (4, 6, 8) and entry.mode_source == "graph"
    for batch in (1, 5):
        inp = torch.randn(batch, 4, 6, 8)
        torch.testing.assert_close(gm(inp), dense_equivalent(model, gm)(inp))
