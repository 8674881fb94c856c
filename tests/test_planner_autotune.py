"""Tests of autotuning settings, compiled timing and its cache keys (ndcompile.planner.autotune)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from autotune_helpers import jobs_timed_by

import ndcompile.layers.ndlinear as ndlinear_mod
import ndcompile.planner.timed as timed_mod
from ndcompile.cli.convert import conversion_kwargs
from ndcompile.cli.loading import UsageError
from ndcompile.cli.main import build_parser
from ndcompile.errors import NdCompileError
from ndcompile.ir.network import TensorNetwork
from ndcompile.ir.tiled import AUTO_WHOLE_TILES
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.pipeline.options import ConvertOptions
from ndcompile.planner.autotune import (
    autotune_key,
    autotune_setting,
    check_autotune,
    compile_program,
    time_program,
    time_runs,
)
from ndcompile.planner.machine import MachineModel
from ndcompile.planner.plan import plan_ndlinear

MACHINE = MachineModel(matmul_gflops=100.0, bandwidth_gbs=10.0, op_overhead_us=5.0)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("NDCOMPILE_CACHE_DIR", str(tmp_path))


def _operands(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(8, *in_shape, generator=gen)] + [
        torch.randn(h, d, generator=gen) for d, h in zip(in_shape, out_shape, strict=True)
    ]


@pytest.mark.parametrize(
    ("value", "mode", "stored"),
    [(False, "off", False), (None, "off", False), (True, "eager", True), ("off", "off", False),
     ("eager", "eager", True), ("inductor", "inductor", "inductor")],
)  # fmt: skip
def test_settings_normalise(value: bool | str | None, mode: str, stored: bool | str) -> None:
    assert check_autotune(value) == mode
    assert autotune_setting(value) == stored


@pytest.mark.parametrize("bad", ["fast", "Inductor", 1, 0.5])
def test_unknown_setting_is_a_clear_error(bad: object) -> None:
    with pytest.raises(NdCompileError, match="unknown autotune setting") as info:
        check_autotune(bad)  # type: ignore[arg-type]
    assert "inductor" in str(info.value)
    with pytest.raises(NdCompileError, match="unknown autotune setting"):
        NdLinear((4, 4), (4, 4), autotune=bad)  # type: ignore[arg-type]
    with pytest.raises(NdCompileError, match="unknown autotune setting"):
        ConvertOptions(autotune=bad)  # type: ignore[arg-type]


def test_keys_keep_the_eager_form_and_separate_inductor() -> None:
    args = ((8, 8), (4, 4), 1, 16, torch.float32, "cpu")
    eager = autotune_key(*args)
    assert eager == autotune_key(*args, "eager") and "inductor" not in eager
    assert autotune_key(*args, "inductor") == eager + " inductor"


def test_compiled_program_matches_eager_and_is_timed() -> None:
    shapes = ((4, 6, 3), (5, 3, 2))
    plan = TensorNetwork.from_ndlinear(*shapes).plan(nominal_batch=8)
    ops = _operands(*shapes)
    compiled = compile_program(plan.program, ops)
    torch.testing.assert_close(compiled(*ops), plan.program.run(*ops), rtol=1e-5, atol=1e-5)
    assert time_program(plan.program, ops, 3, "inductor") > 0
    assert time_program(plan.program, ops, 3, "eager") > 0


def test_compile_failure_names_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.compile_fx as cfx

    def broken(gm, inputs):  # type: ignore[no-untyped-def]
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(cfx, "compile_fx", broken)
    plan = TensorNetwork.from_ndlinear((4, 4), (2, 2)).plan(nominal_batch=8)
    with pytest.raises(NdCompileError, match="no C\\+\\+ compiler found") as info:
        compile_program(plan.program, _operands((4, 4), (2, 2)))
    assert "autotune=True" in str(info.value) and "second line" not in str(info.value)


def test_inductor_mode_times_compiled_and_caches_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    def fake_time(cand, operands, reps, mode, tile=0):  # type: ignore[no-untyped-def]
        calls.append((cand.label, mode))
        best = "reference layout" if mode == "inductor" else "order 0,1,2"
        return 1.0 if cand.label == best else 10.0

    monkeypatch.setattr(timed_mod, "time_jobs", jobs_timed_by(fake_time))
    shapes = ((8, 8, 4), (8, 8, 3))
    compiled = plan_ndlinear(*shapes, batch=16, machine=MACHINE, autotune="inductor")
    assert compiled.chosen.label == "reference layout" and compiled.mode == "inductor"
    assert calls and {m for _, m in calls} == {"inductor"}
    assert "autotuned under inductor" in str(compiled)
    calls.clear()
    eager = plan_ndlinear(*shapes, batch=16, machine=MACHINE, autotune=True)
    assert eager.chosen.label == "order 0,1,2" and not eager.cache_hit
    assert {m for _, m in calls} == {"eager"}
    calls.clear()
    again = plan_ndlinear(*shapes, batch=16, machine=MACHINE, autotune="inductor")
    assert again.cache_hit and again.chosen.label == "reference layout" and calls == []


def test_layer_and_options_keep_the_setting() -> None:
    layer = NdLinear((4, 4), (4, 4), autotune="inductor", plan_batch=4)
    assert layer.autotune == "inductor" and layer.plan_choice().mode == "inductor"
    layer.replan(autotune=False)
    assert layer.autotune is False and not layer.plan_choice().autotuned
    assert ConvertOptions(autotune="eager").autotune is True


def test_cli_autotune_flag_reaches_convert() -> None:
    parser = build_parser()
    base = ["convert", "m.py:make", "-o", "out.pt2", "--mode", "fresh"]
    args = parser.parse_args([*base, "--autotune", "inductor"])
    assert conversion_kwargs(args)["autotune"] == "inductor"
    assert "autotune" not in conversion_kwargs(parser.parse_args(base))
    with pytest.raises(UsageError, match="--autotune: invalid choice: 'fast'"):
        parser.parse_args([*base, "--autotune", "fast"])


@pytest.mark.parametrize("whole_wins", [True, False])
def test_inductor_mode_weighs_the_tiled_op_against_the_whole_program(
    monkeypatch: pytest.MonkeyPatch, whole_wins: bool
) -> None:
    calls: list[tuple[str, int]] = []

    def fake_time(cand, operands, reps, mode, tile=0):  # type: ignore[no-untyped-def]
        calls.append((mode, tile))
        return (1.0 if whole_wins else 3.0) if not tile else 2.0

    monkeypatch.setattr(timed_mod, "time_jobs", jobs_timed_by(fake_time))
    tile = 256  # not the machine's L2-sized tile: the batch must hold more than 8
    monkeypatch.setattr(timed_mod, "candidate_tile", lambda *args: tile)
    monkeypatch.setattr(ndlinear_mod, "candidate_tile", lambda *args: tile)
    shapes, batch = ((8, 8, 4), (8, 8, 3)), 8192
    layer = NdLinear(*shapes, autotune="inductor", plan_batch=batch)
    choice = layer.plan_choice()
    assert AUTO_WHOLE_TILES * tile < batch, "the case must tile"
    assert ("eager", tile) in calls and ("inductor", 0) in calls
    assert choice.chosen.whole is whole_wins
    assert choice.chosen.label.endswith(", untiled") is whole_wins
    assert layer.tile == (0 if whole_wins else tile)
    calls.clear()
    again = NdLinear(*shapes, autotune="inductor", plan_batch=batch)
    assert calls == [] and again.plan_choice().cache_hit
    assert again.plan_choice().chosen.whole is whole_wins and again.tile == layer.tile


@pytest.mark.parametrize("whole_wins", [True, False])
def test_eager_mode_weighs_the_tiled_op_against_the_whole_program(
    monkeypatch: pytest.MonkeyPatch, whole_wins: bool
) -> None:
    calls: list[tuple[str, int]] = []

    def fake_time(cand, operands, reps, mode, tile=0):  # type: ignore[no-untyped-def]
        calls.append((mode, tile))
        return (2.0 if tile else 1.0) if whole_wins else (1.0 if tile else 2.0)

    monkeypatch.setattr(timed_mod, "time_jobs", jobs_timed_by(fake_time))
    monkeypatch.setattr(timed_mod, "candidate_tile", lambda *args: 256)
    choice = plan_ndlinear((8, 8, 4), (8, 8, 3), batch=4096, machine=MACHINE, autotune=True)
    assert {c for c in calls} == {("eager", 0), ("eager", 256)}
    assert choice.chosen.whole == whole_wins
    assert choice.chosen.measured_us == 1.0
    calls.clear()
    plan_ndlinear((8, 8, 4), (8, 8, 3), batch=64, machine=MACHINE, autotune=True)
    assert {c for c in calls} == {("eager", 0)}  # too few rows to tile


def test_printed_candidates_stay_aligned_with_long_labels() -> None:
    choice = plan_ndlinear((8, 8, 4), (8, 8, 3), batch=16, machine=MACHINE)
    long = dataclasses.replace(choice.candidates[0], layout="reference", whole=True)
    text = str(dataclasses.replace(choice, candidates=[long, *choice.candidates[1:]]))
    lines = text.splitlines()
    rows = lines[lines.index("  candidates (estimated µs | measured µs | FLOPs):") + 1 :]
    assert len(rows) == len(choice.candidates)
    assert len({line.rindex("|") for line in rows}) == 1


def test_runs_are_timed_in_interleaved_rounds() -> None:
    order: list[str] = []
    runs = [lambda name=name: order.append(name) for name in "abc"]
    medians = time_runs(runs, reps=3)
    assert len(medians) == 3 and all(m >= 0 for m in medians)
    # One warm-up each, then rounds that start one candidate later every time.
    assert "".join(order) == "abc" + "abc" + "bca" + "cab"


def test_interleaving_ranks_right_through_a_slow_stretch(monkeypatch: pytest.MonkeyPatch) -> None:
    import ndcompile.planner.autotune as tuning

    clock = {"now": 0.0, "calls": 0}
    monkeypatch.setattr(tuning.time, "perf_counter", lambda: clock["now"])

    def run(cost: float):  # type: ignore[no-untyped-def]
        def step() -> None:
            # The machine gets three times slower halfway through (other load).
            clock["calls"] += 1
            clock["now"] += cost * (1.0 if clock["calls"] <= 9 else 3.0)

        return step

    slow, fast = run(1.2), run(1.0)
    t_slow, t_fast = time_runs([slow, fast], reps=8)
    assert t_fast < t_slow
    # Timed one after the other, the faster candidate would fall in the slow stretch.
    clock.update(now=0.0, calls=0)
    apart = [time_runs([slow], reps=8)[0]]
    apart.append(time_runs([fast], reps=8)[0])
    assert apart[1] > apart[0]
