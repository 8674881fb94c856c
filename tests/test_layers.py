"""Tests for ndcompile.layers.ndlinear.NdLinear against its dense weight and the reference layer."""

from __future__ import annotations

import copy
import io
import itertools
import pickle

import pytest
import torch
from torch import nn

from ndcompile.errors import NdCompileError
from ndcompile.ir.network import NetworkPlan
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.testing import assert_close_forward_backward

SHAPES = {
    2: ((4, 5), (3, 6)),
    3: ((4, 5, 3), (3, 2, 4)),
    4: ((2, 3, 4, 2), (3, 2, 2, 3)),
}
TOL = {torch.float32: {"atol": 2e-5, "rtol": 1e-4}, torch.float64: {"atol": 1e-10, "rtol": 1e-10}}


class DenseForward(nn.Module):
    """Applies a layer through its dense weight ``sum_r kron(...)`` (autograd through kron)."""

    def __init__(self, layer: NdLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.layer.in_shape)
        flat = x.flatten(-n)
        y = nn.functional.linear(flat, self.layer.dense_weight(), self.layer.full_bias())
        return y.unflatten(-1, self.layer.out_shape)


def layer_cases() -> list:
    cases = []
    for n_modes, rank, bias, lead in itertools.product(
        (2, 3, 4), (1, 3), (True, False, "modes"), (1, 2, 3)
    ):
        if bias == "modes" and rank != 1:
            continue
        case_id = f"m{n_modes}-r{rank}-b{bias}-lead{lead}"
        cases.append(pytest.param(n_modes, rank, bias, lead, id=case_id))
    return cases


