"""Tests of the ``torch.compile(backend="ndcompile")`` backend and its dynamo passes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ndcompile.backends.dynamo import (
    OPTION_KEYS,
    ndcompile_backend,
    parse_options,
    register_backend,
    rewrite_dynamo_graph,
)
from ndcompile.errors import NdCompileError
from ndcompile.ir import tiled
from ndcompile.report import ConversionReport

ndlinear = pytest.importorskip("ndlinear")

ROOT = Path(__file__).resolve().parents[1]
register_backend()


def _compile(model: nn.Module, reports: list | None = None, **options):
    """``torch.compile`` with the backend by name, collecting reports."""
    torch._dynamo.reset()
    if reports is not None:
        options["report"] = reports.append
    return torch.compile(model, backend="ndcompile", options=options)


def _capture(model: nn.Module, *inputs: torch.Tensor):
    """The dynamo graph(s) and example inputs of ``model``, via a recording backend."""
    graphs = []

    def record(gm, example_inputs, **kwargs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=record)(*inputs)
    return graphs


def _count(gm: torch.fx.GraphModule, *names: str) -> int:
    total = 0
    for node in gm.graph.nodes:
        target = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        total += node.op in ("call_method", "call_function") and target in names
    return total


def _grads(model: nn.Module, out: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out.square().sum(), list(model.parameters())))


class NdNet(nn.Module):
    """Reference NdLinear layers (both mode orders) and a chain of Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.nd1 = ndlinear.NdLinear((4, 6, 3), (5, 2, 3))
        self.nd2 = ndlinear.NdLinear((5, 2, 3), (3, 2, 4), transform_outer=False)
        self.fc1 = nn.Linear(24, 32)
        self.fc2 = nn.Linear(32, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.nd2(self.nd1(x)))
        return self.fc2(self.fc1(y.flatten(1)))


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


_COLD_CACHE_SCRIPT = """
import torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
config = GPT2Config(n_layer=1, n_embd=128, n_head=2, n_positions=32, vocab_size=512)
model = GPT2LMHeadModel(config).eval()
reports = []
options = {"factorize": {"rank": 4}, "report": reports.append}
compiled = torch.compile(model, backend="ndcompile", options=options)
eager = torch.compile(model, backend="ndcompile", options={**options, "inductor": False})
with torch.no_grad():
    for shape in ((2, 16), (2, 24)):
        ids = torch.randint(0, 512, shape)
        out = compiled(input_ids=ids, use_cache=False).logits
        ref = eager(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
assert any(e.status == "converted" for r in reports for e in r.layers)
print("cold cache ok")
"""


