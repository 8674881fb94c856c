"""Tests of autotuning a training step: forward and backward timed (ndcompile.planner.autotune)."""

from __future__ import annotations

import pytest
import torch
from autotune_helpers import jobs_timed_by

import ndcompile
import ndcompile.planner.autotune as tuning
import ndcompile.planner.timed as timed_mod
from ndcompile.cli.convert import conversion_kwargs
from ndcompile.cli.main import build_parser
from ndcompile.errors import NdCompileError
from ndcompile.ir.autodiff import run_recomputed
from ndcompile.ir.network import TensorNetwork
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.pipeline.options import ConvertOptions
from ndcompile.planner.autotune import (
    autotune_key,
    autotune_setting,
    check_autotune,
    compile_program,
    eager_mode,
    prepare_run,
    time_program,
)
from ndcompile.planner.machine import MachineModel
from ndcompile.planner.plan import plan_ndlinear

MACHINE = MachineModel(matmul_gflops=100.0, bandwidth_gbs=10.0, op_overhead_us=5.0)
TRAIN_MODES = ("eager-train", "inductor-train")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("NDCOMPILE_CACHE_DIR", str(tmp_path))


def _operands(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, *in_shape)] + [(h, d) for d, h in zip(in_shape, out_shape, strict=True)]
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("mode", TRAIN_MODES)
def test_training_settings_are_kept_and_keyed_apart(mode: str) -> None:
    assert check_autotune(mode) == mode and autotune_setting(mode) == mode
    args = ((8, 8), (4, 4), 1, 16, torch.float32, "cpu")
    keys = {autotune_key(*args, m) for m in ("eager", "inductor", *TRAIN_MODES)}
    assert len(keys) == 4
    assert eager_mode(mode) == "eager-train" and eager_mode("inductor") == "eager"
    assert ConvertOptions(autotune=mode).autotune == mode


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_training_step_matches_the_recomputing_layer(dtype: torch.dtype) -> None:
    shapes = ((4, 6, 3), (5, 3, 2))
    program = TensorNetwork.from_ndlinear(*shapes).plan(nominal_batch=8).program
    ops = _operands(*shapes, dtype=dtype)
    compiled = compile_program(program, ops, train=True)
    got = compiled(*ops)
    want = run_recomputed(program, *ops)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(got, want, **tol)
    grad_out = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, ops, grad_out)
    want_grads = torch.autograd.grad(want, ops, grad_out)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("mode", [*TRAIN_MODES, "eager"])
def test_training_modes_time_the_backward_too(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    grad = torch.autograd.grad

    def counting_grad(outputs, inputs, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(inputs))
        return grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    shapes = ((4, 6), (3, 5))
    program = TensorNetwork.from_ndlinear(*shapes).plan(nominal_batch=8).program
    ops = [t.detach() for t in _operands(*shapes)]
    assert time_program(program, ops, 2, mode) > 0
    # One warm-up and two timed steps, each with gradients to the input and both
    # factors (inductor's AOT autograd takes gradients while compiling, before them).
    if not tuning.is_training(mode):
        assert calls == []
    else:
        assert calls[-3:] == [3, 3, 3] and (mode == "inductor-train" or len(calls) == 3)
    assert not any(t.requires_grad for t in ops)  # the caller's operands are untouched


@pytest.fixture
def tile_256(monkeypatch: pytest.MonkeyPatch) -> int:
    """Automatic tiles of 256 rows, whatever this machine's caches."""
    import ndcompile.layers.ndlinear as ndlinear_mod

    monkeypatch.setattr(timed_mod, "candidate_tile", lambda *args: 256)
    monkeypatch.setattr(ndlinear_mod, "candidate_tile", lambda *args: 256)
    return 256


def test_tiled_training_step_is_timed_against_the_whole_program(
    monkeypatch: pytest.MonkeyPatch, tile_256: int
) -> None:
    calls: list[tuple[str, str, int]] = []

    def fake_time(cand, operands, reps, mode, tile=0):  # type: ignore[no-untyped-def]
        calls.append((cand.label, mode, tile))
        return 1.0 if tile else 5.0  # the tiled op wins

    monkeypatch.setattr(timed_mod, "time_jobs", jobs_timed_by(fake_time))
    choice = plan_ndlinear((32, 32), (32, 32), batch=4096, machine=MACHINE, autotune="eager-train")
    assert {m for _, m, _ in calls} == {"eager-train"}
    assert {t for *_, t in calls} == {0, tile_256}
    assert not choice.chosen.whole
    assert "autotuned, forward+backward" in str(choice)
    calls.clear()
    choice = plan_ndlinear(
        (32, 32), (32, 32), batch=4096, machine=MACHINE, autotune="inductor-train"
    )
    assert {(m, bool(t)) for _, m, t in calls} == {("eager-train", True), ("inductor-train", False)}
    assert "autotuned under inductor, forward+backward" in str(choice)


def test_whole_program_winning_a_training_step_untiles_the_layer(
    monkeypatch: pytest.MonkeyPatch, tile_256: int
) -> None:
    def fake_time(cand, operands, reps, mode, tile=0):  # type: ignore[no-untyped-def]
        return 5.0 if tile else 1.0

    monkeypatch.setattr(timed_mod, "time_jobs", jobs_timed_by(fake_time))
    layer = NdLinear((32, 32), (32, 32), plan_batch=4096, autotune="eager-train")
    assert layer.plan_choice().chosen.whole and layer.tile == 0
    assert NdLinear((32, 32), (32, 32), plan_batch=4096).tile == tile_256


def test_a_layer_saving_its_intermediates_is_timed_untiled_and_keyed_apart(
    monkeypatch: pytest.MonkeyPatch, tile_256: int
) -> None:
    calls: list[tuple[int, bool]] = []

    def time_jobs(jobs, operands, reps, *, recompute=True):  # type: ignore[no-untyped-def]
        calls.extend((tile, recompute) for _, _, tile in jobs)
        return [1.0] * len(jobs)

    monkeypatch.setattr(timed_mod, "time_jobs", time_jobs)
    layer = NdLinear((32, 32), (32, 32), plan_batch=4096, autotune="eager-train", recompute=False)
    assert calls and all(tile == 0 and not recompute for tile, recompute in calls)
    assert layer.tile == tile_256 and not layer.plan_choice().cache_hit
    args = ((32, 32), (32, 32), 1, 4096, torch.float32, "cpu", "eager-train")
    assert autotune_key(*args, recompute=False) != autotune_key(*args)
    assert autotune_key(*args[:-1], "eager", recompute=False) == autotune_key(*args[:-1])


@pytest.mark.parametrize("recompute", [True, False])
def test_the_training_step_runs_the_layers_own_forward(
    monkeypatch: pytest.MonkeyPatch, recompute: bool
) -> None:
    import ndcompile.ir.autodiff as autodiff

    calls: list[int] = []
    real = autodiff.run_recomputed

    def counting(program, *operands):  # type: ignore[no-untyped-def]
        calls.append(len(operands))
        return real(program, *operands)

    monkeypatch.setattr(autodiff, "run_recomputed", counting)
    shapes = ((4, 6), (3, 5))
    program = TensorNetwork.from_ndlinear(*shapes).plan(nominal_batch=8).program
    ops = [t.detach() for t in _operands(*shapes)]
    step = prepare_run(program, ops, "eager-train", recompute=recompute)
    calls.clear()
    step()
    assert calls == ([3] if recompute else [])


def test_training_autotune_works_under_inference_mode() -> None:
    with torch.inference_mode():
        choice = plan_ndlinear((4, 6), (3, 5), batch=8, machine=MACHINE, autotune="eager-train")
    assert any(c.measured_us for c in choice.candidates)


def test_a_backward_that_fails_to_compile_names_the_eager_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch._inductor.compile_fx as cfx

    def broken(gm, inputs):  # type: ignore[no-untyped-def]
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cfx, "compile_fx", broken)
    program = TensorNetwork.from_ndlinear((4, 4), (2, 2)).plan(nominal_batch=8).program
    ops = [t.detach() for t in _operands((4, 4), (2, 2))]
    with pytest.raises(NdCompileError, match="autotune='inductor-train' could not compile") as info:
        prepare_run(program, ops, "inductor-train")
    assert "autotune='eager-train'" in str(info.value)


