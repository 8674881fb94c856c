"""Tests for ndcompile.network: the tensor-network IR, its plans and FX emission."""

from __future__ import annotations

import opt_einsum
import pytest
import torch
import torch.fx as fx
from torch import nn

from ndcompile.errors import NdCompileError
from ndcompile.ir.network import OPTIMIZERS, NetworkPlan, TensorNetwork, check_optimizer
from ndcompile.testing import random_network


def einsum_operands(shapes, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def edge_set(tn: TensorNetwork) -> set[tuple[frozenset[str], str]]:
    return {(frozenset((u, v)), k) for u, v, k in tn.graph.edges(keys=True)}


# ------------------------------------------------------------------------ building


@pytest.mark.parametrize("rank", [1, 3])
def test_from_ndlinear_graph(rank: int) -> None:
    tn = TensorNetwork.from_ndlinear((4, 5, 6), (3, 2, 7), rank=rank)
    assert tn.tensors == ["x", "W0", "W1", "W2"]
    assert tn.output == ("batch", "o0", "o1", "o2")
    assert tn.dynamic == "batch"
    assert tn.graph.nodes["x"]["role"] == "input"
    assert {tn.graph.nodes[f"W{k}"]["role"] for k in range(3)} == {"param"}
    expected = {(frozenset(("x", f"W{k}")), f"i{k}") for k in range(3)}
    if rank == 1:
        assert tn.indices("W1") == ("o1", "i1")
        assert tn.graph.nodes["W1"]["shape"] == (2, 5)
    else:
        assert tn.indices("W1") == ("r", "o1", "i1")
        assert tn.graph.nodes["W1"]["shape"] == (3, 2, 5)
        # The rank index joins every pair of factors (a hyperedge).
        expected |= {(frozenset((f"W{a}", f"W{b}")), "r") for a in range(3) for b in range(a)}
    assert edge_set(tn) == expected
    assert tn.sizes == {
        "batch": -1, "i0": 4, "i1": 5, "i2": 6, "o0": 3, "o1": 2, "o2": 7,
        **({"r": 3} if rank > 1 else {}),
    }  # fmt: skip


def test_from_einsum_graph() -> None:
    tn = TensorNetwork.from_einsum("ab,bc,cd,da->", [(2, 3), (3, 4), (4, 5), (5, 2)])
    assert tn.tensors == ["t0", "t1", "t2", "t3"]
    assert tn.output == ()
    assert tn.dynamic is None
    assert edge_set(tn) == {
        (frozenset(("t0", "t1")), "b"),
        (frozenset(("t1", "t2")), "c"),
        (frozenset(("t2", "t3")), "d"),
        (frozenset(("t3", "t0")), "a"),
    }
    assert all(tn.graph.edges[e]["size"] == tn.sizes[e[2]] for e in tn.graph.edges(keys=True))


def test_from_einsum_names_and_open_indices() -> None:
    tn = TensorNetwork.from_einsum("ij,jk->ik", [(2, 3), (3, 4)], names=["A", "B"])
    assert tn.tensors == ["A", "B"]
    assert tn.indices("B") == ("j", "k")
    # i and k are open (output) indices: they connect nothing.
    assert edge_set(tn) == {(frozenset(("A", "B")), "j")}
    assert "TensorNetwork(2 tensors" in repr(tn)


# --------------------------------------------------------------------- planning


@pytest.mark.parametrize("seed", range(40))
def test_default_plan_flops_equal_optimal(seed: int) -> None:
    net = random_network(seed, n_tensors=(2, 6), sizes=(2, 6))
    tn = TensorNetwork.from_einsum(net.equation, net.shapes())
    _, info = opt_einsum.contract_path(net.equation, *net.shapes(), shapes=True, optimize="optimal")
    plan = tn.plan()
    assert isinstance(plan, NetworkPlan)
    assert plan.flops == int(info.opt_cost)
    assert tn.flops() == plan.flops
    assert plan.naive_flops == int(info.naive_cost)


@pytest.mark.parametrize(
    ("in_shape", "out_shape", "rank"),
    [((32, 32), (16, 16), 1), ((4, 5, 6), (3, 2, 7), 1), ((4, 5, 6), (3, 2, 7), 2)],
)
def test_ndlinear_plan_flops_equal_optimal_at_nominal_batch(in_shape, out_shape, rank) -> None:
    tn = TensorNetwork.from_ndlinear(in_shape, out_shape, rank)
    plan = tn.plan(nominal_batch=8)
    shapes = [(8, *in_shape)] + [
        (h, d) if rank == 1 else (rank, h, d) for d, h in zip(in_shape, out_shape, strict=True)
    ]
    _, info = opt_einsum.contract_path(plan.equation, *shapes, shapes=True, optimize="optimal")
    assert plan.flops == int(info.opt_cost)
    assert plan.nominal_batch == 8
    assert plan.speedup == pytest.approx(plan.naive_flops / plan.flops)


def test_plan_is_cached_and_printable() -> None:
    tn = TensorNetwork.from_ndlinear((8, 8), (4, 4))
    plan = tn.plan()
    assert tn.plan() is plan
    text = str(plan)
    for field in ("equation:", "naive FLOPs:", "optimized FLOPs:", "ops emitted:"):
        assert field in text
    assert f"{plan.flops:,}" in text
    assert tn.equation() == plan.equation


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_plans_a_correct_program(optimizer: str) -> None:
    eq, shapes = "bij,ai,cj->bac", [(3, 4, 5), (2, 4), (6, 5)]
    tn = TensorNetwork.from_einsum(eq, shapes)
    ops = einsum_operands(shapes)
    got = tn.plan(optimizer).program.run(*ops)
    torch.testing.assert_close(got, torch.einsum(eq, *ops), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("bad", ["bogus", "Optimal", ""])
def test_unknown_optimizer_lists_valid_names(bad: str) -> None:
    tn = TensorNetwork.from_einsum("ij,jk->ik", [(2, 3), (3, 4)])
    with pytest.raises(NdCompileError) as info:
        tn.plan(bad)
    for name in OPTIMIZERS:
        assert name in str(info.value)
    with pytest.raises(NdCompileError, match="valid optimizers"):
        check_optimizer(bad)


# --------------------------------------------------------------------- emitting


def emit_module(tn: TensorNetwork, **kw) -> fx.GraphModule:
    graph = fx.Graph()
    inputs = {name: graph.placeholder(name) for name in tn.tensors}
    graph.output(tn.emit(graph, inputs, **kw))
    graph.lint()
    return fx.GraphModule(nn.Module(), graph)


@pytest.mark.parametrize(
    ("equation", "shapes"),
    [
        ("bij,ai,cj->bac", [(3, 4, 5), (2, 4), (6, 5)]),
        ("bijk,rai,rcj,rdk->bacd", [(2, 3, 4, 5), (2, 3, 3), (2, 2, 4), (2, 4, 5)]),
        ("ab,bc,cd,da->", [(2, 3), (3, 4), (4, 5), (5, 2)]),
        ("ij,jk->ki", [(3, 4), (4, 5)]),
    ],
)
def test_emit_into_fresh_graph_matches_einsum(equation: str, shapes) -> None:
    tn = TensorNetwork.from_einsum(equation, shapes)
    gm = emit_module(tn)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert isinstance(out.meta["ndcompile_plan"], NetworkPlan)
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert torch.einsum not in targets
    products = targets.count(torch.matmul) + targets.count(torch.bmm)
    assert products == tn.plan().program.count("matmul")
    ops = einsum_operands(shapes)
    torch.testing.assert_close(gm(*ops), torch.einsum(equation, *ops), atol=1e-10, rtol=1e-10)


def test_emit_ndlinear_network_works_at_any_batch() -> None:
    tn = TensorNetwork.from_ndlinear((4, 5), (3, 2), rank=2)
    gm = emit_module(tn, optimizer="optimal", nominal_batch=16)
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    w1 = torch.randn(2, 2, 5, generator=gen, dtype=torch.float64)
    for batch in (1, 5, 33):
        x = torch.randn(batch, 4, 5, generator=gen, dtype=torch.float64)
        expected = torch.einsum("bij,rai,rcj->bac", x, w0, w1)
        torch.testing.assert_close(gm(x, w0, w1), expected, atol=1e-10, rtol=1e-10)


def test_emit_without_all_inputs_raises() -> None:
    tn = TensorNetwork.from_einsum("ij,jk->ik", [(2, 3), (3, 4)])
    graph = fx.Graph()
    with pytest.raises(NdCompileError, match="t1"):
        tn.emit(graph, {"t0": graph.placeholder("t0")})


def test_merge_fuses_two_layers() -> None:
    first = TensorNetwork.from_ndlinear((4, 5), (3, 2), prefix="a")
    second = TensorNetwork.from_ndlinear((3, 2), (2, 6), prefix="b", input_name="h")
    merged = first.merge(second, link={"bi0": "ao0", "bi1": "ao1"}, drop="h")
    assert merged.tensors == ["x", "aW0", "aW1", "bW0", "bW1"]
    assert merged.output == ("batch", "bo0", "bo1")
    x, a0, a1, b0, b1 = einsum_operands([(7, 4, 5), (3, 4), (2, 5), (2, 3), (6, 2)])
    hidden = torch.einsum("bij,ai,cj->bac", x, a0, a1)
    expected = torch.einsum("bij,ai,cj->bac", hidden, b0, b1)
    got = merged.plan().program.run(x, a0, a1, b0, b1)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("equation", "shapes", "match"),
    [
        ("ij,jk->ik", [(2, 3), (4, 5)], "index 'j' has size 4"),
        ("ij,jk", [(2, 3), (3, 5)], "explicit"),
        ("i...,j->ij", [(2, 3), (3,)], "ellipsis"),
        ("ij,jk->ik", [(2, 3)], "2 operands but 1 shapes"),
        ("ijk,jk->ik", [(2, 3), (3, 5)], "subscripts 'ijk'"),
        ("ii->i", [(3, 3)], "distinct index"),
        ("ij->ik", [(2, 3)], "appear in no operand"),
        ("ij->ii", [(2, 3)], "repeat an index"),
    ],
)
def test_bad_einsum_raises(equation: str, shapes, match: str) -> None:
    with pytest.raises(NdCompileError, match=match):
        TensorNetwork.from_einsum(equation, shapes).plan()


def test_add_tensor_errors() -> None:
    tn = TensorNetwork(output=("i",))
    tn.add_tensor("a", ("i", "j"), (2, 3))
    with pytest.raises(NdCompileError, match="already in the network"):
        tn.add_tensor("a", ("j",), (3,))
    with pytest.raises(NdCompileError, match="index 'j' has size 4"):
        tn.add_tensor("b", ("j",), (4,))
    with pytest.raises(NdCompileError, match="do not match shape"):
        tn.add_tensor("c", ("j", "k"), (3,))
