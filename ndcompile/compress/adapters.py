"""NdLinear-LoRA adapters on a whole model: freeze, merge, save and load them.

A model converted with ``convert(model, x, mode="adapter")`` holds one
:class:`~ndcompile.compress.adapter_linear.NdAdapterLinear` per adapted Linear
(installed by :mod:`ndcompile.compress.adapter_sites`).
:func:`freeze_all_but_adapters` leaves only the adapter factors trainable,
:func:`merge_adapters` folds the updates back into plain ``nn.Linear`` layers, and
:func:`adapter_state_dict` / :func:`load_adapter_state_dict` save and restore the
adapter weights alone.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ndcompile.compress.adapter_linear import NdAdapterLinear
from ndcompile.errors import NdCompileError
from ndcompile.passes.fx.emit import set_submodule

__all__ = [
    "adapter_state_dict",
    "count_trainable",
    "freeze_all_but_adapters",
    "load_adapter_state_dict",
    "merge_adapters",
]


def count_trainable(model: nn.Module) -> int:
    """Parameters of ``model`` with ``requires_grad`` (tied ones counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _adapter_layers(model: nn.Module) -> dict[str, NdAdapterLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NdAdapterLinear)}


def freeze_all_but_adapters(model: nn.Module) -> nn.Module:
    """Set ``requires_grad`` on the adapter factors of ``model`` and clear it elsewhere.

    Modifies ``model`` in place (meant for a converted copy) and returns it.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in _adapter_layers(model).values():
        layer.adapter.requires_grad_(True)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every adapter folded into a plain ``nn.Linear``.

    Each :class:`~ndcompile.compress.adapter_linear.NdAdapterLinear` becomes
    ``nn.Linear`` with weight ``W + alpha * sum_r A1[r] ⊗ ... ⊗ AN[r]`` and the base
    bias, installed under the same name (so a converted ``fx.GraphModule`` keeps
    working). The merged layers' parameters have ``requires_grad=True``; others keep
    their flags.
    ``model`` is not modified.

    Raises:
        NdCompileError: If ``model`` has no adapters.
    """
    if not _adapter_layers(model):
        raise NdCompileError(
            f"{type(model).__name__} has no NdAdapterLinear layers to merge",
            hint="convert with ndcompile.convert(model, x, mode='adapter') first",
        )
    merged = copy.deepcopy(model)
    for name, layer in _adapter_layers(merged).items():
        set_submodule(merged, name, layer.merged())
    return merged


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter factors of ``model``, under their ``state_dict`` keys.

    Like ``state_dict()``, the values are detached tensors sharing storage with
    the parameters (``torch.save`` it, or ``clone`` to snapshot).
    """
    out: dict[str, Tensor] = {}
    for name, layer in _adapter_layers(model).items():
        prefix = f"{name}.adapter." if name else "adapter."
        for key, value in layer.adapter.state_dict().items():
            out[prefix + key] = value
    return out


def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Copy adapter weights saved by :func:`adapter_state_dict` into ``model``.

    Keys must match exactly (strict) and every tensor must have the adapter's
    shape; the base weights are not touched.

    Raises:
        NdCompileError: On missing or unexpected keys, or a shape mismatch (a
            different rank or mode split); names the keys and shapes.
    """
    own = adapter_state_dict(model)
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise NdCompileError(
            f"adapter state_dict keys do not match the model: missing {missing}, "
            f"unexpected {unexpected}",
            layer=type(model).__name__,
            hint="load a state_dict saved from a model converted with the same include= "
            "and layer names",
        )
    for key, target in own.items():
        value = state_dict[key]
        if tuple(value.shape) != tuple(target.shape):
            raise NdCompileError(
                f"adapter tensor {key!r} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(target.shape)}",
                layer=key.rpartition(".adapter.")[0] or None,
                hint="convert with the same rank= and shapes= the adapters were trained with",
            )
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(state_dict[key])
