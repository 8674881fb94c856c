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
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

__all__ = [
    "FIXED_MACHINE",
    "Block",
    "ChannelsLastHead",
    "DataDependent",
    "FlattenHead",
    "KeywordCall",
    "NestedUntraceable",
    "NoGradBranch",
    "PlainDataDependent",
    "PlainMLP",
    "SharedEmbedding",
    "SmallBlock",
    "SmallUntraceable",
    "TiedTwice",
    "TokenMLP",
    "WithAttention",
    "assert_same_state",
    "dense_equivalent",
    "isolate_ndcompile_env",
    "linear_names",
    "rel_error",
    "state",
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


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s state_dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """The two state dicts have the same keys and equal tensors."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


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
