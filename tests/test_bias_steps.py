"""Tests of per-mode biases added inside their modes' GEMMs (ndcompile.ir.bias_steps)."""

from __future__ import annotations

import copy
import pickle

import ndlinear
import pytest
import torch

from ndcompile.ir.bias_steps import bias_steps, mode_steps
from ndcompile.ir.network import NetworkPlan, TensorNetwork
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.planner.machine import MachineModel
from ndcompile.planner.plan import plan_ndlinear
from ndcompile.planner.reference import reference_layout_plan, sequential_path
from ndcompile.testing import dispatched_ops

MACHINE = MachineModel(matmul_gflops=100.0, bandwidth_gbs=10.0, op_overhead_us=5.0)
IN, OUT = (4, 6, 3), (5, 3, 2)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("NDCOMPILE_CACHE_DIR", str(tmp_path))


def _plans(in_shape=IN, out_shape=OUT, rank=1) -> dict[str, NetworkPlan]:  # type: ignore[no-untyped-def]
    choice = plan_ndlinear(in_shape, out_shape, rank, batch=16, machine=MACHINE)
    return {c.label: c.plan for c in choice.candidates}


def _layer(plan: NetworkPlan, dtype: torch.dtype, *, outer: bool = True) -> tuple:  # type: ignore[type-arg]
    torch.manual_seed(0)
    ref = ndlinear.NdLinear(IN, OUT, transform_outer=outer).to(dtype)
    layer = NdLinear.from_reference(ref)
    layer.tile_setting = 0
    layer._set_plan(plan, dtype)
    with torch.no_grad():  # biases of a trained layer, not the reference's zeros
        for b in layer.mode_biases:
            b.normal_()
        for b, m in zip(layer.mode_biases, ref.align_layers, strict=True):
            m.bias.copy_(b)
    return layer, ref


def test_steps_of_sequential_programs_follow_their_order() -> None:
    tn = TensorNetwork.from_ndlinear(IN, OUT)
    for order in [(0, 1, 2), (2, 0, 1), (1, 2, 0)]:
        program = tn.plan("auto", nominal_batch=8, path=sequential_path(order)).program
        steps = mode_steps(program, 3)
        assert steps is not None and tuple(s.mode for s in steps) == order
        matmuls = [k for k, ins in enumerate(program.instructions) if ins.op == "matmul"]
        assert [s.instruction for s in steps] == matmuls
        assert bias_steps(program, order) == steps
        assert bias_steps(program, tuple(reversed(order))) is None
    layout = reference_layout_plan(tn, IN, OUT, 8).program
    assert [s.mode for s in mode_steps(layout, 3) or ()] == [0, 1, 2]


def test_kronecker_blocks_and_sums_of_chains_have_no_steps() -> None:
    plans = _plans()
    assert mode_steps(plans["modes 0 | 1⊗2"].program, 3) is None
    chains = [p for label, p in _plans(rank=2).items() if "chains" in label]
    assert chains and all(mode_steps(p.program, 3) is None for p in chains)
    assert mode_steps(plans["reference layout"].program, 2) is None  # wrong operand count


LABELS = ["reference layout", "order 0,1,2", "order 2,1,0", "modes 0 | 1⊗2"]


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_matches_the_reference_forward_and_backward(label: str, dtype: torch.dtype) -> None:
    layer, ref = _layer(_plans()[label], dtype)
    assert (layer._bias_steps is not None) == (label in ("reference layout", "order 0,1,2"))
    x = torch.randn(16, *IN, dtype=dtype, requires_grad=True)
    y, want = layer(x), ref(x)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(y, want, **tol)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *layer.factors, *layer.mode_biases], g)
    ref_params = [m.weight for m in ref.align_layers] + [m.bias for m in ref.align_layers]
    expected = torch.autograd.grad(want, [x, *ref_params], g)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.reshape(b.shape), b, **tol)


