"""Cancel inverse permutes, compose permute chains and drop needless ``contiguous``.

Before::

    transpose = x.transpose(1, 2);  transpose_1 = transpose.transpose(1, 2)
    contiguous = transpose_1.contiguous();  view = contiguous.view(-1, 8)
    matmul = torch.matmul(view, w)

After::

    reshape = x.reshape(-1, 8);  matmul = torch.matmul(reshape, w)

``contiguous`` is removed only when every user is a pure (non in-place) op that
accepts any strides; a ``view`` user becomes ``reshape``. A ``contiguous`` whose value
is returned by the graph is kept.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from ndcompile.frontend.trace import node_shape

__all__ = ["eliminate_transposes"]

_PERMUTES = {"permute", torch.permute}
_TRANSPOSES = {"transpose", "swapaxes", torch.transpose, torch.swapaxes}
_STRIDE_SENSITIVE = {"view", "data_ptr", "stride", "is_contiguous", "storage_offset", "numpy"}


def _perm_of(node: fx.Node) -> list[int] | None:
    """The permutation a permute/transpose node applies, or None."""
    shape = node_shape(node)
    if shape is None:
        return None
    n = len(shape)
    # Any: a malformed argument makes int() raise TypeError, which means "no permutation".
    args: tuple[Any, ...] = node.args
    try:
        if node.target in _PERMUTES:
            rest = args[1:] or (node.kwargs.get("dims"),)
            perm = list(rest[0]) if isinstance(rest[0], tuple | list) else list(rest)
            return [int(p) % n for p in perm]
        if node.target in _TRANSPOSES:
            d0, d1 = int(args[1]) % n, int(args[2]) % n
            perm = list(range(n))
            perm[d0], perm[d1] = perm[d1], perm[d0]
            return perm
    except (TypeError, IndexError):
        return None
    return None


def _is_layout(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    try:
        return node.target in _PERMUTES or node.target in _TRANSPOSES
    except TypeError:
        return False


def _safe_user(gm: fx.GraphModule, user: fx.Node) -> bool:
    if user.op == "output":
        return False
    if user.op == "call_module":
        return type(gm.get_submodule(cast(str, user.target))) is nn.Linear
    name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
    if not name or name.endswith("_") or name in _STRIDE_SENSITIVE - {"view"}:
        return False
    return user.op in ("call_function", "call_method")


def eliminate_transposes(gm: fx.GraphModule) -> PassResult:
    """Compose/cancel permute chains and remove ``contiguous`` calls that do nothing useful.

    Returns:
        ``PassResult(gm, modified)``.
    """
    modified = False
    graph = gm.graph
    for node in list(graph.nodes):
        if _is_layout(node):
            perm = _perm_of(node)
            src = node.args[0]
            if perm is None or not isinstance(src, fx.Node):
                continue
            if _is_layout(src) and len(src.users) == 1 and _perm_of(src) is not None:
                inner = _perm_of(src)
                assert inner is not None
                perm = [inner[p] for p in perm]
                src = src.args[0]
                modified = True
                with graph.inserting_before(node):
                    new = graph.call_method("permute", (src, tuple(perm)))
                new.meta.update(node.meta)
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                node = new
            if perm == list(range(len(perm))):
                node.replace_all_uses_with(src)
                graph.erase_node(node)
                modified = True
        elif node.op == "call_method" and node.target == "contiguous":
            if node.args[1:] or node.kwargs or not all(_safe_user(gm, u) for u in node.users):
                continue
            for user in list(node.users):
                if user.op == "call_method" and user.target == "view":
                    user.target = "reshape"
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            modified = True
    if modified:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
