"""Lift connected linear regions of an FX graph into sums of tensor networks.

Every node of a region is described by a :class:`LinVal`: a sum of
:class:`Term` s, each a product of leaf tensors (activations entering the region,
or parameters) over *atomic* indices, plus the grouping of those indices into the
node's dims. Permutes, transposes and ``contiguous`` only relabel dims; a
reshape regroups atomic indices (splitting one where needed, e.g. ``12 -> 3 x 4``);
``matmul``/``linear``/``einsum`` multiply terms and join indices; ``add``/``sub``
and scalar ``mul``/``div`` combine terms. Anything else ends the region: its
result is a leaf.

Shapes come from ``node.meta[NODE_SHAPE]`` (a tuple of ints, ``-1`` for a
dim whose size varies at run time), filled by :func:`annotate_shapes` for traced
graphs or by the dynamo backend from FakeTensor metadata.
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ndcompile.ir.meta import NODE_SHAPE, NODE_SHAPE_GROWN

__all__ = ["Leaf", "LinVal", "RegionError", "Term", "annotate_shapes", "lift_node"]

#: Functions whose result is a contraction.
MATMULS: set[Any] = {torch.matmul, operator.matmul, torch.mm, torch.bmm}
LINEARS: set[Any] = {torch.nn.functional.linear, torch._C._nn.linear}
EINSUMS: set[Any] = {torch.einsum, torch.functional.einsum}
MAX_TERMS = 8


class RegionError(Exception):
    """Internal: the node cannot be part of a linear region (it becomes a leaf)."""


@dataclass(frozen=True)
class Leaf:
    """A tensor entering a region: an FX node, or a parameter read by ``get_attr`` name."""

    source: fx.Node | str
    dims: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Term:
    """``scale * contraction(leaves)``."""

    leaves: tuple[Leaf, ...]
    scale: float = 1.0


@dataclass
class LinVal:
    """The symbolic value of a region node.

    Attributes:
        terms: The value is the sum of these terms.
        dims: Atomic indices of each dim of the node's value.
        sizes: Size of every atomic index (``-1`` if it varies at run time).
        contractions: Contraction ops absorbed (matmul/linear/einsum).
        moves: Layout ops absorbed (permute/transpose/contiguous).
        flops: FLOPs of the absorbed ops as written (example shapes).
        nominal: Example size of every atomic index.
        sources: Tags of the absorbed ops: ``("c", node)`` contractions, ``("m", node)``
            layout ops, ``("r", id)`` a region an earlier fusion emitted.
    """

    terms: list[Term]
    dims: list[tuple[str, ...]]
    sizes: dict[str, int]
    contractions: int = 0
    moves: int = 0
    flops: int = 0
    nominal: dict[str, int] = field(default_factory=dict)
    sources: frozenset[tuple[str, str]] = frozenset()

    def size(self, idx: str) -> int:
        """Example (nominal) size of an atomic index."""
        return self.nominal[idx]

    def dim_size(self, k: int) -> int:
        return math.prod(self.size(i) for i in self.dims[k])

    def dynamic(self, k: int) -> bool:
        return any(self.sizes[i] == -1 for i in self.dims[k])


# ----------------------------------------------------------------- shapes
class _DynamicProp(ShapeProp):
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[NODE_SHAPE_GROWN] = tuple(result.shape)
        return result


def annotate_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> None:
    """Set ``meta[NODE_SHAPE]``: example shapes with ``-1`` for dims that may vary.

    The graph is re-run with each input dim grown by one in turn (the batch, a
    sequence length, ...); dims of any node whose size changes in a run the model
    accepts are marked ``-1``. Runs the model rejects (feature dims) change nothing.
    """
    varying: dict[fx.Node, set[int]] = {}
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        ShapeProp(gm).propagate(*example_inputs)
        base = {
            n: tuple(n.meta["tensor_meta"].shape)
            for n in gm.graph.nodes
            if hasattr(n.meta.get("tensor_meta"), "shape")
        }
        for pos, t in enumerate(example_inputs):
            if not isinstance(t, torch.Tensor):
                continue
            for dim in range(t.dim()):
                grown = list(example_inputs)
                grown[pos] = torch.cat([t, t.narrow(dim, 0, 1)], dim=dim)
                try:
                    _DynamicProp(gm).propagate(*grown)
                except Exception:  # the model rejects this size: the dim is fixed
                    continue
                for node, shape in base.items():
                    seen = node.meta.pop(NODE_SHAPE_GROWN, shape)
                    if len(seen) != len(shape):
                        changed = set(range(len(shape)))
                    else:
                        changed = {
                            k for k, (a, b) in enumerate(zip(seen, shape, strict=True)) if a != b
                        }
                    varying.setdefault(node, set()).update(changed)
        ShapeProp(gm).propagate(*example_inputs)
    for node in gm.graph.nodes:
        node.meta.pop(NODE_SHAPE_GROWN, None)
        meta = node.meta.get("tensor_meta")
        meta_shape = getattr(meta, "shape", None)
        if meta_shape is None:
            node.meta.pop(NODE_SHAPE, None)
            continue
        dyn = varying.get(node, set())
        node.meta[NODE_SHAPE] = tuple(-1 if k in dyn else int(a) for k, a in enumerate(meta_shape))


def _nominal_shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None:
        raise RegionError(f"no shape for {node.format_node()}")
    return tuple(int(s) for s in shape)


# ------------------------------------------------------------ index algebra
class IndexFactory:
    """Hands out fresh atomic index names and records their sizes."""

    def __init__(self) -> None:
        self.count = 0

    def fresh(
        self, val_sizes: dict[str, int], nominal: dict[str, int], size: int, dyn: bool
    ) -> str:
        name = f"q{self.count}"
        self.count += 1
        val_sizes[name] = -1 if dyn else size
        nominal[name] = size
        return name


def leaf_value(
    source: fx.Node | str, shape: tuple[int, ...], dyn: tuple[bool, ...], f: IndexFactory
) -> LinVal:
    """A region input of the given (example) shape."""
    sizes: dict[str, int] = {}
    nominal: dict[str, int] = {}
    dims: list[tuple[str, ...]] = [
        (f.fresh(sizes, nominal, s, d),) if s != 1 or d else ()
        for s, d in zip(shape, dyn, strict=True)
    ]
    return LinVal([Term((Leaf(source, tuple(dims)),))], dims, sizes, nominal=nominal)


def _substitute(val: LinVal, idx: str, parts: tuple[str, ...]) -> None:
    """Replace atomic index ``idx`` by ``parts`` (row-major) everywhere in ``val``."""

    def sub(dims: tuple[tuple[str, ...], ...] | list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        return [tuple(p for i in d for p in (parts if i == idx else (i,))) for d in dims]

    val.dims = sub(val.dims)
    val.terms = [
        replace(t, leaves=tuple(Leaf(lf.source, tuple(sub(lf.dims))) for lf in t.leaves))
        for t in val.terms
    ]


def _split(val: LinVal, idx: str, outer: int, f: IndexFactory) -> tuple[str, str]:
    size = val.size(idx)
    if val.sizes[idx] == -1 or size % outer:
        raise RegionError(f"cannot split index of size {size} by {outer}")
    a = f.fresh(val.sizes, val.nominal, outer, False)
    b = f.fresh(val.sizes, val.nominal, size // outer, False)
    _substitute(val, idx, (a, b))
    return a, b


def regroup(val: LinVal, shape: tuple[int, ...], dyn: tuple[bool, ...], f: IndexFactory) -> None:
    """Regroup ``val``'s atomic indices into dims of ``shape`` (a reshape)."""
    atoms = [i for d in val.dims for i in d]
    groups: list[tuple[str, ...]] = []
    pos = 0
    for size, is_dyn in zip(shape, dyn, strict=True):
        group: list[str] = []
        remaining = size
        while remaining > 1:
            if pos >= len(atoms):
                raise RegionError("reshape sizes do not match")
            idx = atoms[pos]
            a = val.size(idx)
            if a == 1:
                pos += 1
                continue
            if remaining % a == 0:
                group.append(idx)
                remaining //= a
                pos += 1
            elif a % remaining == 0:
                outer, inner = _split(val, idx, remaining, f)
                atoms[pos : pos + 1] = [outer, inner]
                group.append(outer)
                remaining = 1
                pos += 1
            else:
                raise RegionError("reshape is not a regrouping of dims")
        if is_dyn != any(val.sizes[i] == -1 for i in group):
            raise RegionError("reshape moves the batch-varying dim")
        groups.append(tuple(group))
    if any(val.size(i) != 1 for i in atoms[pos:]):
        raise RegionError("reshape sizes do not match")
    if groups and atoms[pos:]:
        groups[-1] = groups[-1] + tuple(atoms[pos:])
    val.dims = groups


