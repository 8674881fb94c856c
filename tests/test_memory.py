"""Training memory of NdLinear: saved activations no larger than the dense layer's, same grads."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ndcompile.ir.autodiff import RecomputedContraction, program_vjp, register_shapes
from ndcompile.layers.memory import saved_activation_bytes
from ndcompile.layers.ndlinear import NdLinear

#: (in_shape, out_shape, rank, leading dims of the input)
CASES = [
    ((24, 32), (48, 64), 1, (4, 32)),
    ((24, 32), (48, 64), 4, (4, 32)),
    ((48, 64), (24, 32), 1, (64,)),
    ((16, 16, 3), (8, 8, 3), 1, (32,)),
    ((8, 8, 8), (16, 16, 16), 2, (16,)),
    ((4, 6, 5), (3, 2, 7), 3, (2, 3)),
]


def _ids(case: tuple) -> str:
    ins, outs, rank, lead = case

    def dims(shape: tuple[int, ...]) -> str:
        return "x".join(map(str, shape))

    return f"{dims(ins)}-{dims(outs)}-r{rank}-b{dims(lead)}"


def _grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    y = layer(x)
    return list(torch.autograd.grad(y, [x, *layer.parameters()], g))


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_saved_bytes_at_most_dense(case: tuple) -> None:
    ins, outs, rank, lead = case
    nd = NdLinear(ins, outs, rank, flat=True)
    dense = nn.Linear(nd.in_features, nd.out_features)
    x = torch.randn(*lead, nd.in_features, requires_grad=True)
    got = saved_activation_bytes(lambda: nd(x), nd.parameters())
    ref = saved_activation_bytes(lambda: dense(x), dense.parameters())
    assert ref.activation_bytes == x.numel() * x.element_size()
    assert got.activation_bytes <= ref.activation_bytes
    # Without recomputation the planned program keeps an intermediate as well.
    keep = copy.deepcopy(nd)
    keep.recompute = False
    kept = saved_activation_bytes(lambda: keep(x), keep.parameters())
    assert kept.activation_bytes > ref.activation_bytes


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("flat", [True, False])
def test_gradients_equal_saving_path(case: tuple, flat: bool) -> None:
    ins, outs, rank, lead = case
    nd = NdLinear(ins, outs, rank, flat=flat, lowrank=2, dtype=torch.float64)
    with torch.no_grad():
        nd.lowrank_u.normal_()
    keep = copy.deepcopy(nd)
    keep.recompute = False
    shape = (*lead, nd.in_features) if flat else (*lead, *ins)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = nd(x)
    torch.testing.assert_close(y, keep(x), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    for got, ref in zip(_grads(nd, x, g), _grads(keep, x, g), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_mode_biases_and_no_bias() -> None:
    for bias in ("modes", False):
        nd = NdLinear((4, 6), (5, 3), bias=bias, dtype=torch.float64)
        keep = copy.deepcopy(nd)
        keep.recompute = False
        x = torch.randn(7, 4, 6, dtype=torch.float64, requires_grad=True)
        g = torch.randn(7, 5, 3, dtype=torch.float64)
        for got, ref in zip(_grads(nd, x, g), _grads(keep, x, g), strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


WANTED = [(True, False, False), (False, True, True), (False, False, True)]


@pytest.mark.parametrize("wanted", WANTED)
def test_vjp_computes_only_wanted_gradients(wanted: tuple[bool, ...]) -> None:
    nd = NdLinear((6, 8), (4, 5), 2, dtype=torch.float64)
    program = nd.plan().program
    operands = [torch.randn(3, 6, 8, dtype=torch.float64), *[f.detach() for f in nd.factors]]
    leaves = [t.clone().requires_grad_(w) for t, w in zip(operands, wanted, strict=True)]
    y = program.run(*leaves)
    g = torch.randn_like(y)
    refs = torch.autograd.grad(y, [t for t in leaves if t.requires_grad], g)
    got = program_vjp(program, operands, g, wanted)
    assert [v is not None for v in got] == list(wanted)
    for value, ref in zip([v for v in got if v is not None], refs, strict=True):
        torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-10)


def test_vjp_schedule_is_reused_per_shape_and_flags() -> None:
    nd = NdLinear((6, 8), (4, 5), 2, dtype=torch.float64)
    program = nd.plan().program
    program.vjp_schedules.clear()  # plans are shared between layers of one shape
    factors = [f.detach() for f in nd.factors]
    # One program, alternating shapes and flags: each call must use its own schedule.
    for rows, wanted in [(3, WANTED[0]), (5, WANTED[1]), (3, WANTED[1]), (5, WANTED[0])]:
        operands = [torch.randn(rows, 6, 8, dtype=torch.float64), *factors]
        leaves = [t.clone().requires_grad_(w) for t, w in zip(operands, wanted, strict=True)]
        y = program.run(*leaves)
        g = torch.randn_like(y)
        refs = torch.autograd.grad(y, [t for t in leaves if t.requires_grad], g)
        got = [v for v in program_vjp(program, operands, g, wanted) if v is not None]
        assert len(got) == len(refs)
        for value, ref in zip(got, refs, strict=True):
            torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-10)
    # Two row counts times two flag sets: one schedule each, kept on the program.
    assert len(program.vjp_schedules) == 4
    # With an output buffer for operand 0's gradient: another schedule, written there.
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    out = torch.empty_like(x)
    got = program_vjp(
        program, [x, *factors], torch.randn(3, 4, 5, dtype=torch.float64), [True, False, False], out
    )
    assert len(program.vjp_schedules) == 5
    assert got[0] is not None and got[0].data_ptr() == out.data_ptr()


def test_register_shapes_match_the_run() -> None:
    nd = NdLinear((4, 6, 5), (3, 2, 7), 3)
    program = nd.plan().program
    operands = [torch.randn(2, 4, 6, 5), *nd.factor_operands()]
    shapes = register_shapes(program, [t.shape for t in operands])
    assert shapes[program.result] == (2, 3, 2, 7)
    assert math.prod(shapes[0]) == operands[0].numel()


def test_gradcheck_and_double_backward() -> None:
    nd = NdLinear((3, 4), (2, 3), 2, dtype=torch.float64)
    program = nd.plan().program
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    factors = [f.detach().clone().requires_grad_() for f in nd.factors]

    def run(*ops: torch.Tensor) -> torch.Tensor:
        return RecomputedContraction.apply(program, *ops)

    assert torch.autograd.gradcheck(run, (x, *factors))
    assert torch.autograd.gradgradcheck(run, (x, *factors))


def test_no_grad_runs_the_plain_program() -> None:
    nd = NdLinear((24, 32), (48, 64), 4, flat=True)
    x = torch.randn(8, 768)
    with torch.no_grad():
        y = nd(x)
    assert y.grad_fn is None
    assert nd(x).grad_fn is not None


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_training_matches_eager(dynamic: bool) -> None:
    torch._dynamo.reset()
    model = nn.Sequential(
        NdLinear((6, 8), (8, 8), 2, flat=True), nn.GELU(), NdLinear((8, 8), (6, 8), flat=True)
    ).double()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for batch in (4, 6):
        x = torch.randn(batch, 3, 48, dtype=torch.float64, requires_grad=True)
        g = torch.randn(batch, 3, 48, dtype=torch.float64)
        for got, ref in zip(_grads(compiled, x, g), _grads(model, x, g), strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_export_in_training_mode() -> None:
    model = nn.Sequential(NdLinear((6, 8), (8, 8), 2, flat=True))
    x = torch.randn(5, 48)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "aten.bmm.default" in targets or "aten.matmul.default" in targets


def test_peak_live_bytes_counts_live_tensors_only():
    from ndcompile.layers.memory import peak_live_bytes

    x = torch.randn(256, 256)

    def work():
        a = x * 2  # 256 KiB
        b = a + 1  # 512 KiB live
        del a
        c = b * 3  # a was freed: 512 KiB again
        return c.sum()  # b, c and the scalar

    stats = peak_live_bytes(work, [x])
    assert stats.peak_bytes == 2 * 256 * 256 * 4 + 4
    assert stats.end_bytes == 4  # only the scalar result is alive
    assert stats.peak_op.startswith("aten.sum")


@pytest.mark.parametrize(("ins", "outs", "rank"), [((6, 8), (4, 5), 1), ((6, 8), (4, 5), 3)])
def test_vjp_writes_the_input_gradient_into_input_out(ins, outs, rank) -> None:
    nd = NdLinear(ins, outs, rank, dtype=torch.float64)
    program = nd.plan().program
    x = torch.randn(7, *ins, dtype=torch.float64)
    factors = [f.detach() for f in nd.factor_operands()]
    g = torch.randn(7, *outs, dtype=torch.float64)
    want = program_vjp(program, [x, *factors], g, [True, True, True])
    out = torch.full_like(x, float("nan"))
    got = program_vjp(program, [x, *factors], g, [True, True, True], out)
    for value, ref in zip(got, want, strict=True):
        torch.testing.assert_close(value, ref, rtol=1e-12, atol=1e-12)
    from ndcompile.ir.autodiff import _input_sink

    if _input_sink(program) is not None:
        assert got[0].data_ptr() == out.data_ptr()
        torch.testing.assert_close(out, want[0], rtol=1e-12, atol=1e-12)
