"""Tests for ndcompile.adapters (NdLinear-LoRA) and convert(mode="adapter")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
from torch import nn

import ndcompile
from ndcompile.compress.adapter_linear import NdAdapterLinear
from ndcompile.compress.adapter_sites import LORA_COMPARISON_RANKS, lora_params
from ndcompile.compress.adapters import (
    adapter_state_dict,
    count_trainable,
    freeze_all_but_adapters,
    load_adapter_state_dict,
    merge_adapters,
)
from ndcompile.errors import NdCompileError

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny layers: one thread avoids oversubscription on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ImageMLP(nn.Module):
    """Flatten (8, 8) images, two hidden layers; the head is too small to adapt."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x.flatten(1)))
        return self.head(torch.relu(self.fc2(h)))


class TokenMLP(nn.Module):
    """A per-token MLP block with a residual, on (B, T, 48)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(48, 144)
        self.down = nn.Linear(144, 48, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


CASES = [
    pytest.param(ImageMLP, (5, 8, 8), ["fc1", "fc2"], id="image-mlp"),
    pytest.param(TokenMLP, (3, 7, 48), ["up", "down"], id="token-mlp"),
]


def make(model_cls: type[nn.Module], shape: tuple[int, ...], seed: int = 0):
    torch.manual_seed(seed)
    model = model_cls().to(F64)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    return model, x


def randomize_adapters(model: nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NdAdapterLinear):
                for f in m.adapter.factors:
                    f.copy_(torch.randn(f.shape, generator=gen, dtype=f.dtype) * 0.3)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(a))


# ------------------------------------------------------------------- convert(mode="adapter")


@pytest.mark.parametrize(("model_cls", "shape", "adapted"), CASES)
@pytest.mark.parametrize("rank", [1, 3])
def test_zero_init_keeps_the_model_unchanged(model_cls, shape, adapted, rank):
    model, x = make(model_cls, shape)
    gm = ndcompile.convert(model, x, mode="adapter", rank=rank, alpha=2.0)
    assert rel(model(x), gm(x)) <= 1e-12
    assert gm.report.output_rel_error is not None and gm.report.output_rel_error <= 1e-12
    for name in adapted:
        layer = gm.get_submodule(name)
        assert isinstance(layer, NdAdapterLinear)
        assert layer.rank == rank
        assert torch.count_nonzero(layer.delta_weight()) == 0


@pytest.mark.parametrize(("model_cls", "shape", "adapted"), CASES)
def test_only_adapter_parameters_are_trainable(model_cls, shape, adapted):
    model, x = make(model_cls, shape)
    gm = ndcompile.convert(model, x, mode="adapter", rank=2)
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    expected = {f"{name}.adapter.factors.{k}" for name in adapted for k in range(2)}
    assert trainable == expected
    assert count_trainable(gm) == sum(gm.report.layer(n).params_after for n in adapted)
    # the user's model keeps its flags and weights
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, NdAdapterLinear) for m in model.modules())


@pytest.mark.parametrize("compute", ["factored", "dense"])
@pytest.mark.parametrize(("model_cls", "shape", "adapted"), CASES)
def test_training_changes_only_adapter_parameters(model_cls, shape, adapted, compute):
    model, x = make(model_cls, shape)
    gm = ndcompile.convert(model, x, mode="adapter", rank=2)
    for name in adapted:
        gm.get_submodule(name).compute = compute
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    target = torch.randn_like(gm(x))
    for _ in range(3):
        opt.zero_grad()
        loss = (gm(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
    for name, p in gm.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (".adapter." in name), name
    assert rel(model(x), gm(x)) > 1e-6


def test_freeze_all_but_adapters():
    model, x = make(ImageMLP, (4, 8, 8))
    gm = ndcompile.convert(model, x, mode="adapter", include=["fc1"])
    gm.requires_grad_(True)
    assert freeze_all_but_adapters(gm) is gm
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == {
        "fc1.adapter.factors.0",
        "fc1.adapter.factors.1",
    }


def test_include_selects_layers():
    model, x = make(ImageMLP, (4, 8, 8))
    gm = ndcompile.convert(model, x, mode="adapter", include=["fc2"])
    assert isinstance(gm.fc2, NdAdapterLinear)
    assert type(gm.fc1) is nn.Linear and not gm.fc1.weight.requires_grad
    assert {e.name: e.status for e in gm.report.layers} == {
        "fc1": "skipped",
        "fc2": "converted",
        "head": "skipped",
    }
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == {
        "fc2.adapter.factors.0",
        "fc2.adapter.factors.1",
    }


def test_shapes_override_sets_adapter_modes():
    model, x = make(ImageMLP, (4, 8, 8))
    gm = ndcompile.convert(
        model, x, mode="adapter", shapes={"fc2": ((4, 4, 6), (4, 4, 4)), "head": ((8, 8), (2, 5))}
    )
    assert (gm.fc2.in_shape, gm.fc2.out_shape) == ((4, 4, 6), (4, 4, 4))
    assert (gm.head.in_shape, gm.head.out_shape) == ((8, 8), (2, 5))
    assert gm.report.layer("fc1").in_shape == (8, 8)  # from the graph's flatten
    assert rel(model(x), gm(x)) <= 1e-12


def test_report_has_lora_comparison():
    model, x = make(ImageMLP, (4, 8, 8))
    gm = ndcompile.convert(model, x, mode="adapter", rank=3)
    entry = gm.report.layer("fc1")  # Linear(64, 96): modes (8, 8) -> (8, 12)
    assert entry.status == "converted" and entry.rank == 3
    assert entry.params_before == 64 * 96 + 96
    assert entry.params_after == 3 * (8 * 8 + 12 * 8)
    for r in LORA_COMPARISON_RANKS:
        assert entry.extra[f"lora_params_r{r}"] == r * (64 + 96)
    assert entry.extra["lora_rank_equal_params"] == pytest.approx(480 / 160, abs=1e-3)
    assert entry.flops_after > entry.flops_before
    assert "lora_params_r16" in gm.report.to_json()


def test_nothing_selected_leaves_every_layer_skipped_and_frozen():
    model, x = make(ImageMLP, (4, 8, 8))
    gm = ndcompile.convert(model, x, mode="adapter", include=["nothing*"])
    assert gm.report.converted == []
    assert all(e.reason for e in gm.report.skipped)
    assert count_trainable(gm) == 0
    assert rel(model(x), gm(x)) <= 1e-12


def test_zero_init_false_starts_with_an_update():
    model, x = make(ImageMLP, (4, 8, 8))
    gm = ndcompile.convert(model, x, mode="adapter", zero_init=False)
    assert torch.count_nonzero(gm.fc1.delta_weight()) > 0
    assert gm.report.output_rel_error is not None and gm.report.output_rel_error > 1e-6


# --------------------------------------------------------------------------- NdAdapterLinear


@pytest.mark.parametrize(
    ("features", "modes"),
    [
        ((64, 256), ((8, 8), (16, 16))),
        ((96, 40), ((8, 12), (5, 8))),
        ((36, 12), ((6, 6), (3, 4))),
    ],
)
def test_default_modes_are_the_balanced_pair(features, modes):
    layer = NdAdapterLinear(nn.Linear(*features))
    assert (layer.in_shape, layer.out_shape) == modes


def test_prime_features_need_explicit_modes():
    with pytest.raises(NdCompileError, match="cannot be split"):
        NdAdapterLinear(nn.Linear(13, 16))
    with pytest.raises(NdCompileError, match="do not match"):
        NdAdapterLinear(nn.Linear(16, 16), (4, 4), (2, 4))


@pytest.mark.parametrize("compute", ["factored", "dense"])
@pytest.mark.parametrize("alpha", [0.5, 3.0])
@pytest.mark.parametrize(
    ("in_shape", "out_shape", "rank"), [((4, 6), (3, 5), 2), ((2, 3, 4), (3, 2, 2), 3)]
)
def test_forward_equals_dense_base_plus_scaled_kronecker(alpha, in_shape, out_shape, rank, compute):
    torch.manual_seed(0)
    base = nn.Linear(math.prod(in_shape), math.prod(out_shape)).to(F64)
    layer = NdAdapterLinear(base, in_shape, out_shape, rank=rank, alpha=alpha, compute=compute)
    randomize_adapters(layer)
    factors = [f.detach() for f in layer.adapter.factors]
    kron = sum(_kron_all([f[r] for f in factors]) for r in range(rank))
    x = torch.randn(2, 3, base.in_features, dtype=F64)
    expected = x @ (base.weight.detach() + alpha * kron).T + base.bias.detach()
    assert rel(expected, layer(x)) <= 1e-12
    assert rel(alpha * kron, layer.delta_weight()) <= 1e-12


def _kron_all(mats: list[torch.Tensor]) -> torch.Tensor:
    out = mats[0]
    for m in mats[1:]:
        out = torch.kron(out, m)
    return out


def test_compute_modes_agree_in_outputs_and_gradients():
    torch.manual_seed(0)
    layer = NdAdapterLinear(nn.Linear(24, 30), (2, 3, 4), (3, 5, 2), rank=2, alpha=1.5).to(F64)
    randomize_adapters(layer)
    x = torch.randn(4, 5, 24, dtype=F64, requires_grad=True)
    results = []
    for compute in ("factored", "dense"):
        layer.compute = compute
        layer.zero_grad()
        x.grad = None
        out = layer(x)
        out.pow(2).sum().backward()
        grads = [f.grad.clone() for f in layer.adapter.factors]
        results.append((out.detach(), x.grad.clone(), grads))
    (y1, gx1, gf1), (y2, gx2, gf2) = results
    assert rel(y1, y2) <= 1e-12 and rel(gx1, gx2) <= 1e-12
    for a, b in zip(gf1, gf2, strict=True):
        assert rel(a, b) <= 1e-12
    assert layer.weight.grad is None


@pytest.mark.parametrize(
    ("in_shape", "out_shape", "rank", "rows", "expected"),
    [
        ((24, 32), (48, 64), 1, 64, "factored"),  # big layer, few rows: contract x
        ((8, 8), (16, 16), 16, 1024, "dense"),  # high rank: forming ΔW is cheaper
        ((8, 8, 8), (8, 8, 8), 16, 1024, "dense"),
        ((8, 8, 8), (8, 8, 8), 1, 1024, "factored"),
    ],
)
def test_auto_compute_picks_the_cheaper_estimate(in_shape, out_shape, rank, rows, expected):
    base = nn.Linear(math.prod(in_shape), math.prod(out_shape), bias=False)
    layer = NdAdapterLinear(base, in_shape, out_shape, rank=rank, plan_batch=rows)
    costs = layer.cost_estimates()
    assert layer.choose_compute() == expected == min(costs, key=costs.get)
    layer.compute = "factored" if expected == "dense" else "dense"
    assert layer.choose_compute() == layer.compute


def test_unknown_compute_mode_raises():
    with pytest.raises(NdCompileError, match="valid modes are: auto, factored, dense"):
        NdAdapterLinear(nn.Linear(16, 16), compute="fast")


def test_adapter_copies_the_base_and_leaves_it_alone():
    base = nn.Linear(16, 16)
    layer = NdAdapterLinear(base)
    assert base.weight.requires_grad and not layer.weight.requires_grad
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert not torch.equal(layer.weight, base.weight)


@pytest.mark.parametrize("compute", ["factored", "dense"])
def test_adapter_layer_traces_with_fx(compute):
    torch.manual_seed(0)
    layer = NdAdapterLinear(nn.Linear(24, 20), rank=2, compute=compute).to(F64)
    randomize_adapters(layer)
    traced = fx.symbolic_trace(layer)
    x = torch.randn(3, 24, dtype=F64)
    assert rel(layer(x), traced(x)) <= 1e-12


# --------------------------------------------------------------------------- merge / state dict


@pytest.mark.parametrize(("model_cls", "shape", "adapted"), CASES)
def test_merge_adapters_gives_plain_linears_with_the_same_output(model_cls, shape, adapted):
    model, x = make(model_cls, shape)
    gm = ndcompile.convert(model, x, mode="adapter", rank=2, alpha=0.7)
    randomize_adapters(gm)
    merged = merge_adapters(gm)
    assert rel(gm(x), merged(x)) <= 1e-12
    assert rel(model(x), merged(x)) > 1e-6  # the update is really merged in
    for name in adapted:
        assert type(merged.get_submodule(name)) is nn.Linear
        assert isinstance(gm.get_submodule(name), NdAdapterLinear)  # input untouched
    assert not any(".adapter." in key for key in merged.state_dict())


def test_merge_without_adapters_raises():
    with pytest.raises(NdCompileError, match="no NdAdapterLinear"):
        merge_adapters(ImageMLP())


def test_adapter_state_dict_round_trip():
    model, x = make(ImageMLP, (4, 8, 8))
    trained = ndcompile.convert(model, x, mode="adapter", rank=2)
    randomize_adapters(trained)
    sd = {k: v.clone() for k, v in adapter_state_dict(trained).items()}
    assert set(sd) == {f"{n}.adapter.factors.{k}" for n in ("fc1", "fc2") for k in range(2)}
    assert set(sd) < set(trained.state_dict())

    fresh = ndcompile.convert(model, x, mode="adapter", rank=2)
    assert rel(trained(x), fresh(x)) > 1e-6
    load_adapter_state_dict(fresh, sd)
    assert rel(trained(x), fresh(x)) <= 1e-12
    for key, value in adapter_state_dict(fresh).items():
        assert torch.equal(value, sd[key])


def test_load_adapter_state_dict_is_strict():
    model, x = make(ImageMLP, (4, 8, 8))
    gm = ndcompile.convert(model, x, mode="adapter", rank=2)
    sd = adapter_state_dict(gm)
    missing = {k: v for k, v in sd.items() if not k.startswith("fc2.")}
    with pytest.raises(NdCompileError, match=r"missing \['fc2\.adapter\.factors\.0'"):
        load_adapter_state_dict(gm, missing)
    extra = {**sd, "fc3.adapter.factors.0": torch.zeros(1)}
    with pytest.raises(NdCompileError, match="unexpected"):
        load_adapter_state_dict(gm, extra)
    other_rank = adapter_state_dict(ndcompile.convert(model, x, mode="adapter", rank=3))
    with pytest.raises(NdCompileError, match=r"shape \(3, 8, 8\).*expects \(2, 8, 8\)"):
        load_adapter_state_dict(gm, other_rank)


@pytest.mark.parametrize(("n_in", "n_out", "r"), [(64, 256, 1), (768, 3072, 8), (10, 3, 16)])
def test_lora_params(n_in, n_out, r):
    a, b = nn.Linear(n_in, r, bias=False), nn.Linear(r, n_out, bias=False)
    assert lora_params(n_in, n_out, r) == a.weight.numel() + b.weight.numel()


@pytest.mark.parametrize("compute", ["factored", "dense"])
def test_adapter_model_exports(compute):
    model, x = make(TokenMLP, (2, 3, 48))
    gm = ndcompile.convert(model, x, mode="adapter", rank=2)
    randomize_adapters(gm)
    for name in ("up", "down"):
        gm.get_submodule(name).compute = compute
    exported = torch.export.export(gm, (x,))
    assert rel(gm(x), exported.module()(x)) <= 1e-12
