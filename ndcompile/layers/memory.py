"""Training memory of a layer: the bytes autograd saves for the backward pass.

:func:`saved_activation_bytes` runs a forward pass under
``torch.autograd.graph.saved_tensors_hooks`` and adds up the distinct storages
autograd keeps, leaving out the parameters (they are held anyway). Views share a
storage and count once, so a reshaped input is not counted twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["SavedTensors", "saved_activation_bytes"]


@dataclass
class SavedTensors:
    """What autograd saved during one forward pass.

    Attributes:
        activation_bytes: Bytes of the distinct saved storages that are not parameters.
        parameter_bytes: Bytes of the saved storages that are parameters.
        shapes: Shape of every saved activation tensor, in the order saved.
        output: The forward pass's result.
    """

    activation_bytes: int = 0
    parameter_bytes: int = 0
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    output: Any = None


def _storage_key(t: Tensor) -> tuple[int, str]:
    return t.untyped_storage().data_ptr(), str(t.device)


def saved_activation_bytes(
    fn: Callable[[], Any], parameters: Iterable[Tensor] = ()
) -> SavedTensors:
    """Run ``fn()`` and measure what autograd saves for backward.

    Args:
        fn: The forward pass, e.g. ``lambda: layer(x)``.
        parameters: Tensors whose storages count as parameters, not activations.

    Returns:
        The saved bytes and shapes, and ``fn``'s output (backward still works).

    Example:
        >>> layer = torch.nn.Linear(8, 4)
        >>> x = torch.randn(2, 8, requires_grad=True)
        >>> saved_activation_bytes(lambda: layer(x), layer.parameters()).activation_bytes
        64
    """
    params = {_storage_key(p) for p in parameters}
    seen: dict[tuple[int, str], int] = {}
    result = SavedTensors()

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        nbytes = t.untyped_storage().nbytes()
        if key in params:
            if key not in seen:
                result.parameter_bytes += nbytes
        else:
            result.shapes.append(tuple(t.shape))
            if key not in seen:
                result.activation_bytes += nbytes
        seen[key] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result.output = fn()
    return result
