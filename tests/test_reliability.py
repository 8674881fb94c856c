"""Reliability of ``convert`` on real-world model shapes.

Covers untraceable models (partial conversion), awkward layers (no bias, tied
weights, attention, grad-mode changes, odd layouts and dtypes, the meta device,
unsplittable sizes, flatten idioms), dynamic leading dims, and round-trips
(state_dict files, torch.export, deepcopy, pickle, re-conversion).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.fx as fx
from torch import nn

from ndcompile import NdCompileError, NdLinear, convert
from ndcompile.errors import UntraceableError

from reliability_models import (
    ChannelsLastHead,
    DataDependent,
    FlattenHead,
    KeywordCall,
    NestedUntraceable,
    NoGradBranch,
    PlainDataDependent,
    PlainMLP,
    SharedEmbedding,
    TiedTwice,
    TokenMLP,
    WithAttention,
    dense_equivalent,
    isolate_ndcompile_env,
    linear_names,
    rel_error,
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in isolate_ndcompile_env(tmp_path).items():
        monkeypatch.setenv(key, value)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


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


# ---------------------------------------------------------------- dynamic shapes


def _leading_dim_cases() -> list:
    cases = []
    for example in [(2, 5), (4,)]:
        for lead in [(1,), (7,), (2, 1), (2, 3), (4, 11), (2, 3, 4), ()]:
            cases.append(pytest.param(example, lead, id=f"{example}->{lead}"))
    return cases


@pytest.mark.parametrize(("example", "lead"), _leading_dim_cases())
def test_converted_mlp_accepts_any_leading_dims(
    example: tuple[int, ...], lead: tuple[int, ...]
) -> None:
    model = TokenMLP()
    gm = convert(model, torch.randn(*example, 64), mode="fresh")
    x = torch.randn(*lead, 64)
    out = gm(x)
    assert out.shape == model(x).shape
    torch.testing.assert_close(out, dense_equivalent(model, gm)(x))
    if lead:  # positions along leading dims are never mixed
        torch.testing.assert_close(out[..., :1, :], gm(x[..., :1, :]))


def _nd_stack() -> nn.Module:
    return nn.Sequential(
        NdLinear((8, 8), (8, 8)), nn.ReLU(), NdLinear((8, 8), (4, 4), rank=2)
    ).double()


@pytest.mark.parametrize(
    ("example", "lead"),
    [
        pytest.param((3,), (3,), id="same"),
        pytest.param((3,), (5,), id="batch"),
        pytest.param((3,), (2, 5), id="extra-dim"),
        pytest.param((3,), (), id="unbatched"),
        pytest.param((2, 3), (2, 5), id="3d-example"),
        pytest.param((2, 3), (), id="3d-example-unbatched"),
    ],
)
def test_exact_mode_keeps_ndlinear_leading_dims(
    example: tuple[int, ...], lead: tuple[int, ...]
) -> None:
    model = _nd_stack()
    gm = convert(model, torch.randn(*example, 8, 8, dtype=torch.float64), mode="exact")
    x = torch.randn(*lead, 8, 8, dtype=torch.float64)
    out = gm(x)
    assert out.shape == model(x).shape
    assert rel_error(model(x), out) < 1e-12


@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param((4, 5, 3), id="4-5-3"),
        pytest.param((16, 24, 8), id="16-24-8"),
    ],
)
@pytest.mark.parametrize(
    "batch",
    [
        1,
        2,
    ],
)
def test_exact_mode_example_batch_size_does_not_matter(
    sizes: tuple[int, int, int], batch: int
) -> None:
    n, h, m = sizes
    net = nn.Sequential(nn.Linear(n, h, bias=False), nn.Linear(h, m, bias=False)).double()
    gm = convert(net, torch.randn(batch, n, dtype=torch.float64), mode="exact")
    assert any("fused linear region" in note for note in gm.report.notes)
    for b in (1, 3):
        x = torch.randn(b, n, dtype=torch.float64)
        assert rel_error(net(x), gm(x)) < 1e-12


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
