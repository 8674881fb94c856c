"""Tests of the reference NdLinear's schedules as candidates (ndcompile.planner.reference)."""

from __future__ import annotations

import ndlinear
import pytest
import torch

from ndcompile.ir.network import TensorNetwork
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.planner.machine import MachineModel
from ndcompile.planner.plan import plan_ndlinear
from ndcompile.planner.reference import (
    reference_layout_plan,
    reference_schedule,
    sequential_path,
)

MACHINE = MachineModel(matmul_gflops=100.0, bandwidth_gbs=10.0, op_overhead_us=5.0)
SHAPES = [((7,), (3,)), ((4, 6), (5, 3)), ((3, 4, 5), (2, 3, 4)), ((2, 3, 4, 5), (3, 2, 5, 4))]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("NDCOMPILE_CACHE_DIR", str(tmp_path))


def _layout(in_shape: tuple[int, ...], out_shape: tuple[int, ...]):  # type: ignore[no-untyped-def]
    tn = TensorNetwork.from_ndlinear(in_shape, out_shape)
    return reference_layout_plan(tn, in_shape, out_shape, 6)


def test_sequential_path_applies_modes_in_order() -> None:
    assert sequential_path((0, 1, 2)) == [(0, 1), (0, 2), (0, 1)]
    tn = TensorNetwork.from_ndlinear((4, 6, 3), (5, 3, 2))
    assert reference_schedule(tn, 3, 8).path == tuple(map(tuple, sequential_path((0, 1, 2))))


@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: f"{len(s[0])} modes")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_layout_computes_the_network(shapes: tuple, dtype: torch.dtype) -> None:
    in_shape, out_shape = shapes
    plan = _layout(in_shape, out_shape)
    layer = NdLinear(in_shape, out_shape, bias=False, dtype=dtype)
    x = torch.randn(6, *in_shape, dtype=dtype)
    want = (x.reshape(6, -1) @ layer.dense_weight().T).reshape(6, *out_shape)
    got = plan.program.run(x, *layer.factor_operands())
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(got, want, **tol)
    assert got.is_contiguous()


def test_reference_layout_is_the_reference_op_sequence() -> None:
    plan = _layout((3, 4, 5), (2, 3, 4))
    prog = plan.program
    matmuls = [i for i in prog.instructions if i.op == "matmul"]
    assert [m.arg for m in matmuls] == [(2, 2)] * 3  # one 2-D GEMM per mode
    assert [m.dims[2:4] for m in matmuls] == [(3, 2), (4, 3), (5, 4)]  # first to last
    # every mode but the last is moved last by one copy (its reshape after a permute)
    assert prog.permuted_elements == 3 * 4 * 5 + 2 * 4 * 5
    assert (
        plan.flops
        == reference_schedule(TensorNetwork.from_ndlinear((3, 4, 5), (2, 3, 4)), 3, 6).flops
    )
    assert plan.optimizer == "reference layout"


@pytest.mark.parametrize("tile", [0, 4])
def test_layer_on_the_reference_layout_matches_the_reference_and_trains(tile: int) -> None:
    torch.manual_seed(0)
    ref = ndlinear.NdLinear((4, 6, 3), (5, 3, 2)).double()
    layer = NdLinear.from_reference(ref)
    layer.tile_setting = layer.tile = tile
    choice = plan_ndlinear((4, 6, 3), (5, 3, 2), batch=16, machine=MACHINE, dtype=torch.float64)
    cand = next(c for c in choice.candidates if c.label == "reference layout")
    layer._plan, layer._text = cand.plan, cand.plan.program.to_text()
    x = torch.randn(16, 4, 6, 3, dtype=torch.float64, requires_grad=True)
    y, want = layer(x), ref(x)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *layer.factors], g)
    ref_x = torch.autograd.grad(want, [x], g)[0]
    torch.testing.assert_close(got[0], ref_x, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda inp, *fs: cand.plan.program.run(inp, *fs),
        (x[:3].detach().requires_grad_(), *(f[0].detach().requires_grad_() for f in layer.factors)),
    )


def test_reference_layout_is_a_rank_one_candidate_only() -> None:
    one = plan_ndlinear((8, 8, 4), (8, 8, 3), batch=16, machine=MACHINE)
    assert sum(c.layout == "reference" for c in one.candidates) == 1
    assert "reference layout" in str(one)
    two = plan_ndlinear((8, 8, 4), (8, 8, 3), 2, batch=16, machine=MACHINE)
    assert not any(c.layout for c in two.candidates)