@pytest.mark.parametrize("mode", TRAIN_MODES)
def test_layer_autotuned_for_training_trains_like_the_cost_model_plan(mode: str) -> None:
    torch.manual_seed(0)
    tuned = NdLinear((4, 6, 3), (5, 3, 2), plan_batch=16, autotune=mode, bias=True)
    plain = NdLinear((4, 6, 3), (5, 3, 2), plan_batch=16, bias=True).double()
    plain.load_state_dict(tuned.state_dict())
    tuned = tuned.double()
    choice = tuned.plan_choice()
    assert choice.mode == mode and any(c.measured_us for c in choice.candidates)
    x = torch.randn(16, 4, 6, 3, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    tuned(x).square().sum().backward()
    plain(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-10)
    for a, b in zip(tuned.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


def test_bert_converted_with_training_autotune_matches_the_cost_model_plan() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=50, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    dense = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 8))
    models = {}
    for mode in (False, "eager-train"):
        torch.manual_seed(1)
        models[mode] = ndcompile.convert(dense, {"input_ids": ids}, mode="fresh", autotune=mode)
    layers = [m for m in models["eager-train"].modules() if isinstance(m, NdLinear)]
    assert layers and all(m.plan_choice().mode == "eager-train" for m in layers)
    losses = {}
    for mode, model in models.items():
        model.train()
        out = model(input_ids=ids).last_hidden_state
        out.square().mean().backward()
        losses[mode] = (out.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[False][0], losses["eager-train"][0])
    for name, grad in losses[False][1].items():
        torch.testing.assert_close(losses["eager-train"][1][name], grad, rtol=1e-4, atol=1e-5)


def test_cli_accepts_the_training_settings() -> None:
    base = ["convert", "m.py:make", "-o", "out.pt2", "--mode", "fresh"]
    for mode in TRAIN_MODES:
        args = build_parser().parse_args([*base, "--autotune", mode])
        assert conversion_kwargs(args)["autotune"] == mode


@pytest.mark.parametrize("mode", ["eager", "inductor", *TRAIN_MODES])
def test_autotuning_leaves_the_global_random_stream_alone(mode: str) -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    plan_ndlinear((4, 6), (3, 5), batch=8, machine=MACHINE, autotune=mode)
    assert torch.equal(torch.get_rng_state(), state)


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        raise RuntimeError("backward compile failed")


def test_the_compiled_backward_is_made_while_preparing(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.compile_fx as cfx

    # A compiled forward whose backward fails, as inductor's lazily compiled one can.
    monkeypatch.setattr(
        cfx, "compile_fx", lambda gm, inputs: lambda *ops: _FailingBackward.apply(ops[0])
    )
    program = TensorNetwork.from_ndlinear((4, 4), (2, 2)).plan(nominal_batch=8).program
    ops = [t.detach() for t in _operands((4, 4), (2, 2))]
    with pytest.raises(NdCompileError, match="backward compile failed"):
        prepare_run(program, ops, "inductor-train")
    prepare_run(program, ops, "inductor")  # inference takes no backward
