"""Layer fits shared over torch.distributed processes: two gloo ranks, one result."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ndcompile

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

WORLD = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(64, 64) for _ in range(5)])


def _convert(distributed: bool = False) -> nn.Module:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    return ndcompile.convert(_model(), x, mode="factorize", rank=2, distributed=distributed)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    fitted: list[str] = []
    from ndcompile.pipeline import modes

    original = modes.FactorizeMode.make_layer

    def counting(self, site, entry, opts, data):  # type: ignore[no-untyped-def]
        fitted.append(site.name)
        return original(self, site, entry, opts, data)

    modes.FactorizeMode.make_layer = counting  # type: ignore[method-assign]
    try:
        converted = _convert(distributed=True)
        state = {k: v.tolist() for k, v in converted.state_dict().items()}
        errors = {e.name: e.weight_rel_error for e in converted.report.layers}
        Path(out, f"{rank}.json").write_text(
            json.dumps({"fitted": fitted, "state": state, "errors": errors})
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_processes_split_the_fits_and_agree_with_one(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["fitted"] == ["0", "2", "4"] and ranks[1]["fitted"] == ["1", "3"]
    single = _convert()
    want = single.state_dict()
    errors = {e.name: e.weight_rel_error for e in single.report.layers}
    for result in ranks:  # same fits; BLAS thread counts may differ in the last bits
        assert result["errors"] == pytest.approx(errors, rel=1e-6)
        for key, value in want.items():
            torch.testing.assert_close(torch.tensor(result["state"][key]), value)


def test_distributed_needs_a_process_group() -> None:
    with pytest.raises(ndcompile.NdCompileError, match=r"initialised torch\.distributed"):
        _convert(distributed=True)
