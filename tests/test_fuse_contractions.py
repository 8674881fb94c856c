"""Tests of the exact passes: fuse_contractions, eliminate_transposes, optimize()."""

from __future__ import annotations

import random

import ndlinear
import opt_einsum
import pytest
import torch
import torch.fx as fx
from torch import nn

import ndcompile
from ndcompile.errors import NdCompileError
from ndcompile.frontend.trace import trace
from ndcompile.passes import (
    annotate_shapes,
    eliminate_transposes,
    fuse_contractions,
    inline_ndlinear,
)


class LinearChain(nn.Module):
    def __init__(self, hidden: int, out: int) -> None:
        super().__init__()
        self.a = nn.Linear(16, hidden)
        self.b = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class WideChain(nn.Module):
    """x W1^T W2^T where multiplying the weights first is cheaper (batch >> width)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 32))
        self.w2 = nn.Parameter(torch.randn(2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(x, self.w1.t()), self.w2.t())


class EinsumChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4))
        self.w2 = nn.Parameter(torch.randn(5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("bij,ki->bkj", x, self.w1)
        return torch.einsum("bkj,lj->bkl", y, self.w2).permute(0, 2, 1).contiguous()


class RefPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = ndlinear.NdLinear((8, 4, 3), (4, 4, 3))
        self.b = ndlinear.NdLinear((4, 4, 3), (2, 4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class ReshapeBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 24)
        self.b = nn.Linear(24, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x).reshape(x.shape[0], 4, 6).transpose(1, 2).transpose(1, 2)
        return self.b(y.reshape(x.shape[0], 24))


class PerToken(ReshapeBetween):
    """(B, T, C): both B and T may vary, so the region is left alone (not baked in)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class NonLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _prepared(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    gm = trace(model)
    annotate_shapes(gm, (x,))
    inline_ndlinear(gm)
    annotate_shapes(gm, (x,))
    return gm


CASES = [
    (WideChain, (64, 32), True),
    (EinsumChain, (7, 4, 3), True),
    (RefPair, (6, 8, 4, 3), True),
    (ReshapeBetween, (10, 12), True),
    (PerToken, (2, 5, 12), False),
    (NonLinear, (5, 16), False),
]


@pytest.mark.parametrize(("cls", "shape", "fuses"), CASES, ids=[c[0].__name__ for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fuse_preserves_function(cls: type, shape: tuple, fuses: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = cls().to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    gm = _prepared(model, x)
    result = fuse_contractions(gm)
    assert result.modified is fuses
    gm.graph.lint()
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for batch in (shape[0], shape[0] + 3):
        xb = torch.randn(batch, *shape[1:], dtype=dtype, requires_grad=True)
        xr = xb.detach().clone().requires_grad_(True)
        out, ref = gm(xb), model(xr)
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        out.square().sum().backward()
        ref.square().sum().backward()
        torch.testing.assert_close(xb.grad, xr.grad, atol=tol, rtol=tol)
    assert all(p.grad is not None for p in gm.parameters())
    assert fuse_contractions(gm).modified is False


def test_fused_region_reports_flops_and_reduces_them() -> None:
    torch.manual_seed(0)
    model = RefPair().double()
    x = torch.randn(6, 8, 4, 3, dtype=torch.float64)
    gm = _prepared(model, x)
    fuse_contractions(gm)
    (region,) = gm.meta["ndcompile_fused"]
    assert region.contractions == 6
    assert region.flops_after < region.flops_before
    assert all(plan.flops <= plan.naive_flops for plan in region.plans)


@pytest.mark.parametrize(("hidden", "out", "fuses"), [(32, 8, False), (64, 4, True)])
def test_linear_chain_fused_only_when_flops_drop(hidden: int, out: int, fuses: bool) -> None:
    # 16->32->8 at batch 5: (xW1)W2 is already optimal and fusing adds W2 b1.
    # 16->64->4: W2 W1 first (+ W2 b1) is cheaper than two products with the batch.
    torch.manual_seed(0)
    model = LinearChain(hidden, out).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    gm = _prepared(model, x)
    assert fuse_contractions(gm).modified is fuses
    if fuses:
        (region,) = gm.meta["ndcompile_fused"]
        assert region.flops_after < region.flops_before
    torch.testing.assert_close(gm(x), model(x), atol=1e-12, rtol=1e-12)


def test_chosen_path_is_flop_optimal() -> None:
    torch.manual_seed(0)
    model = WideChain()
    x = torch.randn(64, 32)
    gm = _prepared(model, x)
    fuse_contractions(gm, optimizer="optimal")
    (region,) = gm.meta["ndcompile_fused"]
    (plan,) = region.plans
    _, info = opt_einsum.contract_path(
        plan.equation, (64, 32), (4, 32), (2, 4), shapes=True, optimize="optimal"
    )
    assert plan.flops == info.opt_cost


def test_fuse_requires_shapes() -> None:
    gm = trace(WideChain())
    with pytest.raises(NdCompileError, match="annotate_shapes"):
        fuse_contractions(gm)


def test_reference_ndlinear_loses_its_transposes() -> None:
    model = RefPair()
    x = torch.randn(2, 8, 4, 3)
    gm = ndcompile.optimize(model, x)
    targets = {str(n.target) for n in gm.graph.nodes}
    assert "transpose" not in targets and "contiguous" not in targets
    torch.testing.assert_close(gm(x), model(x))


# ------------------------------------------------------------- eliminate_transposes
class TransposeNoise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x).transpose(1, 2).transpose(1, 2).contiguous().view(-1, 8)
        z = torch.relu(y).permute(1, 0).permute(1, 0)
        return torch.relu(z) @ self.w


def test_eliminate_transposes_cancels_and_drops_contiguous() -> None:
    model = TransposeNoise()
    x = torch.randn(3, 4, 8)
    gm = trace(model)
    ndcompile.frontend.trace.propagate_shapes(gm, (x,))
    result = eliminate_transposes(gm)
    assert result.modified
    targets = [str(n.target) for n in gm.graph.nodes]
    assert "transpose" not in targets and "permute" not in targets
    assert "contiguous" not in targets
    torch.testing.assert_close(gm(x), model(x))
    assert eliminate_transposes(gm).modified is False


class InplaceAfterContiguous(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(0, 1).contiguous()
        y.add_(1.0)
        return x + y.transpose(0, 1)


def test_contiguous_kept_before_inplace_op() -> None:
    gm = trace(InplaceAfterContiguous())
    x = torch.randn(3, 4)
    ndcompile.frontend.trace.propagate_shapes(gm, (x.clone(),))
    eliminate_transposes(gm)
    assert "contiguous" in [str(n.target) for n in gm.graph.nodes]
    torch.testing.assert_close(gm(x.clone()), InplaceAfterContiguous()(x.clone()))


# --------------------------------------------------------------- random models
class RandomStack(nn.Module):
    """A random stack of linear maps (ours, reference, einsum, permutes) and ReLUs."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        rng = random.Random(seed)
        self.shape = tuple(rng.choice([2, 3, 4]) for _ in range(rng.choice([2, 3])))
        self.ops: list[str] = []
        self.layers = nn.ModuleList()
        self.perms: list[tuple[int, ...]] = []
        shape = self.shape
        for _ in range(rng.randint(2, 4)):
            kind = rng.choice(["ours", "ref", "einsum", "relu", "permute"])
            out = tuple(rng.choice([2, 3, 4]) for _ in shape)
            if kind == "ours":
                self.layers.append(ndcompile.NdLinear(shape, out, rank=rng.choice([1, 2])))
                shape = out
            elif kind == "ref":
                self.layers.append(ndlinear.NdLinear(shape, out))
                shape = out
            elif kind == "einsum":
                layer = nn.Linear(shape[-1], out[-1], bias=False)
                self.layers.append(layer)
                shape = (*shape[:-1], out[-1])
            else:
                self.layers.append(nn.Identity())
            if kind == "permute":
                perm = list(range(len(shape)))
                rng.shuffle(perm)
                self.perms.append(tuple(perm))
                shape = tuple(shape[p] for p in perm)
            else:
                self.perms.append(())
            self.ops.append(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, layer, perm in zip(self.ops, self.layers, self.perms, strict=True):
            if kind in ("ours", "ref"):
                x = layer(x)
            elif kind == "einsum":
                letters = "abcdefgh"[: len(self.shape) + 1]
                eq = f"{letters},z{letters[-1]}->{letters[:-1]}z"
                x = torch.einsum(eq, x, layer.weight)
            elif kind == "relu":
                x = torch.relu(x)
            else:
                x = x.permute(0, *(p + 1 for p in perm))
        return x


@pytest.mark.parametrize("seed", range(12))
def test_optimize_random_stacks_exact(seed: int) -> None:
    torch.manual_seed(seed)
    model = RandomStack(seed).double()
    x = torch.randn(3, *model.shape, dtype=torch.float64)
    gm = ndcompile.optimize(model, x)
    gm.graph.lint()
    for batch in (3, 5):
        xb = torch.randn(batch, *model.shape, dtype=torch.float64, requires_grad=True)
        xr = xb.detach().clone().requires_grad_(True)
        out, ref = gm(xb), model(xr)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        out.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(xb.grad, xr.grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dynamic", [False, True])
def test_optimized_graph_compiles_fullgraph(dynamic: bool) -> None:
    # aot_eager runs dynamo (fullgraph: no graph breaks) and AOT autograd without
    # inductor's codegen, which keeps the test fast on a 2-core CPU.
    torch.manual_seed(0)
    model = RefPair()
    x = torch.randn(6, 8, 4, 3)
    gm = ndcompile.optimize(model, x)
    assert gm.meta["ndcompile_fused"]
    compiled = torch.compile(gm, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for batch in (6, 9):
        xb = torch.randn(batch, 8, 4, 3)
        torch.testing.assert_close(compiled(xb), model(xb), atol=1e-5, rtol=1e-5)
