"""Compress a small transformer encoder at a parameter budget, then distil.

A 2-layer encoder (d=64, MLP 64 -> 256 -> 64, 4 heads, own attention and MLP
blocks built from ``nn.Linear``) is trained on scikit-learn's 8x8 digits, each image
row a token. At 20% and 10% of the dense parameters its Linears are replaced by

* MLP only: the nearest Kronecker sum of the largest rank within the budget
  (``ndcompile.convert(..., mode="factorize", include=["*mlp*"], rank=R)``);
* MLP only: the best form at the budget among Kronecker, low-rank and Kronecker +
  low-rank hybrids (:func:`ndcompile.compress.hybrid_layers.budget_layer`);
* every Linear (embedding, attention q/k/v/out projections, MLP and head): Kronecker
  sums whose per-layer ranks share the budget (:func:`budget_ranks`: the layer
  furthest below its share gets the next term while the total fits),

all fitted on calibration activations. The table shows the test accuracy right
after conversion, after layer-wise distillation alone
(``ndcompile.distill(c, m, calibration, whole_model=False)``, on a copy) and after
``ndcompile.distill(c, m, calibration)`` at its defaults (layer-wise, then whole
model), then the same on ``(inputs, labels)`` batches with ``task_weight=1.0`` (a
cross-entropy on the labels added to the distillation loss), and the relative error
of the test logits against the dense model's. The params column counts weights and
biases of the layers in scope.

Run::

    python examples/compress_encoder.py             # defaults, about a minute on one CPU thread
    python examples/compress_encoder.py --budgets 0.2 --epochs 10
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from typing import Any

import torch
from digits_ndlinear import accuracy, digits_split, markdown_table, train
from torch import Tensor, nn

import ndcompile
from ndcompile.compress.hybrid_layers import budget_layer
from ndcompile.compress.kronecker_shapes import kronecker_params, plan_mode_shapes
from ndcompile.compress.layer_fits import capture_grams
from ndcompile.frontend.sites import LinearSite, find_linear_sites
from ndcompile.frontend.trace import propagate_shapes, trace
from ndcompile.passes import (
    dead_code_elimination,
    rewrite_ndlinear,
)
from ndcompile.report import LayerReport, report_of

__all__ = ["Encoder", "budget_convert", "budget_ranks", "main"]


class MLP(nn.Module):
    """``fc2(gelu(fc1(x)))`` per token."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention, then the MLP."""

    def __init__(self, dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden)

    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        att = nn.functional.scaled_dot_product_attention(
            self._split(self.q(h)), self._split(self.k(h)), self._split(self.v(h))
        )
        x = x + self.proj(att.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """``(B, 8, 8)`` digits, rows as tokens -> 10 logits."""

    def __init__(self, dim: int = 64, hidden: int = 256, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.zeros(8, dim))
        self.blocks = nn.ModuleList([Block(dim, hidden, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


def budget_convert(
    model: nn.Module, example: Tensor, *, budget: float, include: list[str], calibration: list
) -> torch.fx.GraphModule:
    """Replace the selected Linears by the best form at ``budget`` (activation-aware).

    The same pipeline as ``ndcompile.convert(mode="factorize")`` with
    :func:`ndcompile.compress.hybrid_layers.budget_layer` as the layer factory.
    """
    gm = trace(copy.deepcopy(model))
    propagate_shapes(gm, (example,))
    sites = find_linear_sites(gm, include=include)
    names = [s.name for s in sites if s.convertible]
    grams = capture_grams(gm, names, calibration)
    entries: dict[str, LayerReport] = {}

    def make_layer(site: LinearSite) -> ndcompile.NdLinear:
        entries[site.name] = LayerReport(name=site.name)
        return budget_layer(
            site, entries[site.name], budget=budget, optimizer="auto", gram=grams[site.name]
        )

    rewrite_ndlinear(gm, sites, make_layer)
    dead_code_elimination(gm)
    gm.entries = entries  # type: ignore[assignment]
    return gm


def _params(model: nn.Module, scope: str) -> int:
    """Weights and biases of the MLP layers (``"mlp"``) or of every Linear-like layer."""
    if scope == "mlp":
        return sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    return sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, (nn.Linear, ndcompile.NdLinear))
        for p in m.parameters()
    )


def budget_ranks(model: nn.Module, example: Tensor, budget: float) -> dict[str, int]:
    """Per-layer Kronecker ranks for every Linear, at ``budget`` of their parameters in all.

    Every layer starts at rank 1 (on the modes ``convert`` plans for it); then the
    layer whose parameters are the smallest fraction of its dense ones gets one more
    term, as long as the total (factors and biases) stays within ``budget`` of the
    dense Linears' weights and biases.

    Raises:
        ValueError: A layer is left dense, or rank 1 everywhere exceeds the budget.
    """
    report = report_of(ndcompile.convert(model, example, mode="fresh", rank=1, min_features=8))
    layers = [e for e in report.layers if e.status == "converted"]
    if len(layers) != len(report.layers):
        skipped = [(e.name, e.reason) for e in report.layers if e.status != "converted"]
        raise ValueError(f"layers left dense: {skipped}")
    term = {e.name: kronecker_params(e.in_shape or (), e.out_shape or (), 1) for e in layers}
    bias = {e.name: e.params_after - term[e.name] for e in layers}
    ranks = {e.name: 1 for e in layers}
    dense = sum(e.params_before for e in layers)
    total = sum(e.params_after for e in layers)
    if total > budget * dense:
        raise ValueError(f"rank 1 everywhere takes {total / dense:.1%} of the parameters")
    while True:
        fits = [e for e in layers if total + term[e.name] <= budget * dense]
        if not fits:
            return ranks
        e = min(fits, key=lambda e: (bias[e.name] + ranks[e.name] * term[e.name]) / e.params_before)
        ranks[e.name] += 1
        total += term[e.name]


def _rank_range(ranks: dict[str, int]) -> str:
    low, high = min(ranks.values()), max(ranks.values())
    return str(low) if low == high else f"{low}..{high}"


def _kronecker_rank(dim: int, hidden: int, budget: float) -> int:
    """Largest Kronecker rank whose fc1 factors fit ``budget`` of the dense weight."""
    modes_in, modes_out = plan_mode_shapes(dim, 2), plan_mode_shapes(hidden, 2)
    assert modes_in is not None and modes_out is not None
    return max(1, math.floor(budget * dim * hidden / kronecker_params(modes_in, modes_out, 1)))


def main(
    *,
    epochs: int = 20,
    dim: int = 64,
    hidden: int = 256,
    layers: int = 2,
    budgets: tuple[float, ...] = (0.2, 0.1),
    steps: int | None = None,
    whole_model_steps: int | None = None,
    lr: float = 3e-3,
    seed: int = 0,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Train the encoder, compress it at each budget, distil; print and return the table."""
    start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = digits_split(0)
    torch.manual_seed(seed)
    dense = Encoder(dim, hidden, layers)
    train(dense, x_tr, y_tr, epochs=epochs, lr=lr, seed=seed)
    calibration = list(x_tr.split(128))
    labels = list(zip(calibration, y_tr.split(128), strict=True))
    with torch.no_grad():
        reference = dense(x_te)

    def logit_error(model: nn.Module) -> float:
        """Relative error of the test logits against the dense model's."""
        with torch.no_grad():
            return ndcompile.relative_error(reference, model(x_te))

    rows: list[dict[str, Any]] = [
        {
            "layers": "dense",
            "form": "-",
            "params": f"MLP {_params(dense, 'mlp')}, all {_params(dense, 'all')}",
            "acc factorized %": round(100 * accuracy(dense, x_te, y_te), 2),
            "acc + layer-wise %": "-",
            "acc distilled %": "-",
            "+ labels %": "-",
            "logit err factorized": "-",
            "logit err + layer-wise": "-",
            "logit err distilled": "-",
        }
    ]
    include = ["*mlp*"]
    for budget in budgets:
        rank = _kronecker_rank(dim, hidden, budget)
        kron = ndcompile.convert(
            dense, x_tr[:8], mode="factorize", include=include, rank=rank, calibration=calibration
        )
        hybrid = budget_convert(
            dense, x_tr[:8], budget=budget, include=include, calibration=calibration
        )
        chosen = sorted(
            {
                f"{entry.extra['chosen_form']} R={hybrid.get_submodule(name).rank}"
                f"+k={entry.extra['lowrank']}"
                for name, entry in hybrid.entries.items()
            }
        )
        ranks = budget_ranks(dense, x_tr[:8], budget)
        every = ndcompile.convert(
            dense,
            x_tr[:8],
            mode="factorize",
            rank=ranks,
            min_features=8,
            calibration=calibration,
        )
        for label, scope, form, gm in (
            ("MLP, kronecker", "mlp", f"kronecker R={rank}", kron),
            ("MLP, best at budget", "mlp", ", ".join(chosen), hybrid),
            ("all Linears, kronecker", "all", f"kronecker R={_rank_range(ranks)}", every),
        ):
            converted_acc, converted_err = accuracy(gm, x_te, y_te), logit_error(gm)
            layerwise = copy.deepcopy(gm)
            ndcompile.distill(
                layerwise, dense, calibration, steps=steps, whole_model=False, progress=False
            )
            layerwise_acc, layerwise_err = accuracy(layerwise, x_te, y_te), logit_error(layerwise)
            labelled = copy.deepcopy(gm)
            for model, data, weight in ((gm, calibration, 0.0), (labelled, labels, 1.0)):
                ndcompile.distill(
                    model,
                    dense,
                    data,
                    steps=steps,
                    whole_model_steps=whole_model_steps,
                    task_weight=weight,
                    progress=False,
                )
            share = _params(gm, scope) / _params(dense, scope)
            rows.append(
                {
                    "layers": f"{round(100 * budget)}%, {label}",
                    "form": form,
                    "params": f"{_params(gm, scope)} ({100 * share:.1f}%)",
                    "acc factorized %": round(100 * converted_acc, 2),
                    "acc + layer-wise %": round(100 * layerwise_acc, 2),
                    "acc distilled %": round(100 * accuracy(gm, x_te, y_te), 2),
                    "+ labels %": round(100 * accuracy(labelled, x_te, y_te), 2),
                    "logit err factorized": round(converted_err, 4),
                    "logit err + layer-wise": round(layerwise_err, 4),
                    "logit err distilled": round(logit_error(gm), 4),
                }
            )
    if verbose:
        print(
            f"digits rows as tokens: encoder d={dim}, MLP {hidden}, {layers} layers, trained "
            f"{epochs} epochs (Adam lr {lr}); distillation steps: layer-wise "
            f"{steps or 'default'}, whole-model {whole_model_steps or 'default'}; seed {seed}; "
            f"{time.perf_counter() - start:.0f} s"
        )
        print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.1])
    parser.add_argument("--steps", type=int, default=None, help="layer-wise steps")
    parser.add_argument(
        "--whole-model-steps", type=int, default=None, help="default: until converged"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    main(
        epochs=args.epochs,
        budgets=tuple(args.budgets),
        steps=args.steps,
        whole_model_steps=args.whole_model_steps,
        seed=args.seed,
    )
