"""Per-op rules lifting FX nodes into :class:`~ndcompile.passes.regions.analysis.LinVal` s.

Rules are data: :data:`RULES` maps an op to a handler; a handler raises
``RegionError`` when the node does not fit (it then becomes a region leaf).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn

from ndcompile.ir.meta import NODE_SHAPE
from ndcompile.passes.regions.analysis import (
    EINSUMS,
    LINEARS,
    MATMULS,
    IndexFactory,
    LinVal,
    RegionError,
    Term,
    leaf_value,
    merged,
    multiply,
    regroup,
    unify,
)

__all__ = ["lift_op", "node_dyn"]

ValueOf = Callable[[Any], LinVal]


def node_dyn(node: fx.Node) -> tuple[int, ...]:
    """``meta[NODE_SHAPE]`` (``-1`` marks batch-varying dims)."""
    shape = node.meta.get(NODE_SHAPE)
    if shape is None:
        raise RegionError(f"no shape for {node.format_node()}")
    return tuple(shape)


def _nominal(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None:
        raise RegionError("no tensor_meta")
    return tuple(int(s) for s in meta.shape)


def _permute(val: LinVal, perm: list[int]) -> LinVal:
    n = len(val.dims)
    perm = [p % n for p in perm]
    if sorted(perm) != list(range(n)):
        raise RegionError("bad permutation")
    val.dims = [val.dims[p] for p in perm]
    val.moves += 1
    return val


def _lift_permute(node: fx.Node, value_of: ValueOf, f: IndexFactory) -> LinVal:
    val = value_of(node.args[0])
    rest = node.args[1:] or (node.kwargs.get("dims"),)
    perm = list(rest[0]) if isinstance(rest[0], tuple | list) else list(rest)
    return _permute(val, cast(list[int], perm))


def _lift_transpose(node: fx.Node, value_of: ValueOf, f: IndexFactory) -> LinVal:
    val = value_of(node.args[0])
    n = len(val.dims)
    if node.target in ("t", torch.t) or (len(node.args) == 1 and n <= 2):
        d0, d1 = 0, n - 1
    else:
        d0, d1 = cast(int, node.args[1]) % n, cast(int, node.args[2]) % n
    perm = list(range(n))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return _permute(val, perm)


def _lift_identity(node: fx.Node, value_of: ValueOf, f: IndexFactory) -> LinVal:
    val = value_of(node.args[0])
    val.moves += 1
    return val


def _lift_reshape(node: fx.Node, value_of: ValueOf, f: IndexFactory) -> LinVal:
    val = value_of(node.args[0])
    shape = node_dyn(node)
    regroup(val, _nominal(node), tuple(s == -1 for s in shape), f)
    return val


def _lift_expand(node: fx.Node, value_of: ValueOf, f: IndexFactory) -> LinVal:
    """``x.expand(B, ...)`` that only prepends broadcast dims (as ``bmm`` operands do)."""
    val = value_of(node.args[0])
    shape, dyn = _nominal(node), node_dyn(node)
    new = len(shape) - len(val.dims)
    if new < 0 or any(val.dim_size(k) != shape[new + k] for k in range(len(val.dims))):
        raise RegionError("expand of existing dims")
    lead = [
        (f.fresh(val.sizes, val.nominal, s, d == -1),)
        for s, d in zip(shape[:new], dyn[:new], strict=True)
    ]
    val.dims = [*lead, *val.dims]
    return val


def _matmul_values(a: LinVal, b: LinVal, f: IndexFactory) -> LinVal:
    vec_a, vec_b = len(a.dims) == 1, len(b.dims) == 1
    if vec_a:
        a.dims = [(), a.dims[0]]
    if vec_b:
        b.dims = [b.dims[0], ()]
    unify(a, len(a.dims) - 1, b, len(b.dims) - 2, f)
    k = a.dim_size(len(a.dims) - 1)
    batch_a, batch_b = a.dims[:-2], b.dims[:-2]
    n = max(len(batch_a), len(batch_b))
    batch: list[tuple[str, ...]] = []
    for pos in range(n):
        ka = pos - (n - len(batch_a))
        kb = pos - (n - len(batch_b))
        if ka < 0:
            batch.append(b.dims[kb])
            continue
        if kb < 0:
            batch.append(a.dims[ka])
            continue
        sa, sb = a.dim_size(ka), b.dim_size(kb)
        if sa == sb and sa != 1:
            unify(a, ka, b, kb, f)
            batch.append(a.dims[ka])
        elif sa == 1:
            batch.append(b.dims[kb])
        elif sb == 1:
            batch.append(a.dims[ka])
        else:
            raise RegionError("matmul batch dims do not broadcast")
    out = [*batch, a.dims[-2], b.dims[-1]]
    if vec_b:
        out.pop()
    if vec_a:
        out.pop(-2 if not vec_b else -1)
    val = merged(a, b, multiply(a, b), out, 0)
    val.flops += 2 * k * math.prod(val.nominal[i] for d in out for i in d)
    val.contractions += 1
    return val


def _lift_matmul(node: fx.Node, value_of: ValueOf, f: IndexFactory) -> LinVal:
    return _matmul_values(value_of(node.args[0]), value_of(node.args[1]), f)


def _linear(x: LinVal, w: LinVal, b: LinVal | None, f: IndexFactory) -> LinVal:
    if len(w.dims) != 2:
        raise RegionError("linear weight must be 2-D")
    w.dims = [w.dims[1], w.dims[0]]
    out = _matmul_values(x, w, f)
    return _add_values(out, b, 1.0, f) if b is not None else out


def _lift_linear(node: fx.Node, value_of: ValueOf, f: IndexFactory) -> LinVal:
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    b = value_of(bias) if bias is not None else None
    return _linear(value_of(node.args[0]), value_of(node.args[1]), b, f)


def _lift_linear_module(node: fx.Node, value_of: ValueOf, f: IndexFactory) -> LinVal:
    gm = node.graph.owning_module
    assert gm is not None  # regions are lifted from a GraphModule's graph
    mod = gm.get_submodule(cast(str, node.target))
    if type(mod) is not nn.Linear:
        raise RegionError("not a Linear")
    w = leaf_value(f"{node.target}.weight", tuple(mod.weight.shape), (False, False), f)
    b = None
    if mod.bias is not None:
        b = leaf_value(f"{node.target}.bias", tuple(mod.bias.shape), (False,), f)
    return _linear(value_of(node.args[0]), w, b, f)


def _lift_einsum(node: fx.Node, value_of: ValueOf, f: IndexFactory) -> LinVal:
    eq = node.args[0]
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], tuple | list):
        ops = tuple(ops[0])
    if not isinstance(eq, str) or "->" not in eq or "." in eq:
        raise RegionError("only explicit einsum equations are lifted")
    lhs, rhs = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != len(ops):
        raise RegionError("einsum operand count")
    vals = [value_of(op) for op in ops]
    letter: dict[str, tuple[int, int]] = {}
    for k, (term, val) in enumerate(zip(terms, vals, strict=True)):
        if len(set(term)) != len(term) or len(term) != len(val.dims):
            raise RegionError("einsum with repeated letters or rank mismatch")
        for pos, ch in enumerate(term):
            if ch in letter:
                j, p = letter[ch]
                unify(vals[j], p, val, pos, f)
            else:
                letter[ch] = (k, pos)
    acc = vals[0]
    for val in vals[1:]:
        acc = merged(acc, val, multiply(acc, val), acc.dims, 0)
    out = [vals[letter[ch][0]].dims[letter[ch][1]] for ch in rhs]
    acc.dims = out
    dims_all = {ch: vals[letter[ch][0]].dim_size(letter[ch][1]) for ch in letter}
    acc.flops += 2 * math.prod(dims_all.values())
    acc.contractions += 1
    return acc


def _add_values(a: LinVal, b: LinVal, sign: float, f: IndexFactory) -> LinVal:
    n = max(len(a.dims), len(b.dims))
    dims: list[tuple[str, ...]] = []
    for pos in range(n):
        ka, kb = pos - (n - len(a.dims)), pos - (n - len(b.dims))
        if ka < 0:
            dims.append(b.dims[kb])
        elif kb < 0:
            dims.append(a.dims[ka])
        elif a.dim_size(ka) == b.dim_size(kb) and a.dim_size(ka) != 1:
            unify(a, ka, b, kb, f)
            dims.append(a.dims[ka])
        elif b.dim_size(kb) == 1:
            dims.append(a.dims[ka])
        elif a.dim_size(ka) == 1:
            dims.append(b.dims[kb])
        else:
            raise RegionError("add operands do not broadcast")
    if len(a.terms) + len(b.terms) > 8:
        raise RegionError("too many terms")
    terms = a.terms + [Term(t.leaves, t.scale * sign) for t in b.terms]
    return merged(a, b, terms, dims, 0)


def _lift_add(node: fx.Node, value_of: ValueOf, f: IndexFactory) -> LinVal:
    if len(node.args) != 2 or node.kwargs:
        raise RegionError("add with alpha/out")
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        raise RegionError("adding a constant is affine")
    sign = -1.0 if node.target in (operator.sub, torch.sub, "sub") else 1.0
    return _add_values(value_of(a), value_of(b), sign, f)


def _lift_scale(node: fx.Node, value_of: ValueOf, f: IndexFactory) -> LinVal:
    if node.target in (operator.neg, torch.neg, "neg"):
        val, factor = value_of(node.args[0]), -1.0
    else:
        if len(node.args) != 2:
            raise RegionError("scale arity")
        a, b = node.args
        div = node.target in (operator.truediv, torch.div, "div")
        if isinstance(a, fx.Node) and isinstance(b, int | float) and not isinstance(b, bool):
            val, factor = value_of(a), (1.0 / b if div else float(b))
        elif isinstance(b, fx.Node) and isinstance(a, int | float) and not div:
            val, factor = value_of(b), float(a)
        else:
            raise RegionError("not a scalar scale")
    val.terms = [Term(t.leaves, t.scale * factor) for t in val.terms]
    return val


_PERMUTES = {"permute", torch.permute}
_TRANSPOSES = {"transpose", "t", "swapaxes", torch.transpose, torch.t, torch.swapaxes}
_IDENTITIES = {"contiguous"}
_RESHAPES = {
    "reshape",
    "view",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    torch.reshape,
    torch.flatten,
    torch.unflatten,
    torch.squeeze,
    torch.unsqueeze,
}
_ADDS = {operator.add, operator.sub, torch.add, torch.sub, "add", "sub"}
_SCALES = {
    operator.mul,
    operator.truediv,
    operator.neg,
    torch.mul,
    torch.div,
    torch.neg,
    "mul",
    "div",
    "neg",
}

RULES: list[tuple[set[Any], Callable[[fx.Node, ValueOf, IndexFactory], LinVal]]] = [
    (_PERMUTES, _lift_permute),
    (_TRANSPOSES, _lift_transpose),
    (_IDENTITIES, _lift_identity),
    (_RESHAPES, _lift_reshape),
    ({"expand"}, _lift_expand),
    (MATMULS | {"matmul", "mm", "bmm"}, _lift_matmul),
    (LINEARS, _lift_linear),
    (EINSUMS, _lift_einsum),
    (_ADDS, _lift_add),
    (_SCALES, _lift_scale),
]


def lift_op(node: fx.Node, value_of: ValueOf, f: IndexFactory) -> LinVal:
    """Apply the first matching rule to ``node``.

    Raises:
        RegionError: If no rule applies or the matching rule rejects the node.
    """
    if node.op == "call_module":
        return _lift_linear_module(node, value_of, f)
    if node.op not in ("call_function", "call_method"):
        raise RegionError("not an op")
    for targets, handler in RULES:
        try:
            hit = node.target in targets
        except TypeError:
            hit = False
        if hit:
            return handler(node, value_of, f)
    raise RegionError(f"no rule for {node.target}")
