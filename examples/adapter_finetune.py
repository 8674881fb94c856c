"""Fine-tune a small transformer with NdLinear adapters vs LoRA vs full fine-tuning.

Each 8x8 digit is read as a sequence of 8 row tokens of 8 features. A pre-norm
transformer (own blocks: ``nn.MultiheadAttention`` + a Linear-GELU-Linear MLP) is
pretrained on digits 0-4 (task A), then fine-tuned on digits 5-9 relabelled 0-4
(task B) in several ways, all with Adam, the same epochs and the same data order:

- head only (linear probe);
- full fine-tuning;
- LoRA (a minimal ``B @ A`` update, ``B = 0`` at start) on the MLP Linears;
- NdLinear adapters from ``ndcompile.convert(model, x, mode="adapter", rank=R,
  include=["blocks.*.mlp.*"])`` on the same Linears (``ΔW = A1 ⊗ A2`` summed over
  R terms, last factor zero at start).

In every adapter variant the classifier head is trainable too, and the adapters
use a higher learning rate than full fine-tuning (as usual for LoRA). Both methods adapt
the MLP Linears only (``include=`` selects them; ndcompile could also adapt the
attention's q/k/v/out projections, which it splits out of ``nn.MultiheadAttention``).

Run::

    python examples/adapter_finetune.py              # defaults, about 90 s on one CPU thread
    python examples/adapter_finetune.py --nd-ranks 1 2 5 --lora-ranks 1 4
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
from ndcompile.compress.adapters import count_trainable, merge_adapters

__all__ = ["Block", "LoRALinear", "RowTransformer", "add_lora", "build_variants", "main"]


class Block(nn.Module):
    """Pre-norm transformer block: attention and a two-layer MLP, each residual."""

    def __init__(self, d_model: int, heads: int, d_ff: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class RowTransformer(nn.Module):
    """Classify ``(B, 8, 8)`` images as sequences of 8 row tokens."""

    def __init__(
        self, d_model: int = 64, heads: int = 4, d_ff: int = 256, depth: int = 2, classes: int = 5
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.pos = nn.Parameter(torch.randn(1, 8, d_model) * 0.02)
        self.blocks = nn.ModuleList([Block(d_model, heads, d_ff) for _ in range(depth)])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


class LoRALinear(nn.Module):
    """Frozen ``base`` plus ``B @ A`` (rank ``r``); ``B`` starts at zero."""

    def __init__(self, base: nn.Linear, r: int) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T


def add_lora(model: RowTransformer, r: int) -> RowTransformer:
    """A copy with everything frozen but the head, and LoRA on every MLP Linear."""
    model = copy.deepcopy(model).requires_grad_(False)
    for block in model.blocks:
        for k, layer in enumerate(block.mlp):
            if isinstance(layer, nn.Linear):
                block.mlp[k] = LoRALinear(layer, r)
    model.head.requires_grad_(True)
    return model


def _task(x: Tensor, y: Tensor, classes: range) -> tuple[Tensor, Tensor]:
    keep = (y >= classes.start) & (y < classes.stop)
    return x[keep], y[keep] - classes.start


def build_variants(
    pretrained: RowTransformer,
    example: Tensor,
    lora_ranks: tuple[int, ...],
    nd_ranks: tuple[int, ...],
    *,
    verbose: bool = False,
) -> list[tuple[str, nn.Module, bool]]:
    """``(name, model, is_adapter)`` for every fine-tuning method."""
    probe = copy.deepcopy(pretrained).requires_grad_(False)
    probe.head.requires_grad_(True)
    variants = [("head only", probe, True), ("full fine-tuning", copy.deepcopy(pretrained), False)]
    variants += [(f"LoRA r={r}", add_lora(pretrained, r), True) for r in lora_ranks]
    for rank in nd_ranks:
        gm = ndcompile.convert(
            pretrained, example, mode="adapter", rank=rank, include=["blocks.*.mlp.*"]
        )
        gm.head.requires_grad_(True)
        if verbose and rank == nd_ranks[0]:
            print(gm.report, end="\n\n")
        variants.append((f"NdLinear adapter R={rank}", gm, True))
    return variants


def main(
    *,
    pretrain_epochs: int = 30,
    finetune_epochs: int = 30,
    lora_ranks: tuple[int, ...] = (1, 4),
    nd_ranks: tuple[int, ...] = (1, 5),
    d_model: int = 64,
    d_ff: int = 256,
    lr: float = 2e-3,
    adapter_lr: float = 1e-2,
    seeds: tuple[int, ...] = (0, 1, 2),
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Pretrain on task A, fine-tune on task B each way; print and return the table rows.

    Pretraining runs once (seed 0, learning rate ``lr``). Each of ``seeds`` sets the
    adapters' initialisation and the fine-tuning data order. Full fine-tuning uses
    ``lr``; the head-only, LoRA and NdLinear-adapter runs use ``adapter_lr``.
    """
    x_tr, y_tr, x_te, y_te = digits_split(0)
    a_tr, a_te = _task(x_tr, y_tr, range(0, 5)), _task(x_te, y_te, range(0, 5))
    b_tr, b_te = _task(x_tr, y_tr, range(5, 10)), _task(x_te, y_te, range(5, 10))
    torch.manual_seed(0)
    pretrained = RowTransformer(d_model=d_model, d_ff=d_ff)
    train(pretrained, *a_tr, epochs=pretrain_epochs, lr=lr, seed=0)
    if verbose:
        print(
            f"pretrained on digits 0-4: test acc {100 * accuracy(pretrained, *a_te):.2f}%, "
            f"on digits 5-9 before fine-tuning {100 * accuracy(pretrained, *b_te):.2f}%\n"
        )
    results: dict[str, dict[str, Any]] = {}
    merge_gap = 0.0
    for seed in seeds:
        torch.manual_seed(seed)
        variants = build_variants(
            pretrained, b_tr[0][:8], lora_ranks, nd_ranks, verbose=verbose and seed == seeds[0]
        )
        for name, model, is_adapter in variants:
            start = time.perf_counter()
            rate = adapter_lr if is_adapter else lr
            train(model, *b_tr, epochs=finetune_epochs, lr=rate, seed=seed)
            res = results.setdefault(
                name, {"trainable": count_trainable(model), "lr": rate, "acc": [], "s": []}
            )
            res["s"].append(time.perf_counter() - start)
            res["acc"].append(100 * accuracy(model, *b_te))
            if isinstance(model, torch.fx.GraphModule):
                with torch.no_grad():
                    gap = (merge_adapters(model)(b_te[0]) - model(b_te[0])).abs().max()
                merge_gap = max(merge_gap, float(gap))
    head = pretrained.head.weight.numel() + pretrained.head.bias.numel()
    rows = []
    for name, res in results.items():
        acc = torch.tensor(res["acc"], dtype=torch.float64)
        rows.append(
            {
                "method": name,
                "trainable params": res["trainable"],
                "excluding head": res["trainable"] - head,
                "lr": res["lr"],
                "task B test acc %": round(float(acc.mean()), 2),
                "± std": round(float(acc.std()), 2) if len(acc) > 1 else 0.0,
                "s / run": round(sum(res["s"]) / len(res["s"]), 1),
            }
        )
    if verbose:
        n_params = sum(p.numel() for p in pretrained.parameters())
        print(
            f"task A: digits 0-4 ({len(a_tr[1])} train), task B: digits 5-9 "
            f"({len(b_tr[1])} train / {len(b_te[1])} test); model params {n_params}; "
            f"{finetune_epochs} fine-tune epochs (Adam), seeds {list(seeds)}"
        )
        print(markdown_table(rows))
        print(f"\nmerge_adapters: max |logit difference| vs the adapter model {merge_gap:.1e}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=30)
    parser.add_argument("--lora-ranks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--nd-ranks", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    main(
        pretrain_epochs=args.pretrain_epochs,
        finetune_epochs=args.finetune_epochs,
        lora_ranks=tuple(args.lora_ranks),
        nd_ranks=tuple(args.nd_ranks),
        seeds=tuple(args.seeds),
    )
