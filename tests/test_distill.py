"""Tests of ndcompile.distill: layer-wise and whole-model distillation after factorization."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import ndcompile
from ndcompile.compress.distill import LayerStats, distill
from ndcompile.errors import NdCompileError
from ndcompile.layers.ndlinear import NdLinear

ROOT = Path(__file__).resolve().parents[1]


class MLP(nn.Module):
    """``(B, 8, 8)`` digits -> 64 -> 64 -> 10."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


@pytest.fixture(scope="module")
def digits() -> dict:
    """A digits MLP trained for 20 epochs (seeded), with its train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    tr, te = train_test_split(range(len(y)), test_size=0.25, random_state=0, stratify=y)
    x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        for idx in torch.randperm(len(y_tr), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
    model.eval()
    return {"model": model, "x_tr": x_tr, "y_tr": y_tr, "x_te": x_te, "y_te": y_te}


def _factorize(model: nn.Module, x: Tensor, rank: int = 2) -> nn.Module:
    return ndcompile.convert(
        model, x, mode="factorize", rank=rank, skip_larger=False, shapes={"head": ((8, 8), (2, 5))}
    )


def test_factorize_then_distill_recovers_accuracy(digits: dict) -> None:
    # Measured (seed 0): dense 96.9% test accuracy; rank-2 factorization 16.9%; after
    # layer-wise distillation 24.2% (held-out layer errors fc1/fc2/head 0.83/0.67/0.76
    # -> 0.46/0.30/0.087); after 400 whole-model steps 94.9% (held-out logit error
    # 0.73 -> 0.14).
    dense, x_tr = digits["model"], digits["x_tr"]
    x_te, y_te = digits["x_te"], digits["y_te"]
    gm = _factorize(dense, x_tr)
    dense_acc, converted_acc = _accuracy(dense, x_te, y_te), _accuracy(gm, x_te, y_te)
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    report = distill(
        gm, dense, list(x_tr.split(128)), whole_model=True, whole_model_steps=400, progress=False
    )
    assert [e.name for e in report.layers] == ["fc1", "fc2", "head"]
    for entry in report.layers:
        assert entry.error_after < 0.9 * entry.error_before, entry
        assert entry.method == "als+adam" and entry.error_source == "heldout"
    whole = report.whole_model
    assert whole is not None and whole.loss == "kl"  # the head's output: logits
    assert whole.loss_after < 0.5 * whole.loss_before
    final_acc = _accuracy(gm, x_te, y_te)
    assert final_acc >= dense_acc - 0.04
    assert final_acc > converted_acc + 0.5
    # the original is untouched
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in state.items())
    assert not any(m._forward_pre_hooks for m in dense.modules())
    assert "fc1" in str(report) and "whole model" in str(report)
    assert report.to_dict()["layers"][0]["name"] == "fc1"


def test_reported_layer_errors_are_real(digits: dict) -> None:
    """Errors come from Gram statistics; check them against the held-out rows directly."""
    dense, x_tr = digits["model"], digits["x_tr"]
    gm = _factorize(dense, x_tr, rank=1)
    batches = list(x_tr.split(100))
    held = torch.cat(batches[::10])  # holdout=0.1: every 10th batch, from the first

    def layer_error() -> float:
        h = torch.relu(dense.fc1(held.flatten(1)))
        with torch.no_grad():
            ref = dense.fc2(h)
            got = gm.fc2(h)  # module surgery: NdLinear(flat=True) takes (*, 64)
        return float((ref - got).norm() / ref.norm())

    before = layer_error()
    report = distill(gm, dense, batches, steps=30, whole_model=False, progress=False)
    entry = report.layer("fc2")
    assert entry.error_before == pytest.approx(before, rel=1e-4)
    assert entry.error_after == pytest.approx(layer_error(), rel=1e-4)
    assert entry.rows_heldout == len(held) and entry.rows_seen == len(x_tr)
    assert entry.accumulator == "gram" and entry.accumulator_shape == (64, 64)


def _stream(batches: int, rows: int, width: int, alive: list[int]) -> Iterator[Tensor]:
    """Distinct activation batches from one random block; records older batches still alive."""
    base = torch.randn(rows, width, generator=torch.Generator().manual_seed(0))
    refs: list[weakref.ref] = []
    for i in range(batches):
        alive.append(sum(r() is not None for r in refs))
        batch = base.roll(i, dims=1) * (1 + 0.01 * i)
        refs.append(weakref.ref(batch))
        yield batch
        del batch


def test_layerwise_statistics_stay_bounded_on_a_long_stream() -> None:
    """100k rows of a 4096-wide input, streamed: only a reservoir is kept, never the rows."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(4096, 16))
    gm = ndcompile.convert(
        original,
        torch.randn(2, 4096),
        mode="factorize",
        rank=1,
        shapes={"0": ((64, 64), (4, 4))},
        output="graph",
    )
    alive: list[int] = []
    cap = 1024
    report = distill(
        gm,
        original,
        _stream(100, 1000, 4096, alive),
        steps=5,
        reservoir_rows=cap,
        whole_model=False,
        progress=False,
    )
    entry = report.layers[0]
    assert entry.accumulator == "reservoir"
    assert entry.accumulator_shape == (cap, 4096)
    assert entry.rows_seen == 100_000 and entry.rows_heldout == 10_000
    assert max(alive) <= 1  # at most the batch being consumed is still referenced
    assert entry.error_after <= entry.error_before


