"""Tests for ndcompile.planner.calibrate: where a layer's bias goes, measured per machine."""

from __future__ import annotations

import json

import pytest
import torch

from ndcompile.ir.program import ContractionProgram
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.planner import autotune as tuning
from ndcompile.planner import calibrate
from ndcompile.planner.machine import MachineModel
from ndcompile.planner.plan import plan_ndlinear
from ndcompile.testing import dispatched_ops

#: The tests' fixed machine (conftest), with the bias added after the GEMM.
LATE = json.dumps(
    {"matmul_gflops": 150.0, "bandwidth_gbs": 12.0, "op_overhead_us": 5.0, "bias_in_gemm": False}
)


@pytest.mark.parametrize(
    ("tile", "batch", "fold"),
    [
        (1.00, 0.90, False),  # the add wins at 1,024 rows and ties on a tile
        (1.02, 0.90, False),  # a tile a little slower: within the margin
        (1.05, 0.90, True),  # a tile clearly slower: keep folding
        (0.95, 0.98, True),  # the add wins at 1,024 rows by less than the margin
        (0.90, 1.10, True),
    ],
)
def test_the_add_must_win_on_the_batch_and_not_lose_on_a_tile(
    monkeypatch: pytest.MonkeyPatch, tile: float, batch: float, fold: bool
) -> None:
    ratios = {224: tile, 1024: batch}
    monkeypatch.setattr(calibrate, "_add_over_fold", lambda rows, rounds: ratios[rows])
    assert calibrate.bias_in_gemm() is fold


def test_other_devices_fold_without_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    def timed(rows: int, rounds: int) -> float:
        raise AssertionError("timed a GPU on the CPU")

    monkeypatch.setattr(calibrate, "_add_over_fold", timed)
    assert calibrate.bias_in_gemm("cuda") is True


def test_fastest_keeps_each_functions_minimum_over_interleaved_rounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [0.0]
    order: list[str] = []
    # "a" takes 2 s except once 1 s; "b" takes 3 s except once 5 s.
    durations = {"a": [2, 2, 2, 1, 2, 2, 2], "b": [3, 3, 5, 3, 3, 3, 3]}

    def fn(name: str) -> None:
        order.append(name)
        clock[0] += durations[name][len([n for n in order if n == name]) - 1]

    monkeypatch.setattr(tuning.time, "perf_counter", lambda: clock[0])
    fastest = calibrate._fastest([lambda: fn("a"), lambda: fn("b")], rounds=3)
    assert fastest == [1, 3]
    # Two warm-up calls each, then rounds that start one function later every time.
    assert order == ["a", "a", "b", "b", "a", "b", "b", "a", "a", "b"]


def test_a_real_measurement_is_a_boolean() -> None:
    assert isinstance(calibrate.bias_in_gemm(rounds=2), bool)
    assert 0 < calibrate._add_over_fold(32, rounds=2) < 100


def test_the_planner_gives_every_candidate_the_machines_choice() -> None:
    late = MachineModel(150.0, 12.0, 5.0, bias_in_gemm=False)
    for machine, want in ((late, True), (MachineModel(150.0, 12.0, 5.0), False)):
        choice = plan_ndlinear((4, 6, 3), (5, 2, 3), batch=64, machine=machine)
        assert {c.plan.program.late_bias for c in choice.candidates} == {want}


def test_program_text_keeps_the_choice() -> None:
    layer = NdLinear((6, 8), (4, 5))
    assert "late_bias" not in layer.program_text  # texts of folding programs are unchanged
    late = ContractionProgram.from_text(layer.program_text)
    late.late_bias = True
    assert ContractionProgram.from_text(late.to_text()) == late != layer.plan().program


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("rank", "tile"), [(1, 0), (2, 0), (1, 16)])
def test_a_layer_on_a_late_bias_machine_matches_one_that_folds(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, rank: int, tile: int
) -> None:
    folding = NdLinear((6, 8), (4, 5), rank=rank, dtype=dtype, tile=tile)
    monkeypatch.setenv("NDCOMPILE_MACHINE", LATE)
    late = NdLinear((6, 8), (4, 5), rank=rank, dtype=dtype, tile=tile)
    late.load_state_dict(folding.state_dict())
    assert late.plan().program.late_bias and not folding.plan().program.late_bias
    x = torch.randn(100, 6, 8, dtype=dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    with torch.no_grad():
        torch.testing.assert_close(late(x), folding(x), **tol)
        if rank == 1 and not tile:  # the tiled op's own ops are not dispatched here
            gemms = ("aten::baddbmm", "aten::addmm")
            assert sum(dispatched_ops(lambda: folding(x))[op] for op in gemms) == 1
            ops = dispatched_ops(lambda: late(x))
            assert sum(ops[op] for op in gemms) == 0 and ops["aten::add_"] == 1
    # Training folds the bias on either machine: the same gradients.
    x.requires_grad_(True)
    grads = []
    for layer in (late, folding):
        y = layer(x)
        grads.append(torch.autograd.grad(y.square().sum(), [x, *layer.parameters()]))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_a_bert_converted_on_a_late_bias_machine_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_models import build

    import ndcompile

    model, inputs = build("bert")
    model.eval()
    torch.manual_seed(0)
    folding = ndcompile.convert(model, inputs, mode="fresh", rank=1)
    monkeypatch.setenv("NDCOMPILE_MACHINE", LATE)
    torch.manual_seed(0)
    late = ndcompile.convert(model, inputs, mode="fresh", rank=1)
    layers = [m for m in late.modules() if isinstance(m, NdLinear)]
    assert layers and all(m.plan().program.late_bias for m in layers)
    with torch.no_grad():
        want = folding(**inputs).last_hidden_state
        got = late(**inputs).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