def make_input(lead: int, in_shape, dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    batch = (3, 2, 2)[:lead]
    return torch.randn(*batch, *in_shape, generator=gen, dtype=torch.float64).to(dtype)


def perturb_biases(layer: NdLinear) -> None:
    """Make biases clearly non-zero so bias errors cannot hide."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "bias" in name:
                p.normal_()


# ------------------------------------------------------------------ dense weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("n_modes", "rank", "bias", "lead"), layer_cases())
def test_matches_dense_forward_backward(n_modes, rank, bias, lead, dtype) -> None:
    in_shape, out_shape = SHAPES[n_modes]
    layer = NdLinear(in_shape, out_shape, rank=rank, bias=bias, dtype=dtype)
    perturb_biases(layer)
    x = make_input(lead, in_shape, dtype)

    y = layer(x)
    assert y.shape == (*x.shape[:lead], *out_shape)
    assert y.dtype == dtype
    dense = layer.to_dense()
    assert isinstance(dense, nn.Linear)
    assert (dense.bias is None) == (bias is False)
    flat = dense(x.flatten(-n_modes)).unflatten(-1, out_shape)
    torch.testing.assert_close(y, flat, **TOL[dtype])

    compared = assert_close_forward_backward(
        DenseForward(layer),
        layer,
        x,
        param_map={f"layer.{n}": n for n, _ in layer.named_parameters()},
        **TOL[dtype],
    )
    assert len(compared) == len(list(layer.parameters()))


def test_dense_weight_is_kronecker_sum() -> None:
    layer = NdLinear((2, 3, 4), (3, 2, 2), rank=2, dtype=torch.float64)
    f = [p.detach() for p in layer.factors]
    expected = sum(torch.kron(torch.kron(f[0][r], f[1][r]), f[2][r]) for r in range(2))
    torch.testing.assert_close(layer.dense_weight(), expected)
    assert layer.dense_weight().shape == (layer.out_features, layer.in_features) == (12, 24)


@pytest.mark.parametrize(
    ("rank", "bias", "expected"),
    [(1, True, 4 * 3 + 5 * 6 + 18), (3, False, 3 * (4 * 3 + 5 * 6)), (1, "modes", 42 + 3 + 6)],
)
def test_parameter_count(rank, bias, expected) -> None:
    layer = NdLinear((4, 5), (3, 6), rank=rank, bias=bias)
    assert layer.num_parameters() == expected == sum(p.numel() for p in layer.parameters())
    assert [tuple(f.shape) for f in layer.factors] == [(rank, 3, 4), (rank, 6, 5)]


@pytest.mark.parametrize("rank", [1, 4])
def test_init_matches_dense_linear_variance(rank: int) -> None:
    layer = NdLinear((32, 32), (32, 32), rank=rank)
    target = 1.0 / (3.0 * layer.in_features)  # nn.Linear: U(-1/sqrt(n), 1/sqrt(n))
    var = float(layer.dense_weight().detach().double().var())
    assert 0.7 * target < var < 1.3 * target


# -------------------------------------------------------------- reference layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("transform_outer", [True, False])
@pytest.mark.parametrize("n_modes", [2, 3, 4])
def test_from_reference_forward_backward(n_modes, transform_outer, dtype) -> None:
    ndlinear = pytest.importorskip("ndlinear")
    in_shape, out_shape = SHAPES[n_modes]
    ref = ndlinear.NdLinear(in_shape, out_shape, transform_outer=transform_outer).to(dtype)
    with torch.no_grad():
        for m in ref.align_layers:
            m.bias.normal_()
    ours = NdLinear.from_reference(ref)
    assert ours.bias_kind == "modes"
    assert ours.factors[0].dtype == dtype
    param_map = {}
    for k in range(n_modes):
        param_map[f"align_layers.{k}.weight"] = f"factors.{k}"
        param_map[f"align_layers.{k}.bias"] = f"mode_biases.{k}"
    x = make_input(1, in_shape, dtype, seed=n_modes)
    assert_close_forward_backward(ref, ours, x, param_map=param_map, **TOL[dtype])
    # And the imported layer's dense form agrees with the reference too.
    dense = ours.to_dense()
    torch.testing.assert_close(
        dense(x.flatten(1)).unflatten(1, out_shape), ref(x).detach(), **TOL[dtype]
    )


def test_from_reference_is_independent_copy() -> None:
    ndlinear = pytest.importorskip("ndlinear")
    ref = ndlinear.NdLinear((4, 5), (3, 6))
    ours = NdLinear.from_reference(ref)
    with torch.no_grad():
        ours.factors[0].zero_()
    assert ref.align_layers[0].weight.abs().sum() > 0


def test_from_reference_rejects_other_modules() -> None:
    with pytest.raises(NdCompileError, match="not a reference NdLinear"):
        NdLinear.from_reference(nn.Linear(4, 4))


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (((4, 5), (3,)), {}, "as many input as output modes"),
        (((), ()), {}, "as many input as output modes"),
        (((4, 0), (3, 2)), {}, ">= 1"),
        (((4, 5), (3, -2)), {}, ">= 1"),
        (((4, 5), (3, 2)), {"rank": 0}, "rank must be >= 1"),
        (((4, 5), (3, 2)), {"bias": "full"}, "bias must be True, False or 'modes'"),
        (((4, 5), (3, 2)), {"rank": 2, "bias": "modes"}, "rank 1 only"),
        (((4, 5), (3, 2)), {"optimizer": "fastest"}, "valid optimizers"),
    ],
)
def test_bad_construction_raises(args, kwargs, match) -> None:
    with pytest.raises(NdCompileError, match=match):
        NdLinear(*args, **kwargs)


@pytest.mark.parametrize("shape", [(2, 5, 4), (2, 4, 5, 1), (2, 20), (5,)])
def test_wrong_input_shape_raises(shape) -> None:
    layer = NdLinear((4, 5), (3, 2))
    with pytest.raises(NdCompileError, match=r"expects input \(\*, 4, 5\)") as info:
        layer(torch.randn(shape))
    assert str(tuple(shape)) in str(info.value)


# -------------------------------------------------------------- module protocol


def test_state_dict_round_trip() -> None:
    src = NdLinear((4, 5, 3), (3, 2, 4), bias="modes")
    perturb_biases(src)
    keys = set(src.state_dict())
    assert keys == {f"factors.{k}" for k in range(3)} | {f"mode_biases.{k}" for k in range(3)}
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = NdLinear((4, 5, 3), (3, 2, 4), bias="modes")
    dst.load_state_dict(torch.load(buf), strict=True)
    x = torch.randn(6, 4, 5, 3)
    torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)
    wrong = NdLinear((4, 5, 3), (3, 2, 4), rank=2)
    with pytest.raises(RuntimeError):
        wrong.load_state_dict(src.state_dict(), strict=True)


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_deepcopy_and_pickle(copier) -> None:
    layer = NdLinear((4, 5), (3, 6), rank=2)
    clone = copier(layer)
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(clone(x), layer(x), atol=0, rtol=0)
    assert clone.plan().equation == layer.plan().equation
    assert (clone.in_shape, clone.out_shape, clone.rank) == (layer.in_shape, layer.out_shape, 2)
    with torch.no_grad():
        clone.factors[0].add_(1.0)
    assert not torch.equal(clone.factors[0], layer.factors[0])


def test_plan_and_replan() -> None:
    layer = NdLinear((8, 8), (4, 4), dtype=torch.float64)
    plan = layer.plan()
    assert isinstance(plan, NetworkPlan)
    assert plan.flops < plan.naive_flops
    x = torch.randn(5, 8, 8, dtype=torch.float64)
    before = layer(x)
    layer.replan(optimizer="greedy", plan_batch=1)
    assert layer.plan().optimizer == "greedy"
    assert layer.plan().nominal_batch == 1
    torch.testing.assert_close(layer(x), before, atol=1e-12, rtol=1e-12)
    assert "in_shape=(8, 8)" in repr(layer)


def test_gradients_flow_to_every_parameter() -> None:
    layer = NdLinear((4, 5), (3, 6), rank=3)
    layer(torch.randn(2, 4, 5)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_torch_compile_fullgraph_matches_eager() -> None:
    """Inductor compiles the whole forward (no graph break); inference only, to stay fast."""
    layer = NdLinear((4, 5), (3, 2), rank=2)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    x = torch.randn(3, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph_backward_matches_eager() -> None:
    """Dynamo + AOTAutograd capture the forward and backward in one graph."""
    layer = NdLinear((4, 5, 2), (3, 2, 2), bias="modes")
    compiled = torch.compile(layer, fullgraph=True, dynamic=False, backend="aot_eager")
    x = torch.randn(3, 4, 5, 2, requires_grad=True)
    got, expected = compiled(x), layer(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    cot = torch.randn_like(expected)
    params = [x, *layer.parameters()]
    for g_compiled, g_eager in zip(
        torch.autograd.grad(got, params, cot),
        torch.autograd.grad(expected, params, cot),
        strict=True,
    ):
        torch.testing.assert_close(g_compiled, g_eager, atol=1e-6, rtol=1e-6)


class DetachedInput(nn.Module):
    """Same output as ``layer`` but no gradient reaches the input."""

    def __init__(self, layer: NdLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.detach()) + 0.0 * x.sum()


def test_forward_backward_helper_detects_mismatches() -> None:
    layer = NdLinear((4, 5), (3, 2), dtype=torch.float64)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    with pytest.raises(AssertionError, match="grad of input 0"):
        assert_close_forward_backward(layer, DetachedInput(layer), x, atol=1e-10, rtol=1e-10)
    other = copy.deepcopy(layer)
    with torch.no_grad():
        other.factors[1][0, 0, 0] += 1e-3
    with pytest.raises(AssertionError, match="output 0"):
        assert_close_forward_backward(layer, other, x, atol=1e-10, rtol=1e-10)
    with pytest.raises(AssertionError, match="do not exist"):
        assert_close_forward_backward(layer, layer, x, atol=0, rtol=0, param_map={"w": "w"})


@pytest.mark.parametrize("flat", [False, True])
def test_bias_is_added_in_place_only_outside_autograd(flat: bool) -> None:
    layer = NdLinear((4, 6), (3, 5), rank=2, bias=True).double()
    layer.flat = flat
    x = torch.randn(7, *((24,) if flat else (4, 6)), dtype=torch.float64)
    before = x.clone()
    want = layer.to_dense()(x.reshape(7, 24)).reshape(7, *((15,) if flat else (3, 5)))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)
    assert torch.equal(x, before)
    out = layer(x)  # autograd on: the add is out of place and gradients flow
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert layer.bias is not None and layer.bias.grad is not None
    torch.testing.assert_close(layer.bias.grad, torch.full_like(layer.bias, 7.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("recompute", [False, True])
def test_bias_folded_into_the_last_gemm_matches_dense(dtype, recompute: bool) -> None:
    from ndcompile.testing import dispatched_ops

    torch.manual_seed(0)
    layer = NdLinear((6, 8), (4, 5), bias=True, dtype=dtype, recompute=recompute, tile=0)
    perturb_biases(layer)
    x = torch.randn(9, 6, 8, dtype=dtype)
    with torch.no_grad():
        ops = dispatched_ops(lambda: layer(x))
    assert ops["aten::baddbmm"] + ops["aten::addmm"] == 1  # the bias rides on a GEMM
    assert ops["aten::add_"] + ops["aten::add"] == 0
    compared = assert_close_forward_backward(
        DenseForward(layer),
        layer,
        x,
        param_map={f"layer.{n}": n for n, _ in layer.named_parameters()},
        **TOL[dtype],
    )
    assert len(compared) == len(list(layer.parameters()))


def test_training_output_is_row_major_whatever_the_program_layout() -> None:
    from ndcompile.planner.machine import MachineModel
    from ndcompile.planner.plan import plan_ndlinear

    torch.manual_seed(0)
    shapes = ((4, 6, 3), (5, 3, 2))
    machine = MachineModel(matmul_gflops=100.0, bandwidth_gbs=10.0, op_overhead_us=5.0)
    choice = plan_ndlinear(*shapes, batch=8, machine=machine, dtype=torch.float64)
    x = torch.randn(8, *shapes[0], dtype=torch.float64)
    layer = NdLinear(*shapes, bias=True, tile=0, dtype=torch.float64)
    permuted = [
        c.plan
        for c in choice.candidates
        if not c.plan.program.run(x, *layer.factor_operands()).is_contiguous()
    ]
    assert permuted, "no candidate leaves its result permuted: pick other shapes"
    layer._set_plan(permuted[0], torch.float64)
    dense = nn.Linear(24 * 3, 30, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        dense.bias.copy_(layer.bias)
    xg = x.clone().requires_grad_()
    y = layer(xg)
    assert y.is_contiguous()
    want = dense(x.reshape(8, -1)).reshape(y.shape)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    dense(x.reshape(8, -1)).square().sum().backward()
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad, rtol=1e-10, atol=1e-12)
    assert xg.grad is not None
