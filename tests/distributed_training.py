"""The distributed test's cases, its spawned worker and the single-process reference run.

Everything here is importable by a child process (the worker is spawned with
``torch.multiprocessing``), so it lives in a plain module rather than in a test file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reliability_models import DataDependent, TokenMLP

__all__ = [
    "DISTRIBUTED_CASES",
    "converted_model",
    "distributed_worker",
    "rank_batches",
    "train_reference",
]

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
                    layer.tile_setting = layer.tile = 1
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