def _in_leaves(val: LinVal, idx: str) -> bool:
    return any(idx in d for t in val.terms for leaf in t.leaves for d in leaf.dims)


def unify(a: LinVal, da: int, b: LinVal, db: int, f: IndexFactory) -> None:
    """Make dim ``db`` of ``b`` use the same atomic indices as dim ``da`` of ``a``."""
    if a.dim_size(da) != b.dim_size(db) or a.dynamic(da) != b.dynamic(db):
        raise RegionError("joined dims differ in size")
    # A broadcast dim (made by expand, read by no tensor) simply takes the other's atoms.
    for free, fd, other, od in ((a, da, b, db), (b, db, a, da)):
        group = free.dims[fd]
        if len(group) == 1 and not _in_leaves(free, group[0]):
            atoms = other.dims[od]
            _substitute(free, group[0], atoms)
            for i in atoms:
                free.sizes[i], free.nominal[i] = other.sizes[i], other.nominal[i]
            return
    # Common refinement of the two row-major groupings, then rename b's atoms.
    for _ in range(64):
        ga, gb = list(a.dims[da]), list(b.dims[db])
        ia = [a.size(i) for i in ga]
        ib = [b.size(i) for i in gb]
        if ia == ib:
            for x, y in zip(ga, gb, strict=True):
                _substitute(b, y, (x,))
                b.sizes.pop(y, None)
                b.sizes[x], b.nominal[x] = a.sizes[x], a.nominal[x]
            return
        for k in range(min(len(ia), len(ib))):
            if ia[k] != ib[k]:
                if ia[k] > ib[k]:
                    _split(a, ga[k], ib[k], f)
                else:
                    _split(b, gb[k], ia[k], f)
                break
        else:
            raise RegionError("joined dims cannot be aligned")
    raise RegionError("joined dims cannot be aligned")