def test_gram_statistics_are_exact() -> None:
    x = torch.randn(300, 12, dtype=torch.float64)
    stats = LayerStats(12, "gram", cap=0)
    for chunk in x.split(70):
        stats.add(chunk.reshape(-1, 2, 12))  # leading dims are rows
    gram, row_sum, n = stats.finalize()  # type: ignore[misc]
    torch.testing.assert_close(gram, x.T @ x)
    torch.testing.assert_close(row_sum, x.sum(0))
    assert n == 300 and stats.shape == (12, 12)


def test_reservoir_sample() -> None:
    rows = torch.arange(500, dtype=torch.float32)[:, None].repeat(1, 3)
    small = LayerStats(3, "reservoir", cap=600)
    small.add(rows)  # fewer rows than the cap: all of them, in order
    torch.testing.assert_close(small.sample[:500], rows)  # type: ignore[index]

    def sample(seed: int) -> Tensor:
        stats = LayerStats(3, "reservoir", cap=50, seed=seed)
        for chunk in rows.split(37):
            stats.add(chunk)
        assert stats.rows == 500
        return stats.sample[:, 0]  # type: ignore[index]

    kept = sample(0)
    assert torch.equal(kept, sample(0)) and not torch.equal(kept, sample(1))
    assert len(set(kept.tolist())) == 50  # distinct rows of the stream
    assert kept.max() > 100  # later rows do get in
    means = torch.stack([sample(s).mean() for s in range(40)])
    assert abs(float(means.mean()) - 249.5) < 20  # uniform over the stream


class HybridHolder(nn.Module):
    """A "converted" model built by hand: NdLinear layers at the original's names."""

    def __init__(self, bias: bool | str, lowrank: int) -> None:
        super().__init__()
        self.fc = NdLinear((4, 8), (4, 6), rank=1, bias=bias, lowrank=lowrank)


@pytest.mark.parametrize(
    ("bias", "lowrank", "method"),
    [(True, 0, "als+adam"), (True, 3, "als+adam"), (False, 2, "als+adam"), ("modes", 0, "adam")],
)
def test_layer_kinds(bias: bool | str, lowrank: int, method: str) -> None:
    torch.manual_seed(1)
    original = nn.Sequential()
    original.add_module("fc", nn.Linear(32, 24, bias=bias is not False))
    holder = HybridHolder(bias, lowrank)
    data = [torch.randn(40, 32) @ torch.randn(32, 32) for _ in range(10)]
    report = distill(holder, original, data, steps=50, whole_model=False, progress=False)
    entry = report.layer("fc")
    assert entry.method == method
    assert entry.error_after < entry.error_before


