"""Tests for ndcompile.ir.program: contraction programs run on tensors, into `out`, with a bias."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from einsum_programs import lower, operands

from ndcompile.ir.program import ContractionProgram, Instruction, broadcast_shapes
from ndcompile.testing import activation_permutes, dispatched_ops


def test_activation_permutes_counts_only_activation_data() -> None:
    prog = ContractionProgram(
        n_inputs=2,
        instructions=[
            Instruction("permute", (1,), 2, (1, 0)),  # weight only
            Instruction("matmul", (0, 2), 3),
            Instruction("permute", (3,), 4, (1, 0)),  # depends on the activation
        ],
        result=4,
        output=("a", "b"),
    )
    assert activation_permutes(prog) == 1
    assert activation_permutes(prog, activations=(1,)) == 2


def test_program_prints_its_instructions() -> None:
    prog = lower("bij,ai,cj->bac", [(4, 5, 6), (3, 5), (2, 6)], "optimal")
    text = str(prog)
    assert text.startswith("ContractionProgram(inputs=3, output=bac)")
    assert text.count("matmul") == prog.count("matmul") == 2
    assert f"return r{prog.result}" in text


OUT_CASES = [
    ("bij,ai,cj->bac", [(6, 5, 4), (3, 5), (2, 4)]),  # ends in a broadcast matmul
    ("bij,ai,cj->bca", [(6, 5, 4), (3, 5), (2, 4)]),  # ends in a permute: copied
    ("bij,rai,rcj->bac", [(6, 5, 4), (3, 2, 5), (3, 2, 4)]),  # rank-3 sum
    ("ij,jk->ik", [(3, 4), (4, 5)]),
]


def ndlinear_program() -> tuple[ContractionProgram, torch.Tensor, list[torch.Tensor]]:
    """A planned (6, 8) -> (4, 5) NdLinear program, a batch of 7 and its factors (f64)."""
    from ndcompile.layers.ndlinear import NdLinear

    nd = NdLinear((6, 8), (4, 5), dtype=torch.float64)
    factors = [f.detach() for f in nd.factor_operands()]
    return nd.plan().program, torch.randn(7, 6, 8, dtype=torch.float64), factors


@pytest.mark.parametrize(("equation", "shapes"), OUT_CASES)
def test_run_into_out_matches_run(equation: str, shapes) -> None:
    ops = operands(shapes)
    prog = lower(equation, shapes, "optimal")
    want = prog.run(*ops)
    out = torch.full_like(want, float("nan"))
    got = prog.run(*ops, out=out)
    assert got is out
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


def test_run_into_out_writes_the_last_matmul_there() -> None:
    from ndcompile.layers.ndlinear import NdLinear

    nd = NdLinear((6, 8), (4, 5), dtype=torch.float64)
    prog = nd.plan().program
    assert prog.instructions[prog._sink()].op == "matmul"
    x = torch.randn(7, 6, 8, dtype=torch.float64)
    factors = [f.detach() for f in nd.factor_operands()]
    out = torch.empty(7, 4, 5, dtype=torch.float64)
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Spy():
        got = prog.run(x, *factors, out=out)
    assert got is out
    assert torch.ops.aten.copy_.default not in seen
    torch.testing.assert_close(out, prog.run(x, *factors), rtol=1e-12, atol=1e-12)


def test_run_into_out_copies_a_permuted_result() -> None:
    prog = ContractionProgram(1, [Instruction("permute", (0,), 1, (1, 0))], result=1)
    assert prog._sink() == -1
    x = torch.randn(3, 4)
    out = torch.empty(4, 3)
    assert prog.run(x, out=out) is out
    torch.testing.assert_close(out, x.t())


@pytest.mark.parametrize(("equation", "shapes"), OUT_CASES)
def test_run_with_bias_adds_it_once(equation: str, shapes) -> None:
    ops = operands(shapes)
    prog = lower(equation, shapes, "optimal")
    want = prog.run(*ops)
    bias = torch.randn(want.shape[1:], dtype=want.dtype)
    out = torch.full_like(want, float("nan"))
    assert prog.run(*ops, out=out, bias=bias) is out
    torch.testing.assert_close(out, want + bias, atol=1e-12, rtol=1e-12)


def test_bias_is_folded_into_the_last_gemm() -> None:
    prog, x, factors = ndlinear_program()
    bias = torch.randn(4, 5, dtype=torch.float64)
    out = torch.empty(7, 4, 5, dtype=torch.float64)
    ops = dispatched_ops(lambda: prog.run(x, *factors, out=out, bias=bias))
    assert ops["aten::baddbmm"] + ops["aten::addmm"] == 1
    assert ops["aten::add_"] == ops["aten::add"] == 0
    torch.testing.assert_close(out, prog.run(x, *factors) + bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("equation", "shapes"), OUT_CASES)
def test_run_with_bias_and_no_out_adds_it_once(equation: str, shapes) -> None:
    ops = [t.requires_grad_() for t in operands(shapes)]
    prog = lower(equation, shapes, "optimal")
    want = prog.run(*ops)
    bias = torch.randn(want.shape[1:], dtype=want.dtype, requires_grad=True)
    got = prog.run(*ops, bias=bias)
    torch.testing.assert_close(got, want + bias, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, [*ops, bias], g)
    ref = torch.autograd.grad(want + bias, [*ops, bias], g)
    for x, y in zip(grads, ref, strict=True):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12)


def test_bias_is_folded_without_out_too() -> None:
    prog, x, factors = ndlinear_program()
    bias = torch.randn(4, 5, dtype=torch.float64)
    ops = dispatched_ops(lambda: prog.run(x, *factors, bias=bias))
    assert ops["aten::baddbmm"] + ops["aten::addmm"] == 1
    assert ops["aten::add"] == 0
    # A bias of another dtype is not folded, but still added.
    half = bias.float()
    ops = dispatched_ops(lambda: prog.run(x, *factors, bias=half))
    assert ops["aten::baddbmm"] + ops["aten::addmm"] == 0 and ops["aten::add_"] == 1


@pytest.mark.parametrize("shape", [(4, 1), (1, 5), (5,), ()])
def test_broadcasting_biases_are_added_not_folded(shape) -> None:
    prog, x, factors = ndlinear_program()
    bias = torch.randn(shape, dtype=torch.float64)
    want = prog.run(x, *factors) + bias
    torch.testing.assert_close(prog.run(x, *factors, bias=bias), want, rtol=1e-12, atol=1e-12)
    out = torch.empty(7, 4, 5, dtype=torch.float64)
    prog.run(x, *factors, out=out, bias=bias)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((), ()),
        ((3,), ()),
        ((), (4, 2)),
        ((5, 1), (1, 6)),
        ((2, 3, 4), (3, 1)),
        ((1,), (7,)),
        ((0,), (1,)),
        ((2, 0), (2, 1)),
    ],
)
def test_broadcast_shapes_matches_torch(a: tuple[int, ...], b: tuple[int, ...]) -> None:
    want = tuple(torch.broadcast_shapes(a, b))
    assert broadcast_shapes(a, b) == want
    assert broadcast_shapes(torch.Size(a), torch.Size(b)) == want


def test_broadcast_shapes_rejects_mismatch() -> None:
    with pytest.raises(RuntimeError, match="do not broadcast"):
        broadcast_shapes((2, 3), (4, 3))
    with pytest.raises(RuntimeError, match="do not broadcast"):
        broadcast_shapes((0,), (3,))


@pytest.mark.parametrize(("equation", "shapes"), OUT_CASES)
def test_late_bias_is_added_once_after_the_last_matmul(equation: str, shapes) -> None:
    ops = operands(shapes)
    prog = dataclasses.replace(lower(equation, shapes, "optimal"), late_bias=True)
    want = prog.run(*ops)
    bias = torch.randn(want.shape[1:], dtype=want.dtype)
    torch.testing.assert_close(prog.run(*ops, bias=bias), want + bias, atol=1e-12, rtol=1e-12)
    out = torch.full_like(want, float("nan"))
    assert prog.run(*ops, out=out, bias=bias) is out
    torch.testing.assert_close(out, want + bias, atol=1e-12, rtol=1e-12)


def test_late_bias_adds_in_place_unless_gradients_are_taken() -> None:
    prog, x, factors = ndlinear_program()
    late = dataclasses.replace(prog, late_bias=True)
    bias = torch.randn(4, 5, dtype=torch.float64)
    want = prog.run(x, *factors) + bias
    gemms = ("aten::baddbmm", "aten::addmm")
    for out in (None, torch.empty(7, 4, 5, dtype=torch.float64)):
        ops = dispatched_ops(lambda out=out: late.run(x, *factors, out=out, bias=bias))
        assert sum(ops[op] for op in gemms) == 0
        assert ops["aten::add_"] == 1 and ops["aten::add"] == 0
        got = late.run(x, *factors, out=out, bias=bias)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Under autograd the bias stays in the GEMM (no in-place add on a recorded result).
    trained = bias.clone().requires_grad_(True)
    ops = dispatched_ops(lambda: late.run(x, *factors, bias=trained))
    assert sum(ops[op] for op in gemms) == 1 and ops["aten::add_"] == 0
    y = late.run(x, *factors, bias=trained)
    (grad,) = torch.autograd.grad(y.sum(), [trained])
    torch.testing.assert_close(grad, torch.full_like(bias, 7.0))


def test_late_bias_folds_off_the_cpu() -> None:
    prog, x, factors = ndlinear_program()
    late = dataclasses.replace(prog, late_bias=True)
    meta = [t.to("meta") for t in (x, *factors)]
    bias = torch.randn(4, 5, dtype=torch.float64, device="meta")
    ops = dispatched_ops(lambda: late.run(*meta, bias=bias))
    assert ops["aten::baddbmm"] + ops["aten::addmm"] == 1 and ops["aten::add_"] == 0
