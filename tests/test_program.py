"""Tests for ndcompile.program: opt_einsum paths lowered to explicit torch ops."""

from __future__ import annotations

import opt_einsum
import pytest
import torch

from ndcompile.ir.network import TensorNetwork
from ndcompile.ir.program import DYNAMIC, ContractionProgram, Instruction, compile_path
from ndcompile.testing import activation_permutes, dispatched_ops, random_network

OPTIMIZERS = ("optimal", "dp", "greedy")


def lower(equation: str, shapes: list[tuple[int, ...]], optimizer: str, **kw) -> ContractionProgram:
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    sizes = {}
    for term, shape in zip(terms, shapes, strict=True):
        sizes.update(zip(term, shape, strict=True))
    path, _ = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=optimizer)
    return compile_path([tuple(t) for t in terms], tuple(out), path, sizes, **kw)


def operands(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


CASES = [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("ij,jk->ki", [(3, 4), (4, 5)]),
    ("bij,ai,cj->bac", [(2, 5, 6), (3, 5), (4, 6)]),
    ("bij,ai,cj->bca", [(2, 5, 6), (3, 5), (4, 6)]),
    ("bijk,ai,cj,dk->bacd", [(2, 3, 4, 5), (6, 3), (2, 4), (3, 5)]),
    ("bij,rai,rcj->bac", [(2, 5, 6), (3, 4, 5), (3, 2, 6)]),  # rank-3 Kronecker sum
    ("ij,j->i", [(4, 5), (5,)]),
    ("i,j->ij", [(4,), (5,)]),  # outer product
    ("ij,ij->", [(4, 5), (4, 5)]),  # full reduction
    ("bij,bjk->bik", [(3, 4, 5), (3, 5, 2)]),  # batched matmul (kept shared index)
    ("ijk,jl,kl->il", [(2, 3, 4), (3, 5), (4, 5)]),  # hyperedge l
    ("abc,cd,de,ea->b", [(2, 3, 4), (4, 5), (5, 6), (6, 2)]),  # ring
    ("ij,jk,kl,lm->im", [(2, 3), (3, 4), (4, 5), (5, 2)]),  # chain
    ("ijk,k->ij", [(2, 3, 4), (4,)]),
    ("ij,kl->", [(2, 3), (4, 5)]),  # disconnected, both summed
    ("ab,bc->ab", [(3, 4), (4, 5)]),  # c summed out before the matmul
    ("ab,b,b->a", [(3, 4), (4,), (4,)]),
    ("bij,ai,cj->bac", [(1, 1, 1), (1, 1), (1, 1)]),  # all sizes 1
]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize(("equation", "shapes"), CASES)
def test_table_matches_einsum(equation: str, shapes, optimizer: str) -> None:
    ops = operands(shapes)
    prog = lower(equation, shapes, optimizer)
    torch.testing.assert_close(prog.run(*ops), torch.einsum(equation, *ops), atol=1e-10, rtol=1e-10)


def test_random_sweep_matches_einsum() -> None:
    """200 seeded random networks x 3 optimizers agree with torch.einsum (float64)."""
    checked = 0
    for seed in range(200):
        net = random_network(seed)
        ops = net.tensors(seed=seed)
        expected = torch.einsum(net.equation, *ops)
        for optimizer in OPTIMIZERS:
            path, _ = opt_einsum.contract_path(
                net.equation, *net.shapes(), shapes=True, optimize=optimizer
            )
            prog = compile_path(
                [tuple(o) for o in net.operands], tuple(net.output), path, net.sizes
            )
            got = prog.run(*ops)
            where = f"seed {seed}, {optimizer}, {net.equation} {net.shapes()}"
            assert got.shape == expected.shape, where
            torch.testing.assert_close(
                got, expected, atol=1e-10, rtol=1e-10, msg=lambda m, w=where: f"{w}: {m}"
            )
            checked += 1
    assert checked == 200 * len(OPTIMIZERS)


def test_random_sweep_covers_varied_networks() -> None:
    """The sweep is not degenerate: it has 2..5 operands, reductions and outer products."""
    nets = [random_network(seed) for seed in range(200)]
    assert {len(n.operands) for n in nets} == {2, 3, 4, 5}
    assert any(n.output == "" for n in nets)
    assert any(len(set(n.output)) < len(set("".join(n.operands))) for n in nets)
    assert len({n.equation for n in nets}) > 190


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("seed", range(0, 40, 3))
def test_dynamic_index_runs_at_several_batch_sizes(seed: int, optimizer: str) -> None:
    net = random_network(seed, dynamic=True)
    path, _ = opt_einsum.contract_path(net.equation, *net.shapes(), shapes=True, optimize=optimizer)
    prog = compile_path(
        [tuple(o) for o in net.operands],
        tuple(net.output),
        path,
        net.sizes,
        dynamic="z",
        nominal={"z": 64},
    )
    for batch in (1, 3, 17):
        ops = net.tensors(batch=batch, seed=batch)
        torch.testing.assert_close(
            prog.run(*ops), torch.einsum(net.equation, *ops), atol=1e-10, rtol=1e-10
        )


def test_dynamic_index_uses_minus_one_in_shapes() -> None:
    """The batch size never appears in the program; reshapes of batched values use -1."""
    sizes = {"b": 5, "i": 4, "j": 6, "a": 3, "c": 2}
    prog = lower("bij,ai,cj->bac", [(5, 4, 6), (3, 4), (2, 6)], "optimal", dynamic="b")
    batch_reshapes = [
        ins for ins in prog.instructions if ins.op == "reshape" and DYNAMIC in ins.arg
    ]
    assert batch_reshapes, str(prog)
    for ins in prog.instructions:
        if ins.op == "reshape":
            assert sizes["b"] not in ins.arg or DYNAMIC in ins.arg, str(prog)
    for batch in (1, 2, 9):
        ops = operands([(batch, 4, 6), (3, 4), (2, 6)], seed=batch)
        assert prog.run(*ops).shape == (batch, 3, 2)


@pytest.mark.parametrize(
    ("equation", "shapes"),
    [
        ("bij,ai,cj->bac", [(64, 32, 32), (32, 32), (32, 32)]),
        ("bijk,ai,cj,dk->bacd", [(64, 16, 16, 16), (16, 16), (16, 16), (16, 16)]),
    ],
)
def test_ndlinear_network_has_no_activation_permute(equation: str, shapes) -> None:
    """The leading mode is a left multiply on a view and the last a right multiply."""
    tn = TensorNetwork.from_einsum(equation, shapes)
    prog = tn.plan().program
    assert activation_permutes(prog) == 0, str(prog)
    assert prog.count("matmul") == len(shapes) - 1
    ops = operands(shapes)
    torch.testing.assert_close(prog.run(*ops), torch.einsum(equation, *ops))


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


def test_path_leaving_several_operands_is_rejected() -> None:
    with pytest.raises(ValueError, match="leaves 2 operands"):
        compile_path([("i",), ("j",), ("k",)], ("i", "j", "k"), [(0, 1)], {"i": 2, "j": 3, "k": 4})


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
