"""Tests for ndcompile.ir.lowering: opt_einsum paths lowered to explicit torch ops."""

from __future__ import annotations

import opt_einsum
import pytest
import torch
from einsum_programs import lower, operands

from ndcompile.ir.lowering import DYNAMIC, compile_path
from ndcompile.ir.network import TensorNetwork
from ndcompile.testing import activation_permutes, random_network

OPTIMIZERS = ("optimal", "dp", "greedy")

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


def test_path_leaving_several_operands_is_rejected() -> None:
    with pytest.raises(ValueError, match="leaves 2 operands"):
        compile_path([("i",), ("j",), ("k",)], ("i", "j", "k"), [(0, 1)], {"i": 2, "j": 3, "k": 4})
