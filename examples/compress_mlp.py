"""Compress a trained digits MLP with ``convert(mode="factorize")`` and fine-tune the factors.

A dense MLP (64 -> 256 -> 256 -> 10) is trained on scikit-learn's 8x8 digits. Each of
its Linears is replaced by the nearest rank-R Kronecker sum of its trained weight
(Van Loan–Pitsianis): ``fc1`` on the 8x8 image modes, ``fc2`` on 16x16 -> 16x16, and
the head through a ``shapes=`` override (256 -> 10 as 16x16 -> 2x5). The table shows
the accuracy right after conversion (trained weights have little Kronecker
structure, so it drops), after ``ndcompile.distill(converted, dense, x_train)`` at its
defaults (no labels: the dense model is the teacher), and after a short fine-tune of
the factors on the labels, next to the same architecture trained from a fresh init
for the same number of epochs.

Run::

    python examples/compress_mlp.py                 # defaults, about 30 s on one CPU thread
    python examples/compress_mlp.py --ranks 1 4 --finetune-epochs 5
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from digits_ndlinear import DigitsMLP, accuracy, digits_split, markdown_table, train
from torch import nn

import ndcompile
from ndcompile.compress.kronecker_shapes import plan_mode_shapes

__all__ = ["main"]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(
    *,
    epochs: int = 40,
    finetune_epochs: int = 10,
    ranks: tuple[int, ...] = (1, 2, 4, 8),
    hidden: int = 256,
    lr: float = 3e-3,
    finetune_lr: float = 3e-3,
    seed: int = 0,
    distill: bool = True,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Train, factorize at each rank, distil and fine-tune; print and return the table rows."""
    x_tr, y_tr, x_te, y_te = digits_split(0)
    torch.manual_seed(seed)
    dense = DigitsMLP(hidden)
    train(dense, x_tr, y_tr, epochs=epochs, lr=lr, seed=seed)
    dense_acc = 100 * accuracy(dense, x_te, y_te)
    head_modes = plan_mode_shapes(hidden, 2)
    shapes = {"head": (head_modes, (2, 5))} if head_modes else None
    rows: list[dict[str, Any]] = [
        {
            "model": "dense (trained)",
            "params": _params(dense),
            "fc2 weight err": "-",
            "logit err": "-",
            "acc converted %": round(dense_acc, 2),
            "acc distilled %": "-",
            "acc fine-tuned %": "-",
            "acc fresh init %": "-",
        }
    ]
    for rank in ranks:
        gm = ndcompile.convert(
            dense, x_tr, mode="factorize", rank=rank, shapes=shapes, skip_larger=False
        )
        if verbose and rank == ranks[0]:
            print(gm.report, end="\n\n")
        converted_acc = 100 * accuracy(gm, x_te, y_te)
        distilled_acc: float | str = "-"
        if distill:
            student = ndcompile.convert(
                dense, x_tr, mode="factorize", rank=rank, shapes=shapes, skip_larger=False
            )
            ndcompile.distill(student, dense, x_tr, progress=False)
            distilled_acc = round(100 * accuracy(student, x_te, y_te), 2)
        train(gm, x_tr, y_tr, epochs=finetune_epochs, lr=finetune_lr, seed=seed)
        # the same architecture from a fresh init, trained as long as the fine-tune
        torch.manual_seed(seed)
        fresh = ndcompile.convert(
            DigitsMLP(hidden), x_tr[:8], mode="fresh", rank=rank, shapes=shapes
        )
        train(fresh, x_tr, y_tr, epochs=finetune_epochs, lr=lr, seed=seed)
        fc2_err = gm.report.layer("fc2").weight_rel_error
        rows.append(
            {
                "model": f"factorized rank {rank}",
                "params": _params(gm),
                "fc2 weight err": "-" if fc2_err is None else round(fc2_err, 3),
                "logit err": round(gm.report.output_rel_error or 0.0, 3),
                "acc converted %": round(converted_acc, 2),
                "acc distilled %": distilled_acc,
                "acc fine-tuned %": round(100 * accuracy(gm, x_te, y_te), 2),
                "acc fresh init %": round(100 * accuracy(fresh, x_te, y_te), 2),
            }
        )
    if verbose:
        print(
            f"digits 8x8: dense trained {epochs} epochs (Adam lr {lr}); factors fine-tuned "
            f"{finetune_epochs} epochs (lr {finetune_lr}); fresh init trained {finetune_epochs} "
            f"epochs (lr {lr}); seed {seed}"
        )
        print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    main(
        epochs=args.epochs,
        finetune_epochs=args.finetune_epochs,
        ranks=tuple(args.ranks),
        hidden=args.hidden,
        seed=args.seed,
    )