def test_biases_go_into_the_gemms_with_no_pass_over_the_output() -> None:
    layer, ref = _layer(_plans()["reference layout"], torch.float64)
    x = torch.randn(16, *IN, dtype=torch.float64)
    with torch.no_grad():
        ops = dispatched_ops(lambda: layer(x))
    assert ops["aten::addmm"] == 3 and not ops["aten::mm"]
    assert not ops["aten::add"] and not ops["aten::add_"]
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-12, atol=1e-12)


def test_reversed_reference_order_uses_steps_only_in_that_order() -> None:
    tn = TensorNetwork.from_ndlinear(IN, OUT)
    backwards = tn.plan("auto", nominal_batch=16, path=sequential_path((2, 1, 0)))
    layer, ref = _layer(backwards, torch.float64, outer=False)
    assert layer.mode_order == (2, 1, 0) and layer._bias_steps is not None
    x = torch.randn(16, *IN, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-12, atol=1e-12)
    layer.mode_order = (0, 1, 2)  # no longer the program's order: one full bias
    assert layer._bias_steps is None
    forwards = ndlinear.NdLinear(IN, OUT).double()
    for a, b in zip(forwards.align_layers, ref.align_layers, strict=True):
        a.load_state_dict(b.state_dict())
    torch.testing.assert_close(layer(x), forwards(x), rtol=1e-12, atol=1e-12)


def test_tiled_run_folds_the_biases_into_one() -> None:
    layer, ref = _layer(_plans()["reference layout"], torch.float64)
    layer.tile = 4
    x = torch.randn(16, *IN, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-12, atol=1e-12)
    assert dispatched_ops(lambda: layer(x.detach()))["ndcompile::tiled_contract"] == 1


def test_copies_keep_the_steps() -> None:
    layer, ref = _layer(_plans()["reference layout"], torch.float64)
    x = torch.randn(5, *IN, dtype=torch.float64)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other._bias_steps == layer._bias_steps is not None
        torch.testing.assert_close(other(x), ref(x), rtol=1e-12, atol=1e-12)


def test_old_pickles_with_a_plain_mode_order_attribute_load() -> None:
    layer, ref = _layer(_plans()["reference layout"], torch.float64)
    state = layer.__getstate__() if hasattr(layer, "__getstate__") else dict(layer.__dict__)
    state = dict(state)
    state["mode_order"] = state.pop("_mode_order")
    del state["_bias_steps"]
    old = NdLinear.__new__(NdLinear)
    old.__setstate__(state)
    assert old.mode_order == (0, 1, 2) and old._bias_steps == layer._bias_steps
    x = torch.randn(5, *IN, dtype=torch.float64)
    torch.testing.assert_close(old(x), ref(x), rtol=1e-12, atol=1e-12)


def test_compiled_layer_adds_one_full_bias() -> None:
    layer, ref = _layer(_plans()["reference layout"], torch.float32)
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, inputs: list) -> object:  # type: ignore[type-arg]
        graphs.append(gm)
        return gm.forward

    x = torch.randn(16, *IN)
    with torch.no_grad():
        y = torch.compile(layer, backend=record, fullgraph=True)(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-5)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert not any("addmm" in t for t in targets)
    assert sum("matmul" in t or t.endswith("mm") for t in targets) == 3


def test_compiled_fullgraph_matches_eager() -> None:
    layer, ref = _layer(_plans()["reference layout"], torch.float32)
    x = torch.randn(16, *IN, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-5)
    y.sum().backward()
    assert all(b.grad is not None for b in layer.mode_biases)


def test_program_writes_step_biased_results_into_out() -> None:
    layer, ref = _layer(_plans()["reference layout"], torch.float64)
    x = torch.randn(16, *IN, dtype=torch.float64)
    out = torch.full((16, *OUT), float("nan"), dtype=torch.float64)
    biases = layer.forward_bias()
    steps = biases.at_steps()  # type: ignore[union-attr]
    with torch.no_grad():  # out= is for runs outside autograd (the tiled op's)
        operands = layer.factor_operands()
        got = layer.plan().program.run(x, *operands, out=out, step_biases=steps)
        assert got.data_ptr() == out.data_ptr()
        torch.testing.assert_close(out, ref(x), rtol=1e-12, atol=1e-12)
