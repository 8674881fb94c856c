"""Distributed training of converted models: DDP and FSDP2 over gloo, two local processes.

The test spawns two CPU processes on localhost (no torchrun), trains converted
models for a few steps with different data per rank, and checks the result against a
single-process run on all ranks' data.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ndcompile.testing import dispatched_ops

from distributed_training import (
    DISTRIBUTED_CASES,
    converted_model,
    distributed_worker,
    train_reference,
)
from reliability_models import isolate_ndcompile_env

WORLD = 2
TIMEOUT_S = 150.0

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_ranks(out_dir: str, env: dict[str, str]) -> None:
    """Spawn the ranks and join them under a hard deadline (killing them if late)."""
    context = mp.spawn(
        distributed_worker, args=(WORLD, _free_port(), out_dir, env), nprocs=WORLD, join=False
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() >= deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    values = isolate_ndcompile_env(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as mp_env:
        for key, value in values.items():
            mp_env.setenv(key, value)
        yield values


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> list[dict]:
    """Per-rank results of training converted models under DDP and FSDP2."""
    out = tmp_path_factory.mktemp("ranks")
    _run_ranks(str(out), env)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", list(DISTRIBUTED_CASES))
def test_data_parallel_training_of_converted_model(results, case: str) -> None:
    kind, wrapper = DISTRIBUTED_CASES[case]
    ranks = [r[case] for r in results]
    names = sorted(ranks[0]["final"])
    assert names == sorted(ranks[1]["final"])
    assert any(".factors." in n for n in names), names
    for n in names:  # every rank starts from the same parameters ...
        torch.testing.assert_close(ranks[1]["init"][n], ranks[0]["init"][n], rtol=0, atol=0)
    if wrapper == "ddp":  # ... sees different data (its local gradients differ) ...
        grads = [r["local_grad"] for r in ranks]
        assert grads[0].keys() == grads[1].keys() and grads[0]
        assert any(not torch.allclose(grads[0][n], grads[1][n]) for n in grads[0])
    for n in names:  # ... and ends with identical parameters that have moved.
        torch.testing.assert_close(ranks[1]["final"][n], ranks[0]["final"][n], rtol=0, atol=0)
        assert not torch.equal(ranks[0]["final"][n], ranks[0]["init"][n]), n

    # The gradients were averaged over ranks: one process on both ranks' data agrees.
    model = converted_model(kind)
    if kind == "tiled":
        assert "ndcompile::tiled_contract" in dispatched_ops(lambda: model(torch.randn(4, 64)))
    model.load_state_dict(ranks[0]["init"])
    expected = train_reference(model, WORLD)
    for n in names:
        torch.testing.assert_close(ranks[0]["final"][n], expected[n], rtol=1e-4, atol=1e-5)
