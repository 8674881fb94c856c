"""Quickstart: convert a small image classifier's dense layers into NdLinear contractions.

Run with ``python examples/quickstart.py``.
"""

from __future__ import annotations

import torch
from torch import nn

import ndcompile


class ImageMLP(nn.Module):
    """An MLP over 32x32x3 images: the first Linear sees a flattened (H, W, C) input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32 * 32 * 3, 1024)
        self.fc2 = nn.Linear(1024, 512)
        self.head = nn.Linear(512, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(images, 1)  # (B, 32, 32, 3) -> (B, 3072): modes (32, 32, 3)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.head(x)


def main() -> torch.nn.Module:
    """Convert, print the report, run and train the converted model for a few steps."""
    torch.manual_seed(0)
    model = ImageMLP()
    images = torch.randn(8, 32, 32, 3)

    converted = ndcompile.convert(model, images, mode="fresh")
    print(converted.report)
    print()
    print("fc1 contraction plan:")
    print(converted.report.layer("fc1").plan)

    labels = torch.randint(0, 10, (8,))
    opt = torch.optim.Adam(converted.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(converted(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"\ntraining the converted model: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"any batch size works: {tuple(converted(torch.randn(3, 32, 32, 3)).shape)}")
    return converted


if __name__ == "__main__":
    main()
