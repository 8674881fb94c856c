"""Compress a small transformer encoder's MLPs at a parameter budget, then distil.

A 2-layer encoder (d=64, MLP 64 -> 256 -> 64, 4 heads, own attention and MLP
blocks built from ``nn.Linear``) is trained on scikit-learn's 8x8 digits, each image
row a token. Its MLP Linears are then replaced at 20% and 10% of their dense
parameters by

* the nearest Kronecker sum of the largest rank within the budget
  (``ndcompile.convert(..., mode="factorize", include=["*mlp*"], rank=R)``), and
* the best form at the budget among Kronecker, low-rank and Kronecker + low-rank
  hybrids (:func:`ndcompile.compress.hybrid.budget_layer`),

both fitted on calibration activations. The table shows the test accuracy right
after conversion, after layer-wise distillation and after whole-model
distillation (:func:`ndcompile.compress.distill.distill`), and the relative error of the
test logits against the dense model's.

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
from ndcompile.compress.distill import distill
from ndcompile.compress.hybrid import budget_layer
from ndcompile.compress.kronecker import kronecker_params, plan_mode_shapes
from ndcompile.compress.layer_fits import capture_grams
from ndcompile.frontend.sites import LinearSite, find_linear_sites
from ndcompile.frontend.trace import propagate_shapes, trace
from ndcompile.passes import (
    dead_code_elimination,
    rewrite_ndlinear,
)
from ndcompile.report import LayerReport

__all__ = ["Encoder", "budget_convert", "main"]


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
    :func:`ndcompile.compress.hybrid.budget_layer` as the layer factory.
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


def _mlp_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)


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
    steps: int = 200,
    whole_model_steps: int | None = None,
    lr: float = 3e-3,
    seed: int = 0,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Train the encoder, compress its MLPs at each budget, distil; print and return the table."""
    start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = digits_split(0)
    torch.manual_seed(seed)
    dense = Encoder(dim, hidden, layers)
    train(dense, x_tr, y_tr, epochs=epochs, lr=lr, seed=seed)
    calibration = list(x_tr.split(128))
    with torch.no_grad():
        reference = dense(x_te)

    def logit_error(model: nn.Module) -> float:
        """Relative error of the test logits against the dense model's."""
        with torch.no_grad():
            return ndcompile.relative_error(reference, model(x_te))

    rows: list[dict[str, Any]] = [
        {
            "MLP weights": "dense",
            "form": "-",
            "MLP params": _mlp_params(dense),
            "acc factorized %": round(100 * accuracy(dense, x_te, y_te), 2),
            "acc + layer-wise %": "-",
            "acc + whole-model %": "-",
            "logit err factorized": "-",
            "logit err + layer-wise": "-",
            "logit err + whole-model": "-",
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
        for label, form, gm in (
            ("kronecker", f"kronecker R={rank}", kron),
            ("best at budget", ", ".join(chosen), hybrid),
        ):
            converted_acc, converted_err = accuracy(gm, x_te, y_te), logit_error(gm)
            distill(gm, dense, calibration, steps=steps, whole_model=False, progress=False)
            layerwise_acc, layerwise_err = accuracy(gm, x_te, y_te), logit_error(gm)
            distill(
                gm,
                dense,
                calibration,
                layerwise=False,
                whole_model=True,
                whole_model_steps=whole_model_steps,
                progress=False,
            )
            rows.append(
                {
                    "MLP weights": f"{round(100 * budget)}%, {label}",
                    "form": form,
                    "MLP params": _mlp_params(gm),
                    "acc factorized %": round(100 * converted_acc, 2),
                    "acc + layer-wise %": round(100 * layerwise_acc, 2),
                    "acc + whole-model %": round(100 * accuracy(gm, x_te, y_te), 2),
                    "logit err factorized": round(converted_err, 4),
                    "logit err + layer-wise": round(layerwise_err, 4),
                    "logit err + whole-model": round(logit_error(gm), 4),
                }
            )
    if verbose:
        print(
            f"digits rows as tokens: encoder d={dim}, MLP {hidden}, {layers} layers, trained "
            f"{epochs} epochs (Adam lr {lr}); layer-wise distillation {steps} steps per layer, "
            f"whole-model {whole_model_steps or 'until converged'} steps; seed {seed}; "
            f"{time.perf_counter() - start:.0f} s"
        )
        print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.1])
    parser.add_argument("--steps", type=int, default=200)
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
