"""Tests for ndcompile.passes.find_linear: Linear sites and the modes of their inputs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from ndcompile.errors import NdCompileError
from ndcompile.frontend.sites import LinearSite, find_linear_sites, order_like
from ndcompile.frontend.trace import propagate_shapes, trace


def sites_of(model: nn.Module, *inputs: torch.Tensor, **kw) -> dict[str, LinearSite]:
    gm = trace(model)
    propagate_shapes(gm, inputs)
    return {s.name: s for s in find_linear_sites(gm, **kw)}


class Flattened(nn.Module):
    """``(B, H, W, C)`` merged into the feature dim by one of several ops."""

    def __init__(self, merge: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.merge = merge
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 8 * 3, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.merge(self, x))


MERGES = {
    "torch.flatten": lambda m, x: torch.flatten(x, 1),
    "Tensor.flatten": lambda m, x: x.flatten(1),
    "nn.Flatten": lambda m, x: m.flat(x),
    "view": lambda m, x: x.view(x.shape[0], -1),
    "reshape": lambda m, x: x.reshape(x.size(0), 96),
    "torch.reshape": lambda m, x: torch.reshape(x, (-1, 96)),
}


@pytest.mark.parametrize("merge", list(MERGES), ids=list(MERGES))
def test_flatten_structure_found(merge: str) -> None:
    site = sites_of(Flattened(MERGES[merge]), torch.randn(2, 4, 8, 3))["fc"]
    assert site.convertible
    assert site.source == "graph"
    assert site.in_shape == (4, 8, 3)
    assert site.out_shape is not None and len(site.out_shape) == 3
    assert torch.Size(site.out_shape).numel() == 32
    assert site.rows == 2


def test_channels_last_permute_then_flatten() -> None:
    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(96, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
            return self.fc(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1))

    assert sites_of(Conv(), torch.randn(2, 3, 4, 8))["fc"].in_shape == (4, 8, 3)


def test_singleton_dims_are_not_modes() -> None:
    model = Flattened(MERGES["torch.flatten"])
    model.fc = nn.Linear(64, 32)
    site = sites_of(model, torch.randn(2, 1, 8, 8))["fc"]
    assert (site.source, site.in_shape) == ("graph", (8, 8))


def test_merging_batch_dims_gives_no_graph_modes() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B*T, C)
            return self.fc(x.reshape(-1, 64))

    site = sites_of(Tokens(), torch.randn(2, 5, 64))["fc"]
    assert (site.source, site.in_shape, site.rows) == ("factored", (8, 8), 10)


def test_plain_linear_is_factored(token_mlp) -> None:
    model = nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768))
    sites = sites_of(model, torch.randn(2, 3, 768))
    assert (sites["0"].source, sites["0"].in_shape, sites["0"].out_shape) == (
        "factored",
        (24, 32),
        (48, 64),
    )
    assert (sites["2"].in_shape, sites["2"].out_shape) == ((48, 64), (24, 32))
    assert sites["0"].rows == 6


@pytest.mark.parametrize(
    ("in_features", "out_features", "reason"),
    [
        (97, 64, "in_features=97 cannot be split"),
        (64, 97, "out_features=97 cannot be split"),
        (8, 64, "too small"),
    ],
)
def test_unsplittable_sizes_are_skipped_with_reason(in_features, out_features, reason) -> None:
    model = nn.Sequential(nn.Linear(in_features, out_features))
    site = sites_of(model, torch.randn(2, in_features))["0"]
    assert not site.convertible
    assert site.in_shape is None
    assert reason in site.skip_reason


def test_n_modes_option() -> None:
    site = sites_of(nn.Sequential(nn.Linear(512, 64)), torch.randn(2, 512), n_modes=3)["0"]
    assert site.in_shape == (8, 8, 8) and site.out_shape == (4, 4, 4)


def test_order_like() -> None:
    assert order_like((12, 16, 16), (32, 32, 3)) == (16, 16, 12)
    assert order_like((2, 3), (5, 4)) == (3, 2)


# -------------------------------------------------------------------- overrides


def test_override_is_used(token_mlp) -> None:
    sites = sites_of(token_mlp(), torch.randn(2, 64), shapes={"fc1": ((4, 16), (6, 16))})
    assert (sites["fc1"].source, sites["fc1"].in_shape, sites["fc1"].out_shape) == (
        "override",
        (4, 16),
        (6, 16),
    )
    assert sites["fc2"].source == "factored"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (((8, 9), (8, 12)), "products of the modes"),
        (((8, 8), (8, 13)), "does not match Linear"),
        (((8, 8), (96,)), "different numbers of modes"),
        ((8, 8), "not a pair"),
    ],
)
def test_bad_override_raises(token_mlp, spec, match: str) -> None:
    with pytest.raises(NdCompileError, match=match) as info:
        sites_of(token_mlp(), torch.randn(2, 64), shapes={"fc1": spec})
    assert info.value.layer == "fc1"


def test_override_of_unknown_layer_raises(token_mlp) -> None:
    with pytest.raises(NdCompileError, match=r"\['fc3'\]"):
        sites_of(token_mlp(), torch.randn(2, 64), shapes={"fc3": ((8, 8), (8, 8))})


# ------------------------------------------------------------- include/exclude


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"fc1": nn.Linear(32, 64), "fc2": nn.Linear(64, 32)}) for _ in range(2)
        )
        self.head = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block["fc2"](torch.relu(block["fc1"](x)))
        return self.head(x)


ALL = {"blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"}


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (None, None, ALL),
        (["blocks.*"], None, ALL - {"head"}),
        (["*.fc1"], None, {"blocks.0.fc1", "blocks.1.fc1"}),
        (None, ["blocks.1.*", "head"], {"blocks.0.fc1", "blocks.0.fc2"}),
        (["blocks.*"], ["*fc2"], {"blocks.0.fc1", "blocks.1.fc1"}),
        (["nothing"], None, set()),
    ],
)
def test_include_exclude_globs(include, exclude, expected) -> None:
    sites = sites_of(Blocks(), torch.randn(2, 32), include=include, exclude=exclude)
    assert set(sites) == ALL
    assert {n for n, s in sites.items() if s.convertible} == expected
    for name in ALL - expected:
        assert sites[name].skip_reason == "not selected by include/exclude"


# ------------------------------------------------------------------------- ties


def test_linear_called_twice_is_one_site() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))

    sites = sites_of(Twice(), torch.randn(3, 32))
    assert list(sites) == ["fc"]
    assert len(sites["fc"].nodes) == 2
    assert sites["fc"].convertible


def test_weight_tied_to_embedding_is_skipped() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(64, 32)
            self.mix = nn.Linear(32, 32)
            self.out = nn.Linear(32, 64, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.out(self.mix(self.emb(tokens)))

    sites = sites_of(Tied(), torch.randint(0, 64, (2, 5)))
    assert sites["mix"].convertible
    assert not sites["out"].convertible
    assert "tied" in sites["out"].skip_reason and "emb.weight" in sites["out"].skip_reason


# --------------------------------------------------------------- opaque modules


def test_linears_inside_reference_ndlinear_are_listed(nd_stack) -> None:
    sites = sites_of(nd_stack(), torch.randn(2, 4, 6, 3))
    inner = [n for n in sites if n.startswith("ref.align_layers.")]
    assert len(inner) == 3
    for name in inner:
        assert not sites[name].convertible
        assert "not called directly" in sites[name].skip_reason


def test_linear_inside_multihead_attention_is_listed() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(32, 4, batch_first=True)
            self.fc = nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.att(x, x, x)[0])

    sites = sites_of(Attention(), torch.randn(2, 5, 32))
    assert sites["fc"].convertible
    assert "att.out_proj" in sites
    assert not sites["att.out_proj"].convertible
    assert "att" in sites["att.out_proj"].skip_reason
