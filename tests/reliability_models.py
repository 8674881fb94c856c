"""Models and helpers shared by the reliability, property-based and distributed tests.

Everything here is importable by a child process (the distributed worker is spawned
with ``torch.multiprocessing``), so it lives in a plain module rather than in a test
file or ``conftest.py``.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

__all__ = [
    "DISTRIBUTED_CASES",
    "FIXED_MACHINE",
    "Block",
    "ChannelsLastHead",
    "DataDependent",
    "FlattenHead",
    "KeywordCall",
    "NestedUntraceable",
    "NoGradBranch",
    "Permute",
    "PlainDataDependent",
    "PlainMLP",
    "SharedEmbedding",
    "SmallBlock",
    "SmallUntraceable",
    "TiedTwice",
    "TokenMLP",
    "Unflatten",
    "WithAttention",
    "build_random_model",
    "converted_model",
    "dense_equivalent",
    "distributed_worker",
    "isolate_ndcompile_env",
    "linear_names",
    "rank_batches",
    "rel_error",
    "train_reference",
]

#: Cost-model constants used by the tests (no measurement, same plans everywhere).
FIXED_MACHINE = json.dumps({"matmul_gflops": 100.0, "bandwidth_gbs": 10.0, "op_overhead_us": 5.0})


def isolate_ndcompile_env(cache_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Environment variables that keep ndcompile's caches out of the user's home."""
    return {"NDCOMPILE_CACHE_DIR": str(cache_dir), "NDCOMPILE_MACHINE": FIXED_MACHINE}


def rel_error(reference: Any, candidate: Any) -> float:
    """``|a - b| / |a|`` over the tensor leaves of two outputs (float64 arithmetic)."""
    ref = [t for t in tree_leaves(reference) if isinstance(t, Tensor)]
    got = [t for t in tree_leaves(candidate) if isinstance(t, Tensor)]
    assert [t.shape for t in ref] == [t.shape for t in got]
    pairs = [(a.detach().double(), b.detach().double()) for a, b in zip(ref, got, strict=True)]
    num = sum(float((a - b).pow(2).sum()) for a, b in pairs)
    den = sum(float(a.pow(2).sum()) for a, _ in pairs)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def dense_equivalent(model: nn.Module, converted: nn.Module) -> nn.Module:
    """A copy of ``model`` whose converted Linears are the dense form of their NdLinear.

    Running it is an independent oracle for a ``fresh``/``factorize`` conversion: the
    converted model must compute the same function as the original architecture with
    each converted layer's weight replaced by ``NdLinear.to_dense()``.
    """
    from ndcompile.layers.ndlinear import NdLinear

    oracle = copy.deepcopy(model)
    for entry in converted.report.converted:  # type: ignore[union-attr]
        layer = converted.get_submodule(entry.name)
        assert isinstance(layer, NdLinear), (entry.name, type(layer))
        parent, _, child = entry.name.rpartition(".")
        setattr(oracle.get_submodule(parent), child, copy.deepcopy(layer.to_dense()))
    return oracle


def linear_names(model: nn.Module) -> set[str]:
    """Qualified names of every ``nn.Linear`` (subclasses included) in ``model``."""
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}


# ----------------------------------------------------------------- simple models


