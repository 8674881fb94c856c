"""Dense MLP vs NdLinear MLP trained from scratch on scikit-learn's 8x8 digits.

The NdLinear model is the dense model passed through
``ndcompile.convert(model, x, mode="fresh", rank=R)``: every large Linear becomes a
freshly initialised rank-R NdLinear (the first one acts on the 8x8 image modes kept
by the flatten, the hidden one on a 16x16 split of 256 features). A dense MLP
narrowed to the same parameter count as the rank-1 model is the fair baseline. All
models get identical training (same seed, data order, optimizer and epochs).

Run::

    python examples/digits_ndlinear.py            # defaults, about 30 s on one CPU thread
    python examples/digits_ndlinear.py --epochs 5
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

import ndcompile

__all__ = [
    "DigitsMLP",
    "accuracy",
    "build_models",
    "digits_split",
    "main",
    "markdown_table",
    "train",
]

Split = tuple[Tensor, Tensor, Tensor, Tensor]


def digits_split(seed: int = 0, test_size: float = 0.25) -> Split:
    """Digits as ``(N, 8, 8)`` float images in [0, 1]: ``x_train, y_train, x_test, y_test``."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_size, random_state=seed, stratify=y.numpy()
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


class DigitsMLP(nn.Module):
    """``(B, 8, 8) -> flatten -> hidden -> hidden -> 10`` with ReLU."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x.flatten(1)))
        h = torch.relu(self.fc2(h))
        return self.head(h)


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> list[float]:
    """Adam + cross-entropy on the trainable parameters; returns seconds per epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    times = []
    model.train()
    for _ in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(y), generator=gen)
        for k in range(0, len(y), batch_size):
            batch = order[k : k + batch_size]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - start)
    model.eval()
    return times


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy."""
    return float((model(x).argmax(-1) == y).float().mean())


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of equal keys as a markdown table."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _dense_params(hidden: int) -> int:
    return (64 + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * 10


def build_models(
    hidden: int, ranks: tuple[int, ...], seed: int, example: Tensor, *, verbose: bool = False
) -> list[tuple[str, nn.Module]]:
    """The dense MLP, its NdLinear versions and a param-matched narrow dense MLP."""
    torch.manual_seed(seed)
    models: list[tuple[str, nn.Module]] = [("dense MLP", DigitsMLP(hidden))]
    for rank in ranks:
        torch.manual_seed(seed)
        nd = ndcompile.convert(DigitsMLP(hidden), example, mode="fresh", rank=rank)
        if verbose and rank == ranks[0]:
            print(nd.report, end="\n\n")
        models.append((f"NdLinear rank {rank}", nd))
    if ranks:
        budget = sum(p.numel() for p in models[1][1].parameters())
        small = max((h for h in range(1, hidden) if _dense_params(h) <= budget), default=0)
        if small:
            torch.manual_seed(seed)
            models.append((f"dense MLP, hidden {small} (param-matched)", DigitsMLP(small)))
    return models


def main(
    *,
    epochs: int = 40,
    hidden: int = 256,
    ranks: tuple[int, ...] = (1, 4),
    lr: float = 3e-3,
    seeds: tuple[int, ...] = (0, 1, 2),
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Train the dense MLP and its NdLinear versions; print and return the table rows.

    The train/test split is fixed (seed 0); each of ``seeds`` sets the initialisation
    and the data order, identical across models. Accuracy is the mean (and standard
    deviation) over seeds.
    """
    x_tr, y_tr, x_te, y_te = digits_split(0)
    results: dict[str, dict[str, Any]] = {}
    for seed in seeds:
        models = build_models(hidden, ranks, seed, x_tr[:8], verbose=verbose and seed == seeds[0])
        for name, model in models:
            times = train(model, x_tr, y_tr, epochs=epochs, lr=lr, seed=seed)
            res = results.setdefault(
                name, {"params": sum(p.numel() for p in model.parameters()), "acc": [], "t": []}
            )
            res["acc"].append(100 * accuracy(model, x_te, y_te))
            res["t"].append(sum(times) / len(times))
    rows = []
    for name, res in results.items():
        acc = torch.tensor(res["acc"], dtype=torch.float64)
        rows.append(
            {
                "model": name,
                "params": res["params"],
                "test acc %": round(float(acc.mean()), 2),
                "± std": round(float(acc.std()), 2) if len(acc) > 1 else 0.0,
                "ms / epoch": round(1000 * sum(res["t"]) / len(res["t"]), 1),
            }
        )
    if verbose:
        print(
            f"digits 8x8, {len(y_tr)} train / {len(y_te)} test, {epochs} epochs, "
            f"Adam lr {lr}, seeds {list(seeds)}"
        )
        print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    main(epochs=args.epochs, hidden=args.hidden, ranks=tuple(args.ranks), seeds=tuple(args.seeds))
