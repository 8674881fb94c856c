"""Tests for ndcompile.convert: the three conversion modes, the report and the errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.fx as fx
from torch import nn

import ndcompile
from ndcompile import ConversionReport, NdCompileError, NdLinear, convert
from ndcompile.testing import assert_close_forward_backward


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, type]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = {name: type(m) for name, m in model.named_modules()}
    return state, types


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def kronecker_sum_weight(in_shape, out_shape, rank: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for _ in range(rank):
        term = torch.ones(1, 1, dtype=torch.float64)
        for d, h in zip(in_shape, out_shape, strict=True):
            term = torch.kron(term, torch.randn(h, d, generator=gen, dtype=torch.float64))
        total = total + term
    return total


# ------------------------------------------------------------ the user's model


@pytest.mark.parametrize(
    ("builder", "shape", "kwargs"),
    [
        ("token_mlp", (2, 5, 64), {"mode": "fresh"}),
        ("token_mlp", (2, 5, 64), {"mode": "factorize", "rank": 2}),
        ("image_head", (2, 4, 6, 3), {"mode": "fresh", "rank": 2}),
        ("nd_stack", (2, 4, 6, 3), {"mode": "exact"}),
    ],
)
def test_original_model_is_unchanged(request, builder, shape, kwargs) -> None:
    model = request.getfixturevalue(builder)()
    state, types = snapshot(model)
    params = {name: p for name, p in model.named_parameters()}
    convert(model, torch.randn(shape), **kwargs)
    after_state, after_types = snapshot(model)
    assert after_types == types
    assert after_state.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after_state[key], value), key
    assert all(p is params[n] for n, p in model.named_parameters())


def test_converted_model_shares_nothing_with_original(token_mlp) -> None:
    model = token_mlp()
    gm = convert(model, torch.randn(2, 64), mode="fresh", exclude=["fc2"], output="graph")
    assert isinstance(gm, fx.GraphModule)
    assert gm.get_submodule("fc2") is not model.fc2
    with torch.no_grad():
        gm.get_submodule("fc2").weight.add_(1.0)
    assert not torch.equal(gm.get_submodule("fc2").weight, model.fc2.weight)


# ---------------------------------------------------------------- state_dict


@pytest.mark.parametrize("mode_kwargs", [{"mode": "fresh"}, {"mode": "fresh", "rank": 3}])
def test_state_dict_loads_into_fresh_conversion(image_head, mode_kwargs) -> None:
    model = image_head()
    x = torch.randn(3, 4, 6, 3)
    first = convert(model, x, **mode_kwargs)
    second = convert(model, x, **mode_kwargs)
    assert {"fc.factors.0", "fc.factors.1", "fc.factors.2", "fc.bias"} <= set(first.state_dict())
    assert not torch.allclose(first(x), second(x))  # fresh layers: new random factors
    second.load_state_dict(first.state_dict(), strict=True)
    torch.testing.assert_close(second(x), first(x), atol=0, rtol=0)


# ---------------------------------------------------------------------- exact


def test_exact_mode_is_exact_forward_and_backward(nd_stack) -> None:
    model = nd_stack(dtype=torch.float64)
    x = torch.randn(3, 4, 6, 3, dtype=torch.float64)
    gm = convert(model, x, mode="exact")
    assert gm.report.mode == "exact"
    assert {e.name for e in gm.report.layers} == {"ref", "ours", "ref2"}
    assert all(e.status != "skipped" for e in gm.report.layers)
    assert gm.report.output_rel_error is not None and gm.report.output_rel_error < 1e-12
    param_map = {n: n for n, _ in model.ours.named_parameters(prefix="ours")}
    for layer in ("ref", "ref2"):
        for k in range(3):
            param_map[f"{layer}.align_layers.{k}.weight"] = f"{layer}.factors.{k}"
            param_map[f"{layer}.align_layers.{k}.bias"] = f"{layer}.mode_biases.{k}"
    compared = assert_close_forward_backward(
        model, gm, x, atol=1e-10, rtol=1e-10, param_map=param_map
    )
    assert len(compared) == n_params_tensors(model)
    # Other batch sizes work too.
    x2 = torch.randn(7, 4, 6, 3, dtype=torch.float64)
    torch.testing.assert_close(gm(x2), model(x2), atol=1e-10, rtol=1e-10)


def n_params_tensors(module: nn.Module) -> int:
    return len(list(module.parameters()))


def test_exact_mode_keeps_dense_linears(token_mlp) -> None:
    model = token_mlp(dtype=torch.float64)
    x = torch.randn(2, 64, dtype=torch.float64)
    gm = convert(model, x, mode="exact")
    assert isinstance(gm.get_submodule("fc1"), nn.Linear)
    torch.testing.assert_close(gm(x), model(x), atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------- fresh


def test_fresh_mode_shapes_and_training(token_mlp) -> None:
    model = token_mlp()
    x = torch.randn(4, 6, 64)
    gm = convert(model, x, mode="fresh")
    assert isinstance(gm.get_submodule("fc1"), NdLinear)
    assert gm(x).shape == model(x).shape
    target = torch.randn(4, 6, 64)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.mse_loss(gm(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in gm.parameters())


@pytest.mark.parametrize("shape", [(1, 64), (9, 64), (3, 7, 64), (2, 2, 3, 64), (64,)])
def test_fresh_mode_dynamic_leading_dims(token_mlp, shape) -> None:
    model = token_mlp(dtype=torch.float64)
    gm = convert(model, torch.randn(2, 5, 64, dtype=torch.float64), mode="fresh")
    x = torch.randn(shape, dtype=torch.float64)
    y = gm(x)
    assert y.shape == model(x).shape
    # Per position: no mixing across leading dims.
    if x.dim() > 1:
        torch.testing.assert_close(gm(x[..., :1, :]), y[..., :1, :], atol=1e-12, rtol=1e-12)


def test_fresh_mode_other_batch_sizes(image_head) -> None:
    model = image_head()
    gm = convert(model, torch.randn(5, 4, 6, 3))
    for batch in (1, 2, 17):
        assert gm(torch.randn(batch, 4, 6, 3)).shape == (batch, 10)


# ------------------------------------------------------------------ factorize


def test_factorize_recovers_kronecker_sums() -> None:
    model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 64)).double()
    shapes = {"0": ((8, 8), (8, 12)), "2": ((8, 12), (8, 8))}
    with torch.no_grad():
        for seed, (name, (ins, outs)) in enumerate(shapes.items()):
            model.get_submodule(name).weight.copy_(kronecker_sum_weight(ins, outs, 2, seed))
    x = torch.randn(5, 64, dtype=torch.float64)
    gm = convert(model, x, mode="factorize", rank=2, shapes=shapes)
    assert gm.report.output_rel_error < 1e-6
    for name in shapes:
        entry = gm.report.layer(name)
        assert entry.status == "converted" and entry.rank == 2
        assert entry.weight_rel_error < 1e-6
        layer = gm.get_submodule(name)
        torch.testing.assert_close(
            layer.dense_weight(), model.get_submodule(name).weight, atol=1e-8, rtol=1e-8
        )
    x2 = torch.randn(3, 64, dtype=torch.float64)
    err = float((gm(x2) - model(x2)).norm() / model(x2).norm())
    assert err < 1e-6


def test_factorize_with_tol_picks_enough_rank() -> None:
    model = nn.Sequential(nn.Linear(64, 64)).double()
    with torch.no_grad():
        model[0].weight.copy_(kronecker_sum_weight((8, 8), (8, 8), 3, seed=5))
    x = torch.randn(4, 64, dtype=torch.float64)
    gm = convert(model, x, mode="factorize", tol=1e-8)
    assert gm.report.layer("0").rank == 3
    assert gm.report.output_rel_error < 1e-6


# --------------------------------------------------------------------- report


def test_report_contents(image_head) -> None:
    model = image_head()
    gm = convert(model, torch.randn(2, 4, 6, 3), mode="fresh")
    report = gm.report
    assert isinstance(report, ConversionReport)
    text = str(report)
    for name, _ in model.named_modules():
        if isinstance(_, nn.Linear):
            assert name in text
    assert "skipped head" in text
    data = json.loads(report.to_json())
    assert data["mode"] == "fresh"
    assert [layer["name"] for layer in data["layers"]] == ["fc", "head"]
    assert data["converted"] == 1 and data["skipped"] == 1
    assert report.params_before == n_params(model)
    assert report.params_after == n_params(gm)
    for entry in report.layers:
        assert entry.params_before == n_params(model.get_submodule(entry.name))
        if entry.status == "converted":
            assert entry.params_after == n_params(gm.get_submodule(entry.name))
            assert entry.flops_after < entry.flops_before
        else:
            assert entry.reason
    assert report.layer("fc").in_shape == (4, 6, 3)
    with pytest.raises(KeyError, match="fc"):
        report.layer("nope")


def test_report_of_exact_mode(nd_stack) -> None:
    model = nd_stack()
    gm = convert(model, torch.randn(2, 4, 6, 3), mode="exact")
    text = str(gm.report)
    for name in ("ref", "ours", "ref2"):
        assert name in text
        entry = gm.report.layer(name)
        assert entry.params_before == n_params(model.get_submodule(name))
        assert entry.params_after == n_params(gm.get_submodule(name))
    assert gm.report.params_before == n_params(model) == gm.report.params_after == n_params(gm)
    json.loads(gm.report.to_json())


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "bogus"}, r"unknown mode 'bogus'; valid modes are: fresh, exact, factorize"),
        ({"optimizer": "fastest"}, r"unknown optimizer 'fastest'; valid optimizers are: auto"),
        ({"mode": "factorize"}, r"needs rank=R, tol=t or budget=b"),
        ({"mode": "fresh", "rank": 0}, r"rank must be >= 1"),
        ({"shapes": {"fc1": ((8, 9), (8, 12))}}, r"\[fc1\] shapes override"),
    ],
)
def test_bad_options_raise(token_mlp, kwargs, match: str) -> None:
    with pytest.raises(NdCompileError, match=match):
        convert(token_mlp(), torch.randn(2, 64), **kwargs)


def test_wrong_example_input_without_verify(token_mlp) -> None:
    with pytest.raises(NdCompileError, match=r"example input \[\(2, 63\)\]") as info:
        convert(token_mlp(), torch.randn(2, 63), verify=False)
    assert info.value.hint


def test_wrong_example_input(token_mlp) -> None:
    with pytest.raises(NdCompileError, match=r"example input"):
        convert(token_mlp(), torch.randn(2, 63))


def test_untraceable_model_raises() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(NdCompileError, match="cannot trace DataDependent") as info:
        convert(DataDependent(), torch.randn(2, 32), fallback=False, output="graph")
    assert info.value.layer == "DataDependent"


def test_bare_linear_model_is_refused_with_a_hint() -> None:
    with pytest.raises(NdCompileError, match="bare Linear") as info:
        convert(nn.Linear(64, 64), torch.randn(2, 64))
    assert "nn.Sequential" in (info.value.hint or "")


# ------------------------------------------------------------- torch.compile


def test_torch_compile_of_converted_model(token_mlp) -> None:
    model = token_mlp()
    x = torch.randn(2, 3, 64)
    gm = convert(model, x, mode="fresh")
    compiled = torch.compile(copy.deepcopy(gm), fullgraph=True, dynamic=False)
    with torch.no_grad():  # inference graph only: one inductor compile
        torch.testing.assert_close(compiled(x), gm(x), atol=1e-5, rtol=1e-5)


def test_public_api_exports() -> None:
    for name in ("convert", "NdLinear", "NdCompileError", "ConversionReport", "TensorNetwork"):
        assert hasattr(ndcompile, name)
    assert {"fresh", "exact", "factorize"} <= set(ndcompile.MODES)


# ------------------------------------------------------------------- budget


def test_factorize_budget_keeps_each_layer_within_budget() -> None:
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    x = torch.randn(32, 64)
    gm = convert(model, x, mode="factorize", budget=0.2)
    for entry in gm.report.converted:
        weight_params = entry.params_after - entry.out_features  # minus the full bias
        assert weight_params <= 0.2 * entry.in_features * entry.out_features
        assert entry.extra["chosen_form"]
        assert entry.output_rel_error is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": 0.2, "rank": 2}, "only one of"),
        ({"budget": 1.5}, r"budget must be in \(0, 1\]"),
    ],
)
def test_factorize_budget_errors(kwargs, match) -> None:
    with pytest.raises(NdCompileError, match=match):
        convert(nn.Sequential(nn.Linear(64, 64)), torch.randn(2, 64), mode="factorize", **kwargs)