class TokenMLP(nn.Module):
    """A per-token MLP on ``(*, dim)``."""

    def __init__(self, dim: int = 64, hidden: int = 96, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class PlainMLP(TokenMLP):
    """:class:`TokenMLP` with an unannotated ``forward`` (no string annotations)."""

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.fc2(torch.relu(self.fc1(x)))


class PlainDataDependent(nn.Module):
    """Untraceable model whose ``forward`` methods carry no annotations."""

    def __init__(self) -> None:
        super().__init__()
        self.block = PlainMLP()
        self.head = nn.Linear(64, 32)

    def forward(self, x):  # type: ignore[no-untyped-def]
        y = self.block(x)
        if y.sum() > 1e9:
            y = y * 2
        return self.head(y)


class Block(TokenMLP):
    """A traceable child block (``(*, 64) -> (*, 64)``)."""


class DataDependent(nn.Module):
    """Untraceable at the top (a data-dependent ``if``) around a traceable block."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(64, 32)

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        if y.sum() > 1e9:
            y = y * 2
        return self.head(y)


class NestedUntraceable(nn.Module):
    """Untraceable parent whose child is untraceable too; the grandchild traces."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = DataDependent()
        self.out = nn.Linear(32, 48)

    def forward(self, x: Tensor) -> Tensor:
        y = self.gate(x)
        if y.mean() > 1e9:
            return y
        return self.out(y)


class KeywordCall(nn.Module):
    """Untraceable; one block is called with a keyword, another not on this input."""

    def __init__(self) -> None:
        super().__init__()
        self.used = Block()
        self.by_keyword = Block()
        self.unused = Block()

    def forward(self, x: Tensor) -> Tensor:
        y = self.used(x)
        if y.sum() > 1e9:
            y = self.unused(y)
        return self.by_keyword(x=y)


class TiedTwice(nn.Module):
    """The same Linear applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.fc(x)))


class SharedEmbedding(nn.Module):
    """A language-model head whose weight is the embedding table."""

    def __init__(self, vocab: int = 96, dim: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.lm_head(torch.relu(self.mix(self.emb(tokens))))


class WithAttention(nn.Module):
    """``nn.MultiheadAttention`` (traced as a leaf) followed by a dense layer."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.attn(x, x, x)
        return self.fc(y)


class NoGradBranch(nn.Module):
    """A frozen projection computed under ``torch.no_grad`` inside ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(64, 64)
        self.trained = nn.Linear(64, 64)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            y = self.frozen(x)
        return self.trained(y)


class FlattenHead(nn.Module):
    """``(B, H, W, C)`` merged into one feature dim by one of several idioms."""

    KINDS = ("view_size0", "view_hwc", "flatten1", "nn_flatten", "reshape_shape0")

    def __init__(self, kind: str, hwc: tuple[int, int, int] = (4, 6, 8), out: int = 48) -> None:
        super().__init__()
        self.kind = kind
        self.hwc = hwc
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(math.prod(hwc), out)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "view_size0":
            x = x.view(x.size(0), -1)
        elif self.kind == "view_hwc":
            x = x.view(-1, self.hwc[0] * self.hwc[1] * self.hwc[2])
        elif self.kind == "flatten1":
            x = x.flatten(1)
        elif self.kind == "nn_flatten":
            x = self.flatten(x)
        else:
            x = x.reshape(x.shape[0], -1)
        return self.fc(x)


class ChannelsLastHead(nn.Module):
    """A convolution (channels_last friendly) whose flattened output feeds a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 6, 32)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


# --------------------------------------------------- building blocks for fuzzing