def test_kl_whole_model_with_a_generator(digits: dict) -> None:
    dense, x_tr = digits["model"], digits["x_tr"]
    gm = _factorize(dense, x_tr, rank=1)
    report = distill(
        gm,
        dense,
        (b for b in x_tr.split(128)),
        layerwise=False,
        whole_model=True,
        steps=40,
        loss="kl",
        progress=False,
    )
    assert report.layers == [] and report.whole_model is not None
    assert report.whole_model.loss == "kl" and report.whole_model.steps >= 10
    assert report.whole_model.error_after < report.whole_model.error_before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "l1"}, "unknown loss"),
        ({"holdout": 1.0}, "holdout must be"),
        ({"accumulate": "all"}, "unknown accumulate"),
        ({"train": "some"}, "unknown train"),
        ({"layerwise": False, "whole_model": False}, "nothing to do"),
    ],
)
def test_bad_options(kwargs: dict, match: str, digits: dict) -> None:
    gm = _factorize(digits["model"], digits["x_tr"][:4], rank=1)
    with pytest.raises(NdCompileError, match=match):
        distill(gm, digits["model"], [digits["x_tr"][:8]], progress=False, **kwargs)


def test_bad_inputs(digits: dict) -> None:
    dense, x = digits["model"], digits["x_tr"][:8]
    with pytest.raises(NdCompileError, match="same module"):
        distill(dense, dense, [x], progress=False)
    with pytest.raises(NdCompileError, match="no NdLinear layer"):
        distill(MLP(), dense, [x], progress=False)
    gm = _factorize(dense, x, rank=1)
    with pytest.raises(NdCompileError, match="all held out"):
        distill(gm, dense, [x], progress=False)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    distill(gm, dense, [x, x], holdout=0.0, steps=0, whole_model=False, progress=False)
    assert set(before) == set(gm.state_dict())


def test_example_smoke() -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import compress_encoder
    finally:
        sys.path.pop(0)
    rows = compress_encoder.main(
        epochs=1,
        dim=16,
        hidden=32,
        layers=1,
        budgets=(0.25,),
        steps=5,
        whole_model_steps=5,
        verbose=False,
    )
    assert [r["layers"] for r in rows] == [
        "dense",
        "25%, MLP, kronecker",
        "25%, MLP, best at budget",
        "25%, all Linears, kronecker",
    ]
    assert all(isinstance(r["acc distilled %"], float) for r in rows[1:])
    share = float(rows[3]["params"].split("(")[1].rstrip("%)"))
    assert 0 < share <= 25.0


def test_budget_ranks_share_the_budget_across_every_linear() -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import compress_encoder
    finally:
        sys.path.pop(0)
    model = compress_encoder.Encoder(dim=32, hidden=64, layers=1, heads=2)
    x = torch.randn(4, 8, 8)
    dense = sum(
        p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()
    )
    with pytest.raises(ValueError, match="rank 1 everywhere"):
        compress_encoder.budget_ranks(model, x, 0.05)
    for budget in (0.15, 0.3):
        ranks = compress_encoder.budget_ranks(model, x, budget)
        linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        assert set(ranks) == linears
        converted = ndcompile.convert(model, x, mode="fresh", rank=ranks, min_features=8)
        params = sum(p.numel() for p in converted.parameters()) - sum(
            p.numel() for n, p in model.named_parameters() if not _in_linear(model, n)
        )
        assert params <= budget * dense
        # one more term on any layer would break the budget
        assert all(
            params + sum(a * b for a, b in zip(*_modes(converted, n), strict=True)) > budget * dense
            for n in ranks
        )


def _in_linear(model: nn.Module, name: str) -> bool:
    owner = name.rpartition(".")[0]
    return isinstance(model.get_submodule(owner), nn.Linear) if owner else False


def _modes(model: nn.Module, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    layer = model.get_submodule(name)
    return tuple(layer.in_shape), tuple(layer.out_shape)