def test_factorize_gpt2_with_cold_inductor_cache(tmp_path: Path) -> None:
    """Factor constants get static shapes, so dynamo can build guards on a cache miss."""
    pytest.importorskip("transformers")
    run = subprocess.run(
        [sys.executable, "-c", _COLD_CACHE_SCRIPT],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")},
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "cold cache ok" in run.stdout


# ------------------------------------------------------------------ the rewrites
def test_ndlinear_rewrite_removes_transposes() -> None:
    torch.manual_seed(0)
    model = NdNet().double()
    x = torch.randn(3, 4, 6, 3, dtype=torch.float64)
    ((gm, example_inputs),) = _capture(model, x)
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
    compiled = _compile(model, reports, inductor=inductor)
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
    compiled = _compile(model, reports, inductor=False)
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
    ((gm, example_inputs),) = _capture(model, x)
    new_gm, report, _ = rewrite_dynamo_graph(gm, example_inputs, {"inductor": False})
    assert _count(new_gm, "linear") == (1 if fused else 2)
    (entry,) = report.layers
    assert entry.status == ("fused" if fused else "skipped")
    assert entry.flops_after < entry.flops_before or not fused
    torch.testing.assert_close(new_gm(*example_inputs)[0], model(x), rtol=1e-10, atol=1e-12)


# -------------------------------------------------------------- whole models
class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.nd = ndlinear.NdLinear((4, 6), (4, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.nd(x)
        if x.sum() > 0:  # data-dependent: a graph break
            return self.nd(y * 0.5)
        return -y


def test_graph_break_compiles_and_matches() -> None:
    torch.manual_seed(0)
    model = Branchy()
    reports: list[ConversionReport] = []
    compiled = _compile(model, reports, inductor=False)
    for sign in (1.0, -1.0):
        x = sign * torch.randn(3, 4, 6).abs()
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert len(reports) >= 2
    assert sum(len(r.converted) for r in reports) >= 2


class Block(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


@pytest.mark.parametrize("train", [True, False])
def test_transformer_block_matches_eager(train: bool) -> None:
    torch.manual_seed(0)
    model = Block().train(train)
    model.attn.dropout = 0.0
    compiled = _compile(model, inductor=False)
    x = torch.randn(2, 5, 16)
    with torch.set_grad_enabled(train):
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- factorize
def _kronecker_linear(rank: int) -> nn.Linear:
    """Linear(48, 64) whose weight is exactly a rank-``rank`` Kronecker sum over (6,8)->(8,8)."""
    gen = torch.Generator().manual_seed(1)
    weight = sum(
        torch.kron(torch.randn(8, 6, generator=gen), torch.randn(8, 8, generator=gen))
        for _ in range(rank)
    )
    layer = nn.Linear(48, 64)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


@pytest.mark.parametrize(
    ("factorize", "lead"), [({"rank": 2}, (6,)), ({"tol": 1e-4, "max_rank": 4}, (2, 3))]
)
def test_factorize_exact_kronecker_weights(factorize: dict, lead: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_kronecker_linear(2), nn.ReLU(), nn.Linear(64, 5)).eval()
    reports: list[ConversionReport] = []
    compiled = _compile(model, reports, inductor=False, factorize=factorize)
    for shape in (lead, tuple(n + 2 for n in lead)):  # the second is a dynamic recompile
        x = torch.randn(*shape, 48)
        with torch.no_grad():
            out, ref = compiled(x), model(x)
        assert torch.linalg.norm(out - ref) / torch.linalg.norm(ref) < 1e-4
    assert len(reports) == 2
    entry = reports[0].layer("0")
    assert entry.status == "converted" and entry.rank == 2
    assert entry.in_shape == (6, 8) and entry.out_shape == (8, 8)
    assert entry.weight_rel_error < 1e-5
    assert reports[0].layer("2").status == "skipped"  # 5 outputs: too small
    assert reports[0].params_after < reports[0].params_before


def test_factorize_with_inductor_and_random_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_kronecker_linear(1), nn.Tanh(), nn.Linear(64, 48)).eval()
    reports: list[ConversionReport] = []
    compiled = _compile(model, reports, factorize={"tol": 1e-3, "max_rank": 2})
    x = torch.randn(4, 48)
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    first, second = reports[0].layer("0"), reports[0].layer("2")
    assert first.status == "converted" and first.rank == 1
    assert second.status == "skipped" and "tol" in second.reason


def test_factorize_refuses_training() -> None:
    model = nn.Sequential(_kronecker_linear(1))
    compiled = _compile(model, inductor=False, factorize={"rank": 1})
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 48))
    inner = getattr(info.value, "inner_exception", info.value.__cause__)
    assert isinstance(inner, NdCompileError) and "no_grad" in str(inner)


def test_report_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = Branchy().nd
    compiled = _compile(model, inductor=False, report=True)
    with caplog.at_level(logging.INFO, logger="ndcompile"):
        compiled(torch.randn(2, 4, 6))
    assert "inlined" in caplog.text and "4x6 -> 4x6" in caplog.text


def test_backend_called_directly() -> None:
    torch.manual_seed(0)
    model = NdNet()
    x = torch.randn(2, 4, 6, 3)
    ((gm, example_inputs),) = _capture(model, x)
    run = ndcompile_backend(gm, example_inputs, options={"inductor": False})
    torch.testing.assert_close(run(*example_inputs)[0], model(x))
    with pytest.raises(NdCompileError, match="unexpected backend arguments"):
        ndcompile_backend(gm, example_inputs, colour="red")


def test_graph_without_matches_is_unchanged() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    ((gm, example_inputs),) = _capture(model, torch.randn(4, 8))
    new_gm, report, constants = rewrite_dynamo_graph(gm, example_inputs)
    assert report.converted == [] and constants == []
    assert "nothing to rewrite" in " ".join(report.notes)
    assert [n.format_node() for n in new_gm.graph.nodes] == [
        n.format_node() for n in gm.graph.nodes
    ]
    assert ndcompile_backend(gm, example_inputs, options={"inductor": False}) == gm.forward


def test_example_smoke() -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import compile_backend
    finally:
        sys.path.pop(0)
    results = compile_backend.main(
        batch=2,
        iters=2,
        warmup=1,
        in_shape=(4, 4, 2),
        hidden=(3, 4, 2),
        backends=("eager", "ndcompile"),
        options={"inductor": False},
        verbose=False,
    )
    assert set(results) == {"eager", "ndcompile"}
    assert all(r["max_abs_diff"] < 1e-4 for r in results.values())


# ------------------------------------------------------------------ CPU tiling
def _tiled_calls(gm: torch.fx.GraphModule) -> int:
    target = torch.ops.ndcompile.tiled_contract.default
    return sum(node.target is target for node in gm.graph.nodes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mode_chain_runs_tiled_on_cpu(dtype: torch.dtype, monkeypatch) -> None:
    monkeypatch.setattr(tiled, "choose_tile", lambda *args, **kwargs: 16)
    torch.manual_seed(0)
    model = ndlinear.NdLinear((4, 6, 3), (5, 2, 3)).to(dtype)
    x = torch.randn(100, 4, 6, 3, dtype=dtype)
    (gm, inputs), *_ = _capture(model, x)
    work, report, _ = rewrite_dynamo_graph(gm, inputs)
    assert report.layers[0].status == "inlined" and _tiled_calls(work) == 1
    compiled = _compile(model, inductor=False)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = compiled(xc), model(xe)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-11, "atol": 1e-11}
    torch.testing.assert_close(out, ref, **tol)
    params = list(model.parameters())
    got = torch.autograd.grad(out.square().sum(), [xc, *params])
    want = torch.autograd.grad(ref.square().sum(), [xe, *params])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)


def test_small_batches_and_factorize_tiling(monkeypatch) -> None:
    monkeypatch.setattr(tiled, "choose_tile", lambda *args, **kwargs: 16)
    model = ndlinear.NdLinear((4, 6, 3), (5, 2, 3))
    (gm, inputs), *_ = _capture(model, torch.randn(32, 4, 6, 3))  # two tiles: untiled
    assert _tiled_calls(rewrite_dynamo_graph(gm, inputs)[0]) == 0
    dense = nn.Sequential(_kronecker_linear(2)).eval()
    x = torch.randn(100, 48)
    with torch.no_grad():
        (gm, inputs), *_ = _capture(dense, x)
        work, report, _ = rewrite_dynamo_graph(gm, inputs, {"factorize": {"rank": 2}})
        assert report.layer("0").status == "converted" and _tiled_calls(work) == 1
        out = _compile(dense, inductor=False, factorize={"rank": 2})(x)
        ref = dense(x)
    assert torch.linalg.norm(out - ref) / torch.linalg.norm(ref) < 1e-4