def multiply(a: LinVal, b: LinVal) -> list[Term]:
    """Terms of the product of two values (distributes sums)."""
    if len(a.terms) * len(b.terms) > MAX_TERMS:
        raise RegionError("too many terms")
    return [Term(ta.leaves + tb.leaves, ta.scale * tb.scale) for ta in a.terms for tb in b.terms]


def merged(
    a: LinVal, b: LinVal, terms: list[Term], dims: list[tuple[str, ...]], flops: int
) -> LinVal:
    """A value combining ``a`` and ``b``'s bookkeeping."""
    return LinVal(
        terms=terms,
        dims=dims,
        sizes={**a.sizes, **b.sizes},
        contractions=a.contractions + b.contractions,
        moves=a.moves + b.moves,
        flops=a.flops + b.flops + flops,
        nominal={**a.nominal, **b.nominal},
        sources=a.sources | b.sources,
    )


Handler = Callable[[fx.Node, Callable[[Any], LinVal], IndexFactory], LinVal]


def lift_node(node: fx.Node, value_of: Callable[[Any], LinVal], f: IndexFactory) -> LinVal:
    """The :class:`LinVal` of ``node`` from its inputs' values.

    Raises:
        RegionError: If ``node`` is not a linear op this pass understands.
    """
    from ndcompile.passes.regions.ops import lift_op

    return lift_op(node, value_of, f)


def is_linear_module(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True for a ``call_module`` of a plain ``nn.Linear``."""
    return node.op == "call_module" and type(gm.get_submodule(cast(str, node.target))) is nn.Linear
