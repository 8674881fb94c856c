"""Tests of the contraction planner (ndcompile.plan) and machine model (ndcompile.machine)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from autotune_helpers import jobs_timed_by

import ndcompile.planner.timed as timed_mod
from ndcompile.errors import NdCompileError
from ndcompile.ir.network import TensorNetwork
from ndcompile.ir.program import ContractionProgram, Instruction
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.planner.machine import MachineModel, machine_model
from ndcompile.planner.plan import estimate_us, groupings, plan_ndlinear

MACHINE = MachineModel(matmul_gflops=100.0, bandwidth_gbs=10.0, op_overhead_us=5.0)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("NDCOMPILE_CACHE_DIR", str(tmp_path))


def test_groupings_are_compositions() -> None:
    assert groupings(1) == [((0,),)]
    assert sorted(groupings(3)) == sorted(
        [((0,), (1,), (2,)), ((0,), (1, 2)), ((0, 1), (2,)), ((0, 1, 2),)]
    )
    assert len(groupings(5)) == 16


def _random_case(seed: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    rng = random.Random(seed)
    n = rng.randint(2, 5)
    ins = tuple(rng.randint(2, 4) for _ in range(n))
    outs = tuple(rng.randint(2, 4) for _ in range(n))
    return ins, outs, rng.choice([1, 2])


@pytest.mark.parametrize("seed", range(10))
def test_every_candidate_computes_the_network(seed: int) -> None:
    in_shape, out_shape, rank = _random_case(seed)
    choice = plan_ndlinear(in_shape, out_shape, rank, batch=5, machine=MACHINE)
    assert choice.candidates  # identical programs are deduplicated
    torch.manual_seed(seed)
    x = torch.randn(5, *in_shape, dtype=torch.float64, requires_grad=True)
    shape = (lambda d, h: (h, d)) if rank == 1 else (lambda d, h: (rank, h, d))
    factors = [
        torch.randn(*shape(d, h), dtype=torch.float64, requires_grad=True)
        for d, h in zip(in_shape, out_shape, strict=True)
    ]
    eq = TensorNetwork.from_ndlinear(in_shape, out_shape, rank).plan("greedy").equation
    ref = torch.einsum(eq, x, *factors)
    grads_ref = torch.autograd.grad(ref.square().sum(), [x, *factors])
    for cand in choice.candidates:
        out = cand.plan.program.run(x, *factors)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        grads = torch.autograd.grad(out.square().sum(), [x, *factors])
        for g, gr in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g, gr, atol=1e-10, rtol=1e-10)


def test_cost_model_prefers_no_transpose_of_a_large_tensor() -> None:
    matmul = Instruction("matmul", (0, 1), 2, (), (64, 256, 256, 256, 64, 1))
    fast = ContractionProgram(n_inputs=2, instructions=[matmul], result=2)
    slow = ContractionProgram(
        n_inputs=2,
        instructions=[Instruction("permute", (0,), 3, (1, 0), (64 * 256 * 256,)), matmul],
        result=2,
    )
    assert estimate_us(fast, MACHINE) < estimate_us(slow, MACHINE)


def test_cost_model_penalises_tiny_matmul_dims() -> None:
    # Same FLOPs: a (B*1024, 3) x (3, 3) product is far less efficient than 96 x 96.
    tiny = Instruction("matmul", (0, 1), 2, (), (1, 65536, 3, 3, 1, 1))
    wide = Instruction("matmul", (0, 1), 2, (), (1, 192, 96, 96, 1, 1))
    t_tiny = estimate_us(ContractionProgram(2, [tiny], 2), MACHINE)
    t_wide = estimate_us(ContractionProgram(2, [wide], 2), MACHINE)
    flops_tiny, flops_wide = 65536 * 9, 192 * 96 * 96
    assert t_tiny / flops_tiny > 5 * t_wide / flops_wide


def test_plan_choice_prints_candidates() -> None:
    choice = plan_ndlinear((32, 32, 3), (32, 32, 3), batch=64, machine=MACHINE)
    text = str(choice)
    assert "candidates" in text and "modes 0 | 1 | 2" in text
    assert choice.chosen in choice.candidates
    assert choice.candidates == sorted(choice.candidates, key=lambda c: c.est_us)


def test_autotune_times_then_hits_cache(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[str] = []

    def fake_time(cand, operands, reps, mode, tile=0):  # type: ignore[no-untyped-def]
        calls.append(cand.label)
        return 1.0 if cand.label == "modes 0 | 1⊗2" else 10.0

    monkeypatch.setattr(timed_mod, "time_jobs", jobs_timed_by(fake_time))
    first = plan_ndlinear((8, 8, 3), (8, 8, 3), batch=16, machine=MACHINE, autotune=True, top_k=4)
    assert calls and first.autotuned and not first.cache_hit
    assert first.chosen.label == "modes 0 | 1⊗2"
    calls.clear()
    second = plan_ndlinear((8, 8, 3), (8, 8, 3), batch=16, machine=MACHINE, autotune=True)
    assert calls == [] and second.cache_hit and second.chosen.label == "modes 0 | 1⊗2"
    plan_ndlinear((8, 8, 4), (8, 8, 3), batch=16, machine=MACHINE, autotune=True)
    assert calls, "a new shape must be timed again"


@pytest.mark.parametrize(
    ("in_shape", "reference", "winner"),
    [
        # opt_einsum's per-mode order is the reference's first-to-last one here
        ((8, 8, 3), "modes 0 | 1 | 2", "modes 0 | 1 | 2"),
        ((8, 8, 4), "order 0,1,2", "order 0,1,2"),
        ((8, 8, 4), "order 0,1,2", "modes 0⊗1⊗2"),
    ],
)
def test_autotune_always_times_the_reference_schedule_and_the_dense_block(
    monkeypatch: pytest.MonkeyPatch, in_shape: tuple[int, ...], reference: str, winner: str
) -> None:
    calls: list[str] = []

    def fake_time(cand, operands, reps, mode, tile=0):  # type: ignore[no-untyped-def]
        calls.append(cand.label)
        return 1.0 if cand.label == winner else 10.0

    monkeypatch.setattr(timed_mod, "time_jobs", jobs_timed_by(fake_time))
    shapes = (in_shape, (8, 8, 3))
    estimated = plan_ndlinear(*shapes, batch=16, machine=MACHINE)
    rank = [c.label for c in estimated.candidates].index(winner)
    assert rank >= 1, "the case must not already time the winner as the best estimate"
    choice = plan_ndlinear(*shapes, batch=16, machine=MACHINE, autotune=True, top_k=1)
    assert {reference, "reference layout", "modes 0⊗1⊗2"} <= set(calls)
    assert choice.chosen.label == winner and choice.chosen.measured_us == 1.0
    assert len(choice.candidates) == len(estimated.candidates)


def test_layer_trains_through_a_grouped_plan() -> None:
    torch.manual_seed(0)
    layer = NdLinear((8, 4, 3), (4, 4, 3), rank=2).double()
    choice = plan_ndlinear((8, 4, 3), (4, 4, 3), 2, batch=8, machine=MACHINE)
    grouped = next(c for c in choice.candidates if any(len(g) > 1 for g in c.grouping))
    layer._plan = grouped.plan  # execute the Kronecker-merged candidate
    x = torch.randn(8, 8, 4, 3, dtype=torch.float64)
    dense = layer.to_dense()
    out = layer(x)
    torch.testing.assert_close(out.reshape(8, -1), dense(x.reshape(8, -1)))
    out.square().sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in layer.factors)


def test_machine_override_and_bad_override(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(
        "NDCOMPILE_MACHINE",
        json.dumps({"matmul_gflops": 1.0, "bandwidth_gbs": 2.0, "op_overhead_us": 3.0}),
    )
    assert machine_model() == MachineModel(1.0, 2.0, 3.0, "cpu")
    monkeypatch.setenv("NDCOMPILE_MACHINE", "{not json")
    with pytest.raises(NdCompileError, match="NDCOMPILE_MACHINE"):
        machine_model()


def test_machine_model_is_cached_on_disk(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("NDCOMPILE_MACHINE", raising=False)
    measured = MachineModel(50.0, 5.0, 2.0, "cpu")
    monkeypatch.setattr("ndcompile.planner.machine.measure", lambda device="cpu": measured)
    monkeypatch.setattr("ndcompile.planner.machine._matmul_gflops", lambda dev, reps: 50.0)
    monkeypatch.setattr("ndcompile.planner.machine._MEMO", {})
    assert machine_model() == measured
    assert list(tmp_path.glob("machine-*.json"))
    monkeypatch.setattr("ndcompile.planner.machine._MEMO", {})
    monkeypatch.setattr(
        "ndcompile.planner.machine.measure", lambda device="cpu": pytest.fail("re-measured")
    )
    assert machine_model() == measured


def test_unknown_planner_is_an_error() -> None:
    with pytest.raises(NdCompileError, match="valid planners"):
        NdLinear((4, 4), (4, 4), planner="fastest")


RANK_SUM_SHAPES = [((4, 6), (5, 3)), ((3, 4, 5), (2, 3, 4))]


@pytest.mark.parametrize("shapes", RANK_SUM_SHAPES, ids=["2 modes", "3 modes"])
@pytest.mark.parametrize("rank", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_sum_candidates_match_dense_weight(
    shapes: tuple, rank: int, dtype: torch.dtype
) -> None:
    in_shape, out_shape = shapes
    choice = plan_ndlinear(in_shape, out_shape, rank, batch=6, machine=MACHINE, dtype=dtype)
    kinds = {bool(c.chains) for c in choice.candidates}
    assert kinds == ({False, True} if rank > 1 else {False})
    layer = NdLinear(in_shape, out_shape, rank, bias=False, dtype=dtype)
    x = torch.randn(6, *in_shape, dtype=dtype)
    ref = (x.reshape(6, -1) @ layer.dense_weight().T).reshape(6, *out_shape)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for cand in choice.candidates:
        got = cand.plan.program.run(x, *layer.factor_operands())
        torch.testing.assert_close(got, ref, **tol, msg=lambda m, c=cand: f"{c.label}: {m}")


def test_chains_program_selects_terms_and_adds() -> None:
    choice = plan_ndlinear((4, 6), (5, 3), 3, batch=6, machine=MACHINE)
    chains = [c for c in choice.candidates if c.chains]
    assert chains and all(c.label.startswith("3 chains: ") for c in chains)
    program = chains[0].plan.program
    assert program.count("select") == 3 * 2 and program.count("add") == 2
    stacked = next(c for c in choice.candidates if not c.chains).plan.program
    assert stacked.count("select") == 0 and stacked.count("add") == 0
    assert stacked.count("matmul") == 2  # one GEMM per mode over all R terms
    assert "3 chains" in str(choice)


def test_planner_chooses_stacked_or_chains_by_cost() -> None:
    wide = plan_ndlinear((24, 32), (48, 64), 4, batch=128, machine=MACHINE)
    assert not wide.chosen.chains
    assert wide.chosen.plan.program.count("matmul") == 2
    small_first = plan_ndlinear((3, 32, 32), (3, 32, 32), 2, batch=64, machine=MACHINE)
    assert small_first.chosen.chains == 2
    for choice in (wide, small_first):
        assert choice.chosen.est_us == min(c.est_us for c in choice.candidates)


def test_layer_trains_through_chains_with_recomputation() -> None:
    layer = NdLinear((3, 32, 32), (3, 32, 32), 2, plan_batch=64, dtype=torch.float64)
    layer._choice = plan_ndlinear((3, 32, 32), (3, 32, 32), 2, batch=64, machine=MACHINE)
    layer._plan = layer._choice.chosen.plan
    assert layer.plan_choice().chosen.chains == 2
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    dense = layer.to_dense()
    g = torch.randn(4, 3 * 32 * 32, dtype=torch.float64)
    y = layer(x).reshape(4, -1)
    torch.testing.assert_close(y, dense(x.reshape(4, -1)), rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad(y, [x, *layer.factors], g)
    layer.recompute = False
    ref = torch.autograd.grad(layer(x).reshape(4, -1), [x, *layer.factors], g)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
