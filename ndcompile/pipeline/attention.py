"""Unfuse ``nn.MultiheadAttention`` so its projections are layers module surgery can replace.

``nn.MultiheadAttention`` applies its query/key/value projections with ``F.linear``
on one fused parameter, so there is no module to swap. Before planning, ``convert``
runs on a private copy of the model in which every ``nn.MultiheadAttention`` whose
projections are selected is a :class:`~ndcompile.layers.attention.ProjectedAttention`
(the same function, with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` child
layers). The copy shares every other tensor with the user's model, so it costs the
attention weights only; the user's model is never modified. :func:`ndcompile.load`
splits the same layers before it installs the saved ones.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from ndcompile.frontend.sites import is_selected
from ndcompile.layers.attention import ProjectedAttention

__all__ = [
    "PROJECTIONS",
    "has_attention",
    "sharing_copy",
    "split_attention",
    "split_names",
    "split_saved",
    "with_split_attention",
]

#: Child layers of a :class:`ProjectedAttention`, by name.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _attention_modules(model: nn.Module) -> list[str]:
    """Names of the ``nn.MultiheadAttention`` children (not subclasses, not the root)."""
    return [n for n, m in model.named_modules() if n and type(m) is nn.MultiheadAttention]


def split_attention(model: nn.Module, wanted: Callable[[str], bool]) -> list[str]:
    """Replace, in place, each ``nn.MultiheadAttention`` of ``model`` that ``wanted`` accepts.

    Its hooks move to the replacement (it is called with the same arguments and
    returns the same results).

    Args:
        model: The model to edit (a copy of the user's).
        wanted: Called with each attention module's qualified name.

    Returns:
        The names replaced.
    """
    from ndcompile.pipeline.surgery import install_layer  # surgery imports this module

    names = [n for n in _attention_modules(model) if wanted(n)]
    for name in names:
        mha = model.get_submodule(name)
        assert isinstance(mha, nn.MultiheadAttention)
        install_layer(model, name, ProjectedAttention.from_multihead(mha))
    return names


def split_names(
    include: Sequence[str] | None, exclude: Sequence[str] | None
) -> Callable[[str], bool]:
    """A ``wanted`` for :func:`split_attention`: any of the layer's projections is selected.

    Args:
        include: Glob patterns of layer names to convert (default: all).
        exclude: Glob patterns of layer names to leave alone.
    """
    return lambda name: any(is_selected(f"{name}.{p}", include, exclude) for p in PROJECTIONS)


def has_attention(model: nn.Module) -> bool:
    """Whether ``model`` holds an ``nn.MultiheadAttention`` :func:`split_attention` can split."""
    return bool(_attention_modules(model))


def sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares ``model``'s parameters and buffers.

    Nothing large is copied; :func:`split_attention` can then swap the copy's
    attention layers (it copies their weights into the new layers) without touching
    ``model``.
    """
    memo: dict[int, object] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        memo[id(tensor)] = tensor
    return copy.deepcopy(model, memo)


def split_saved(model: nn.Module, tensor_names: Iterable[str]) -> list[str]:
    """Split, in place, the attention layers whose projections a saved state names.

    A state saved from a converted model names ``<attention>.q_proj.*`` where the
    conversion split ``<attention>``; :func:`ndcompile.load` splits the same layers of
    the original architecture before it installs the saved ones.

    Args:
        model: A copy of the original architecture.
        tensor_names: The saved state's keys.

    Returns:
        The names replaced.
    """
    prefixes = {key.rsplit(".q_proj.", 1)[0] for key in tensor_names if ".q_proj." in key}
    return split_attention(model, lambda name: name in prefixes)


def with_split_attention(
    model: nn.Module,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    notes: list[str],
) -> nn.Module:
    """``model``, or a :func:`sharing_copy` of it with its selected attention layers split.

    Args:
        model: The user's model (not modified).
        include: Glob patterns of layer names to convert (default: all).
        exclude: Glob patterns of layer names to leave alone.
        notes: Where a note naming the split layers is appended.

    Returns:
        The copy when a layer was split, else ``model`` itself.
    """
    if not has_attention(model):
        return model
    work = sharing_copy(model)
    names = split_attention(work, split_names(include, exclude))
    if not names:
        return model
    shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    notes.append(
        f"nn.MultiheadAttention {shown} run as ProjectedAttention, with separate "
        "q_proj/k_proj/v_proj/out_proj layers, so each projection can be converted"
    )
    return work
