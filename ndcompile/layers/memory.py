"""Training memory of a layer: the bytes autograd saves, and the peak of live tensors.

:func:`saved_activation_bytes` runs a forward pass under
``torch.autograd.graph.saved_tensors_hooks`` and adds up the distinct storages
autograd keeps, leaving out the parameters (they are held anyway). Views share a
storage and count once, so a reshaped input is not counted twice.

:func:`peak_live_bytes` runs any work (a forward, a training step) under a
``TorchDispatchMode`` that adds up the storages every op creates while they are
alive: the peak of live tensor memory, as ``torch.cuda.max_memory_allocated``
reports it on a GPU, but on any device and independent of the allocator (a CPU
process's resident set also holds freed pages the allocator keeps).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ndcompile.ir.pages import pool_paused
from ndcompile.ir.tiled import PYTHON_IMPLS

__all__ = ["LiveMemory", "SavedTensors", "peak_live_bytes", "saved_activation_bytes"]


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


@dataclass
class LiveMemory:
    """Peak of live tensor memory during one call.

    Attributes:
        peak_bytes: Most bytes of tensors created during the call alive at once.
        end_bytes: Bytes of those still alive when the call returned (its results,
            gradients stored in ``.grad``).
        peak_op: The op whose result reached the peak.
        output: The call's result.
    """

    peak_bytes: int = 0
    end_bytes: int = 0
    peak_op: str = ""
    output: Any = None


class _LiveTracker(TorchDispatchMode):
    """Adds up the storages ops create and subtracts them when they are freed."""

    def __init__(self, existing: set[int]) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.existing = existing
        self.current = 0
        self.stats = LiveMemory()

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        impl = PYTHON_IMPLS.get(func._schema.name)
        if impl is not None:  # trace through ndcompile's custom ops: their temporaries count
            with self:
                out = impl(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self.live or key in self.existing:
                continue
            self.live[key] = nbytes
            self.current += nbytes
            weakref.finalize(storage, self._freed, key)
            if self.current > self.stats.peak_bytes:
                self.stats.peak_bytes = self.current
                self.stats.peak_op = str(func)
        return out


def peak_live_bytes(fn: Callable[[], Any], existing: Iterable[Tensor] = ()) -> LiveMemory:
    """Run ``fn()`` and measure the peak of the tensor memory it allocates.

    Every storage an op returns counts from its creation until it is freed; views
    count once, and storages of ``existing`` (parameters, inputs) not at all.

    Args:
        fn: The work, e.g. ``lambda: model(x).sum().backward()``.
        existing: Tensors alive before the call whose storages must not count.

    Returns:
        The peak, the bytes still alive at the end, the op at the peak, ``fn``'s result.

    Example:
        >>> layer = torch.nn.Linear(8, 4)
        >>> x = torch.randn(2, 8)
        >>> peak_live_bytes(lambda: layer(x), layer.parameters()).peak_bytes
        32
    """
    tracker = _LiveTracker({t.untyped_storage().data_ptr() for t in existing})
    # A pooled storage outlives the tensors made from it: measure without the pool.
    with pool_paused(), tracker:
        tracker.stats.output = fn()
    tracker.stats.end_bytes = tracker.current
    return tracker.stats
