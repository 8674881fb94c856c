"""Building an NdLinear: argument checks, dense-matched initialisation, reference import."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ndcompile.errors import NdCompileError

if TYPE_CHECKING:
    from ndcompile.layers.ndlinear import NdLinear

__all__ = ["BiasKind", "check_layer_arguments", "from_reference_layer", "init_like_linear"]

BiasKind = bool | str


def check_layer_arguments(
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    rank: int,
    bias: BiasKind,
    tile: int | str,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate the tile, mode, rank and bias arguments of :class:`NdLinear`.

    Returns:
        ``in_shape`` and ``out_shape`` as tuples of ints.

    Raises:
        NdCompileError: Naming the first invalid argument.
    """
    if not (tile == "auto" or (isinstance(tile, int) and tile >= 0)):
        raise NdCompileError(f"NdLinear tile must be 'auto' or an int >= 0, got {tile!r}")
    ins, outs = tuple(int(d) for d in in_shape), tuple(int(h) for h in out_shape)
    if len(ins) != len(outs) or not ins or min(ins + outs) < 1:
        raise NdCompileError(
            f"NdLinear needs as many input as output modes, all >= 1; got in_shape="
            f"{ins}, out_shape={outs}",
            hint="give one output size per input mode, e.g. (32, 32, 3) -> (16, 16, 3)",
        )
    if rank < 1:
        raise NdCompileError(f"NdLinear rank must be >= 1, got {rank}")
    if bias not in (True, False, "modes"):
        raise NdCompileError(f"NdLinear bias must be True, False or 'modes', got {bias!r}")
    if bias == "modes" and rank != 1:
        raise NdCompileError(
            f"bias='modes' is defined for rank 1 only (got rank {rank})",
            hint="use bias=True (a full bias) with rank > 1",
        )
    return ins, outs


def init_like_linear(layer: NdLinear) -> None:
    """Initialise ``layer`` like the equivalent dense ``nn.Linear`` (variance-matched).

    Each factor is uniform with a bound chosen so the Kronecker sum has the
    same per-entry variance as ``nn.Linear``'s Kaiming-uniform weight. Meta
    parameters are left alone.
    """
    if any(f.is_meta for f in layer.factors):
        return
    n = len(layer.factors)
    # Var(W) = R * prod Var(W_k); nn.Linear: bound b -> Var = b^2 / 3 with b^2 = 1 / fan_in.
    target_var = 1.0 / (3.0 * layer.in_features)
    per_mode_var = (target_var / layer.rank) ** (1.0 / n)
    bound = math.sqrt(3.0 * per_mode_var)
    with torch.no_grad():
        for f in layer.factors:
            f.uniform_(-bound, bound)
        fan_bound = 1.0 / math.sqrt(layer.in_features)
        if layer.bias is not None:
            layer.bias.uniform_(-fan_bound, fan_bound)
        if layer.lowrank_u is not None and layer.lowrank_v is not None:
            layer.lowrank_u.zero_()
            layer.lowrank_v.uniform_(-fan_bound, fan_bound)
        if layer.mode_biases is not None:
            for k, b in enumerate(layer.mode_biases):
                b.uniform_(-1.0, 1.0).mul_(1.0 / math.sqrt(layer.in_shape[k]))


def from_reference_layer(cls: type[NdLinear], layer: nn.Module, *, optimizer: str) -> NdLinear:
    """Build ``cls`` from a reference layer, for :meth:`NdLinear.from_reference`.

    Args:
        cls: The class of the new layer.
        layer: The reference layer, its per-mode ``align_layers``.
        optimizer: For the new layer's plan.

    Returns:
        A ``cls`` with the reference's weights and per-mode biases.
    """
    linears = list(getattr(layer, "align_layers", []))
    if not linears or not all(isinstance(m, nn.Linear) for m in linears):
        raise NdCompileError(
            f"{type(layer).__name__} is not a reference NdLinear (no align_layers)"
        )
    has_bias = [m.bias is not None for m in linears]
    if any(has_bias) != all(has_bias):
        raise NdCompileError("reference NdLinear mixes modes with and without bias")
    ref = linears[0].weight
    new = cls(
        [m.in_features for m in linears],
        [m.out_features for m in linears],
        rank=1,
        bias="modes" if all(has_bias) else False,
        optimizer=optimizer,
        device=ref.device,
        dtype=ref.dtype,
    )
    n = len(linears)
    new.mode_order = (
        tuple(range(n)) if getattr(layer, "transform_outer", True) else tuple(reversed(range(n)))
    )
    with torch.no_grad():
        for f, m in zip(new.factors, linears, strict=True):
            f.copy_(m.weight.unsqueeze(0))
        if new.mode_biases is not None:
            for b, m in zip(new.mode_biases, linears, strict=True):
                b.copy_(m.bias)
    return new
