"""Helpers shared by the dynamo-backend tests; importing it registers the ``ndcompile`` backend."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ndcompile.backends.dynamo import register_backend

__all__ = ["ROOT", "NdNet", "backend_compile", "capture", "tiled_calls"]

ROOT = Path(__file__).resolve().parents[1]
register_backend()


def backend_compile(model: nn.Module, reports: list | None = None, **options):
    """``torch.compile`` with the backend by name, collecting reports."""
    torch._dynamo.reset()
    if reports is not None:
        options["report"] = reports.append
    return torch.compile(model, backend="ndcompile", options=options)


def capture(model: nn.Module, *inputs: torch.Tensor):
    """The dynamo graph(s) and example inputs of ``model``, via a recording backend."""
    graphs = []

    def record(gm, example_inputs, **kwargs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=record)(*inputs)
    return graphs


def tiled_calls(gm: torch.fx.GraphModule) -> int:
    """How many ``ndcompile::tiled_contract`` calls ``gm`` makes."""
    target = torch.ops.ndcompile.tiled_contract.default
    return sum(node.target is target for node in gm.graph.nodes)


class NdNet(nn.Module):
    """Reference NdLinear layers (both mode orders) and a chain of Linears."""

    def __init__(self) -> None:
        super().__init__()
        import ndlinear

        self.nd1 = ndlinear.NdLinear((4, 6, 3), (5, 2, 3))
        self.nd2 = ndlinear.NdLinear((5, 2, 3), (3, 2, 4), transform_outer=False)
        self.fc1 = nn.Linear(24, 32)
        self.fc2 = nn.Linear(32, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.nd2(self.nd1(x)))
        return self.fc2(self.fc1(y.flatten(1)))
