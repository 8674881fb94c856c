"""distill on two gloo CPU processes equals distill in one process on the same data.

Each rank gets half the rows of every batch; the single-process run gets the whole
batches. Layer statistics are summed over ranks, whole-model training runs under
DistributedDataParallel (gradients averaged, KL per row), and the held-out sums are
added, so both runs take the same decisions and end at the same parameters.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import ndcompile
from ndcompile.compress.distill import distill
from ndcompile.compress.distill_stats import LayerStats

WORLD = 2
TIMEOUT_S = 120.0

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


class Net(nn.Module):
    """32 -> 64 -> 64 -> 8 classifier (random weights, seeded)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _problem() -> tuple[nn.Module, nn.Module, list[Tensor]]:
    torch.manual_seed(0)
    dense = Net().eval()
    batches = list(torch.randn(320, 32).split(32))
    converted = ndcompile.convert(dense, batches[0], mode="factorize", rank=1)
    return dense, converted, batches


def _run(rank: int, world: int) -> dict:
    dense, converted, batches = _problem()
    if world > 1:  # this rank's half of every batch
        batches = [b.chunk(world)[rank] for b in batches]
    report = distill(
        converted, dense, batches, holdout=0.2, steps=40, whole_model_steps=30, progress=False
    )
    return {
        "state": {k: v.detach().clone() for k, v in converted.state_dict().items()},
        "layers": [(e.name, e.error_before, e.error_after, e.rows_seen) for e in report.layers],
        "whole": report.whole_model,
        "processes": report.processes,
    }


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.save(_run(rank, world), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(worker: object, tmp_path: Path) -> list[dict]:
    """Run ``worker(rank, world, port, out)`` on ``WORLD`` processes; their saved results."""
    context = mp.spawn(worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() >= deadline:
                pytest.fail(f"workers did not finish within {TIMEOUT_S:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _reservoir_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank 0 sees 100 copies of one row, rank 1 300 of another; reservoirs keep 50."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        stats = LayerStats(4, "reservoir", cap=50)
        row = (
            torch.tensor([1.0, 2.0, 0.0, -1.0]) if rank == 0 else torch.tensor([0.0, 1.0, 3.0, 1.0])
        )
        for _ in range(100 if rank == 0 else 300):
            stats.add(row[None])
        gram, row_sum, n = stats.finalize()
        torch.save({"gram": gram, "row_sum": row_sum, "n": n, "kept": stats.rows_kept,
                    "seen": stats.rows_total}, os.path.join(out, f"rank{rank}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_reservoirs_merge_weighted_by_the_rows_each_process_saw(tmp_path: Path) -> None:
    ranks = _spawn(_reservoir_worker, tmp_path)
    a = torch.tensor([1.0, 2.0, 0.0, -1.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0, 3.0, 1.0], dtype=torch.float64)
    want_gram = (100 * torch.outer(a, a) + 300 * torch.outer(b, b)) / 400
    want_sum = (100 * a + 300 * b) / 400
    for got in ranks:
        assert got["n"] == got["kept"] == 100 and got["seen"] == 400  # 50 rows kept per rank
        torch.testing.assert_close(got["gram"] / got["n"], want_gram)
        torch.testing.assert_close(got["row_sum"] / got["n"], want_sum)


def test_two_processes_match_one(tmp_path: Path) -> None:
    ranks = _spawn(_worker, tmp_path)
    single = _run(0, 1)
    assert ranks[0]["processes"] == WORLD and single["processes"] == 1
    for name, value in single["state"].items():
        torch.testing.assert_close(ranks[0]["state"][name], ranks[1]["state"][name])
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-4, atol=1e-5)
    for got, want in zip(ranks[0]["layers"], single["layers"], strict=True):
        assert got[0] == want[0] and got[3] == want[3] == 320  # every rank's rows counted
        assert got[1:3] == pytest.approx(want[1:3], rel=1e-5)
    many, one = ranks[0]["whole"], single["whole"]
    assert many.steps == one.steps and many.processes == WORLD
    assert many.loss_after == pytest.approx(one.loss_after, rel=1e-4)
    assert one.loss_after < one.loss_before
