"""Building blocks of the random models the property-based tests convert (fuzzing specs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["OpSpec", "Permute", "Unflatten", "build_random_model"]


class Unflatten(nn.Module):
    """Split the last dim into ``sizes`` (traceable: no shape unpacking)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self.sizes = tuple(int(s) for s in sizes)

    def forward(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, self.sizes)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


class Permute(nn.Module):
    """Permute the feature dims of a ``(B, *features)`` tensor (batch stays first)."""

    def __init__(self, perm: Sequence[int]) -> None:
        super().__init__()
        self.dims = (0, *(int(p) + 1 for p in perm))

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


#: One step of a random model: ``(op, *arguments)``; see :func:`build_random_model`.
OpSpec = tuple[Any, ...]


def build_random_model(spec: Sequence[OpSpec]) -> nn.Sequential:
    """Build the model a fuzzing spec describes (parameters from the global RNG).

    Ops (all act on ``(B, *features)``):

    - ``("linear", in, out, bias)``: ``nn.Linear`` on the last dim;
    - ``("relu",)``; ``("flatten",)``: merge all feature dims (``nn.Flatten``);
    - ``("unflatten", sizes)``: split the last dim; ``("permute", perm)``: permute features;
    - ``("ndlinear", in_modes, out_modes, rank, bias)``: ndcompile's NdLinear on the
      trailing ``len(in_modes)`` dims;
    - ``("reference", in_modes, out_modes, transform_outer)``: the reference package's
      ``ndlinear.NdLinear`` on all feature dims.
    """
    from ndcompile.layers.ndlinear import NdLinear

    layers: list[nn.Module] = []
    for op, *args in spec:
        if op == "linear":
            layers.append(nn.Linear(args[0], args[1], bias=args[2]))
        elif op == "relu":
            layers.append(nn.ReLU())
        elif op == "flatten":
            layers.append(nn.Flatten())
        elif op == "unflatten":
            layers.append(Unflatten(args[0]))
        elif op == "permute":
            layers.append(Permute(args[0]))
        elif op == "ndlinear":
            layers.append(NdLinear(args[0], args[1], rank=args[2], bias=args[3]))
        elif op == "reference":
            import ndlinear

            layers.append(ndlinear.NdLinear(tuple(args[0]), tuple(args[1]), args[2]))
        else:
            raise ValueError(f"unknown op {op!r}")
    return nn.Sequential(*layers)