class Unflatten(nn.Module):
    """Split the last dim into ``sizes`` (traceable: no shape unpacking)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self.sizes = tuple(int(s) for s in sizes)

    def forward(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, self.sizes)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


class Permute(nn.Module):
    """Permute the feature dims of a ``(B, *features)`` tensor (batch stays first)."""

    def __init__(self, perm: Sequence[int]) -> None:
        super().__init__()
        self.dims = (0, *(int(p) + 1 for p in perm))

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


#: One step of a random model: ``(op, *arguments)``; see :func:`build_random_model`.
OpSpec = tuple[Any, ...]


def build_random_model(spec: Sequence[OpSpec]) -> nn.Sequential:
    """Build the model a fuzzing spec describes (parameters from the global RNG).

    Ops (all act on ``(B, *features)``):

    - ``("linear", in, out, bias)``: ``nn.Linear`` on the last dim;
    - ``("relu",)``; ``("flatten",)``: merge all feature dims (``nn.Flatten``);
    - ``("unflatten", sizes)``: split the last dim; ``("permute", perm)``: permute features;
    - ``("ndlinear", in_modes, out_modes, rank, bias)``: ndcompile's NdLinear on the
      trailing ``len(in_modes)`` dims;
    - ``("reference", in_modes, out_modes, transform_outer)``: the reference package's
      ``ndlinear.NdLinear`` on all feature dims.
    """
    from ndcompile.layers.ndlinear import NdLinear

    layers: list[nn.Module] = []
    for op, *args in spec:
        if op == "linear":
            layers.append(nn.Linear(args[0], args[1], bias=args[2]))
        elif op == "relu":
            layers.append(nn.ReLU())
        elif op == "flatten":
            layers.append(nn.Flatten())
        elif op == "unflatten":
            layers.append(Unflatten(args[0]))
        elif op == "permute":
            layers.append(Permute(args[0]))
        elif op == "ndlinear":
            layers.append(NdLinear(args[0], args[1], rank=args[2], bias=args[3]))
        elif op == "reference":
            import ndlinear

            layers.append(ndlinear.NdLinear(tuple(args[0]), tuple(args[1]), args[2]))
        else:
            raise ValueError(f"unknown op {op!r}")
    return nn.Sequential(*layers)


# ------------------------------------------------------------ distributed training

#: Models trained by the distributed test: name -> (converted model factory, wrapper).
DISTRIBUTED_CASES = {
    "ddp-graph_module": ("graph_module", "ddp"),
    "ddp-partial": ("partial", "ddp"),
    "fsdp-graph_module": ("graph_module", "fsdp"),
    "ddp-tiled": ("tiled", "ddp"),
    "fsdp-tiled": ("tiled", "fsdp"),
}
STEPS = 3
LR = 1e-2


def converted_model(kind: str) -> nn.Module:
    """A freshly converted model: a traced GraphModule or a partial (fallback) conversion.

    ``tiled`` is the GraphModule with one-row tiles, so that every batch of the test
    runs through the tiled contraction op.
    """
    import ndcompile
    from ndcompile.layers.ndlinear import NdLinear

    if kind in ("graph_module", "tiled"):
        model = ndcompile.convert(TokenMLP(), torch.randn(2, 5, 64), mode="fresh")
        if kind == "tiled":
            for layer in model.modules():
                if isinstance(layer, NdLinear):
                    layer.tile = 1
        return model
    return ndcompile.convert(DataDependent(), torch.randn(2, 64), mode="fresh")


def rank_batches(rank: int) -> list[Tensor]:
    """The (different) training batches of ``rank``."""
    gen = torch.Generator().manual_seed(1000 * (rank + 1))
    return [torch.randn(4, 64, generator=gen) for _ in range(STEPS)]


def train_reference(model: nn.Module, world: int) -> dict[str, Tensor]:
    """Single-process training equivalent to ``world`` data-parallel ranks.

    Data-parallel gradients are the mean of the per-rank gradients, i.e. the gradient
    of the mean of the per-rank losses.
    """
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    batches = [rank_batches(r) for r in range(world)]
    for step in range(STEPS):
        loss = sum(model(b[step]).pow(2).mean() for b in batches) / world
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _full_state(model: nn.Module) -> dict[str, Tensor]:
    """State dict with sharded (DTensor) entries gathered to full tensors."""
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def distributed_worker(rank: int, world: int, port: int, out_dir: str, env: dict[str, str]) -> None:
    """One rank of the distributed test: convert, wrap (DDP or FSDP2), train, save.

    DDP models are converted with a rank-dependent seed (DDP must broadcast rank 0's
    parameters); FSDP2 shards one common initialisation. Every rank trains on its own
    batches and saves the initial and final (full) parameters; DDP ranks also save
    the local, un-reduced gradient of their first batch.
    """
    os.environ.update(env)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results: dict[str, Any] = {}
        for case, (kind, wrapper) in DISTRIBUTED_CASES.items():
            torch.manual_seed(rank if wrapper == "ddp" else 0)
            model = converted_model(kind)
            batches = rank_batches(rank)
            local: dict[str, Tensor] = {}
            if wrapper == "ddp":
                wrapped = DistributedDataParallel(model)
                local = _local_gradients(wrapped, model, batches[0])
            else:
                wrapped = fully_shard(model)  # type: ignore[assignment]
            init = _full_state(model)
            opt = torch.optim.Adam(wrapped.parameters(), lr=LR)
            for x in batches:
                loss = wrapped(x).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            results[case] = {"init": init, "final": _full_state(model), "local_grad": local}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _local_gradients(ddp: nn.Module, model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Gradients of one batch on this rank only (``no_sync``: no all-reduce)."""
    model.zero_grad()
    with ddp.no_sync():  # type: ignore[operator]
        ddp(x).pow(2).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


class SmallBlock(nn.Module):
    """``(*, 32) -> (*, 48)``: Linear + ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 48)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.fc(x))


class SmallUntraceable(nn.Module):
    """Data-dependent control flow at the top: convert converts ``block`` only."""

    def __init__(self) -> None:
        super().__init__()
        self.block = SmallBlock()
        self.out = nn.Linear(48, 32)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            x = x * 2
        return self.out(self.block(x))
