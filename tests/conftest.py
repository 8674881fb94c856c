"""Shared fixtures: deterministic seeding and small model builders used across test files."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

# Tests never write to the user's cache, and plans do not depend on this machine's
# measured speed: the planner's cost model uses fixed constants in tests.
os.environ.setdefault("NDCOMPILE_CACHE_DIR", tempfile.mkdtemp(prefix="ndcompile-tests-"))
os.environ.setdefault(
    "NDCOMPILE_MACHINE",
    json.dumps({"matmul_gflops": 150.0, "bandwidth_gbs": 12.0, "op_overhead_us": 5.0}),
)

import pytest
import torch
from torch import nn

from ndcompile.layers.ndlinear import NdLinear


@pytest.fixture(autouse=True, scope="session")
def _one_thread():  # type: ignore[no-untyped-def]
    """Small tensors run fastest (and most predictably) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator for explicit sampling."""
    return torch.Generator().manual_seed(1234)


class ImageHead(nn.Module):
    """``(B, H, W, C)`` image flattened into a Linear, then a small head (the paper's case)."""

    def __init__(self, hwc: tuple[int, int, int] = (4, 6, 3), hidden: int = 32) -> None:
        super().__init__()
        self.fc = nn.Linear(hwc[0] * hwc[1] * hwc[2], hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(torch.flatten(x, 1))))


class TokenMLP(nn.Module):
    """A per-token transformer MLP on ``(*, C)``."""

    def __init__(self, dim: int = 64, hidden: int = 96) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class NdStack(nn.Module):
    """Reference ``ndlinear.NdLinear`` layers (both orders) around one of ours."""

    def __init__(self) -> None:
        super().__init__()
        import ndlinear

        self.ref = ndlinear.NdLinear((4, 6, 3), (5, 2, 3))
        self.ours = NdLinear((5, 2, 3), (3, 4, 2), rank=2)
        self.ref2 = ndlinear.NdLinear((3, 4, 2), (2, 3, 2), transform_outer=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ref2(torch.tanh(self.ours(self.ref(x))))


class NoLinear(nn.Module):
    """A model with nothing to convert."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.scale) + 1.0


ModelFactory = Callable[..., nn.Module]


def _factory(cls: type[nn.Module]) -> ModelFactory:
    def make(*args: object, dtype: torch.dtype = torch.float32, **kwargs: object) -> nn.Module:
        return cls(*args, **kwargs).to(dtype)

    return make


@pytest.fixture
def image_head() -> ModelFactory:
    """Builds :class:`ImageHead` (input ``(B, 4, 6, 3)``)."""
    return _factory(ImageHead)


@pytest.fixture
def token_mlp() -> ModelFactory:
    """Builds :class:`TokenMLP` (input ``(B, T, 64)``)."""
    return _factory(TokenMLP)


@pytest.fixture
def nd_stack() -> ModelFactory:
    """Builds :class:`NdStack` (input ``(B, 4, 6, 3)``); skips without ``ndlinear``."""
    pytest.importorskip("ndlinear")
    return _factory(NdStack)


@pytest.fixture
def no_linear() -> ModelFactory:
    """Builds :class:`NoLinear` (input ``(*, 8)``)."""
    return _factory(NoLinear)


@pytest.fixture
def empty_pool():  # type: ignore[no-untyped-def]
    """The output-buffer pool (:mod:`ndcompile.ir.pages`) is empty before and after."""
    from ndcompile.ir import pages

    pages._POOL.storages.clear()
    yield
    pages._POOL.storages.clear()


@pytest.fixture
def small_buffers(monkeypatch: pytest.MonkeyPatch) -> int:
    """Pool buffers from 4 KiB up; returns an element count (float32) above that."""
    from ndcompile.ir import pages

    monkeypatch.setattr(pages, "MIN_BYTES", 1 << 12)
    monkeypatch.delenv("NDCOMPILE_POOL_MB", raising=False)
    return 2048


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Input files of the command tests: checkpoints of every kind, calibration data."""
    from cli_helpers import write_input_files

    return write_input_files(tmp_path_factory.mktemp("inputs"))


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ndcompile's caches live in this test's ``tmp_path`` (and plans use fixed costs)."""
    from reliability_models import isolate_ndcompile_env

    for key, value in isolate_ndcompile_env(tmp_path).items():
        monkeypatch.setenv(key, value)
