"""Tensor-network IR: tensors are nodes, indices are edges, planned by opt_einsum.

A :class:`TensorNetwork` holds named tensors (an input, factor parameters, ...) with
their index names and sizes in a ``networkx.MultiGraph``: one node per tensor, one
edge per index shared by two tensors (an index shared by more tensors, such as the
rank index of a Kronecker sum, is a hyperedge and appears once per pair). Open
indices are the output. :meth:`TensorNetwork.plan` asks opt_einsum for a contraction
order and lowers it to a :class:`~ndcompile.ir.program.ContractionProgram`;
:meth:`TensorNetwork.emit` inserts that program into an FX graph as explicit ops.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import opt_einsum
import torch.fx as fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

from ndcompile.errors import NdCompileError
from ndcompile.ir.lowering import compile_path
from ndcompile.ir.meta import PLAN
from ndcompile.ir.program import ContractionProgram

__all__ = ["OPTIMIZERS", "NetworkPlan", "TensorNetwork", "check_optimizer"]

#: Optimizer names accepted everywhere an ``optimizer=`` option exists.
OPTIMIZERS: tuple[str, ...] = ("auto", "optimal", "dp", "greedy", "branch-2", "random-greedy")

#: Networks with at most this many tensors use the exhaustive "optimal" search in "auto".
OPTIMAL_LIMIT = 6


def check_optimizer(name: str) -> str:
    """Validate an optimizer name.

    Args:
        name: The requested optimizer.

    Returns:
        The name, unchanged.

    Raises:
        NdCompileError: If the name is unknown; the message lists the valid names.
    """
    if name not in OPTIMIZERS:
        raise NdCompileError(
            f"unknown optimizer {name!r}; valid optimizers are: {', '.join(OPTIMIZERS)}"
        )
    return name


@dataclass(frozen=True)
class NetworkPlan:
    """A contraction order and its lowering, printable like opt_einsum's PathInfo.

    Attributes:
        equation: The einsum equation of the network (one letter per index).
        path: The pairwise contraction path.
        optimizer: The optimizer that chose it.
        flops: FLOPs of the chosen order (opt_einsum's count, nominal batch).
        naive_flops: FLOPs of contracting everything at once.
        largest_intermediate: Elements of the largest intermediate tensor.
        program: The lowered straight-line program.
        nominal_batch: Size assumed for the dynamic index while planning.
    """

    equation: str
    path: tuple[tuple[int, ...], ...]
    optimizer: str
    flops: int
    naive_flops: int
    largest_intermediate: int
    program: ContractionProgram
    nominal_batch: int

    @property
    def speedup(self) -> float:
        """Naive over chosen FLOPs."""
        return self.naive_flops / max(self.flops, 1)

    def __str__(self) -> str:
        prog = self.program
        return (
            f"  equation:             {self.equation}\n"
            f"  optimizer:            {self.optimizer}\n"
            f"  path:                 {list(self.path)}\n"
            f"  naive FLOPs:          {self.naive_flops:,}\n"
            f"  optimized FLOPs:      {self.flops:,}  (speedup {self.speedup:.1f}x)\n"
            f"  largest intermediate: {self.largest_intermediate:,} elements\n"
            f"  ops emitted:          {prog.count('matmul')} matmul, "
            f"{prog.count('permute')} permute, {prog.count('reshape')} reshape"
            f"  (batch {self.nominal_batch})"
        )


@functools.lru_cache(maxsize=1024)
def _plan_cached(
    operands: tuple[tuple[str, ...], ...],
    output: tuple[str, ...],
    sizes: tuple[tuple[str, int], ...],
    dynamic: str | None,
    nominal_batch: int,
    optimizer: str,
    fixed_path: tuple[tuple[int, ...], ...] | None = None,
) -> NetworkPlan:
    size_map = dict(sizes)
    letters = {name: opt_einsum.get_symbol(k) for k, name in enumerate(size_map)}
    eq = ",".join("".join(letters[i] for i in op) for op in operands)
    eq += "->" + "".join(letters[i] for i in output)
    nominal = {i: (nominal_batch if i == dynamic else s) for i, s in size_map.items()}
    shapes = [tuple(nominal[i] for i in op) for op in operands]
    if optimizer == "auto":
        optimizer = "optimal" if len(operands) <= OPTIMAL_LIMIT else "dp"
    if len(operands) == 1:
        path: list[tuple[int, ...]] = [(0,)]
        info = None
    else:
        strategy = list(fixed_path) if fixed_path is not None else optimizer
        path, info = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize=strategy)
        if fixed_path is not None:
            optimizer = "fixed"
    program = compile_path(operands, output, path, size_map, dynamic=dynamic, nominal=nominal)
    if info is None:
        flops = naive = math.prod(shapes[0])
        largest = math.prod(nominal[i] for i in output)
    else:
        flops, naive, largest = (
            int(info.opt_cost),
            int(info.naive_cost),
            int(info.largest_intermediate),
        )
    return NetworkPlan(
        equation=eq,
        path=tuple(tuple(step) for step in path),
        optimizer=optimizer,
        flops=flops,
        naive_flops=naive,
        largest_intermediate=largest,
        program=program,
        nominal_batch=nominal_batch,
    )


class TensorNetwork:
    """A network of tensors joined by named indices.

    Args:
        output: Open indices, in the order of the result.
        dynamic: The one index whose size varies at run time (the batch), if any.

    Example:
        >>> tn = TensorNetwork.from_ndlinear((4, 8), (2, 3))
        >>> tn.equation()
        'abc,da,ebc->dea'  # doctest: +SKIP
    """

    def __init__(self, output: Sequence[str] = (), dynamic: str | None = None) -> None:
        self.graph: nx.MultiGraph = nx.MultiGraph()
        self.output: tuple[str, ...] = tuple(output)
        self.dynamic = dynamic
        self.sizes: dict[str, int] = {}

    # ----------------------------------------------------------------- building
    def add_tensor(
        self, name: str, indices: Sequence[str], shape: Sequence[int], *, role: str = "param"
    ) -> None:
        """Add a tensor node and connect it to every tensor sharing an index.

        Args:
            name: Unique tensor name.
            indices: One index name per dim.
            shape: Its shape (the dynamic index may have any size here).
            role: ``"input"`` for activations, ``"param"`` for weights.

        Raises:
            NdCompileError: On a duplicate name, rank mismatch or size conflict.
        """
        indices, shape = tuple(indices), tuple(int(s) for s in shape)
        if name in self.graph:
            raise NdCompileError(f"tensor {name!r} is already in the network")
        if len(indices) != len(shape) or len(set(indices)) != len(indices):
            raise NdCompileError(
                f"tensor {name!r}: indices {indices} do not match shape {shape} "
                "(one distinct index per dim is required)"
            )
        for idx, size in zip(indices, shape, strict=True):
            if idx == self.dynamic:
                continue
            if size < 1:
                raise NdCompileError(
                    f"tensor {name!r}: index {idx!r} has size {size}; only the dynamic "
                    f"index ({self.dynamic!r}) may have an unknown size"
                )
            if self.sizes.setdefault(idx, size) != size:
                raise NdCompileError(
                    f"tensor {name!r}: index {idx!r} has size {size}, "
                    f"but other tensors give it size {self.sizes[idx]}"
                )
        if self.dynamic in indices:
            self.sizes.setdefault(self.dynamic, -1)
        others = list(self.graph.nodes(data="indices"))
        self.graph.add_node(name, indices=indices, shape=shape, role=role)
        for other, other_indices in others:
            for idx in sorted(set(indices) & set(other_indices)):
                self.graph.add_edge(name, other, key=idx, size=self.sizes[idx])

    @classmethod
    def from_ndlinear(
        cls,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        rank: int = 1,
        *,
        input_name: str = "x",
        prefix: str = "",
    ) -> TensorNetwork:
        """The network of an NdLinear layer ``(B, d1..dN) -> (B, h1..hN)``.

        Factor ``k`` is ``(rank, h_k, d_k)``; for rank 1 the rank index is dropped
        and factor ``k`` is ``(h_k, d_k)``.
        """
        n = len(in_shape)
        ins = [f"{prefix}i{k}" for k in range(n)]
        outs = [f"{prefix}o{k}" for k in range(n)]
        tn = cls(output=("batch", *outs), dynamic="batch")
        tn.add_tensor(input_name, ("batch", *ins), (-1, *in_shape), role="input")
        for k in range(n):
            if rank == 1:
                tn.add_tensor(f"{prefix}W{k}", (outs[k], ins[k]), (out_shape[k], in_shape[k]))
            else:
                tn.add_tensor(
                    f"{prefix}W{k}",
                    (f"{prefix}r", outs[k], ins[k]),
                    (rank, out_shape[k], in_shape[k]),
                )
        return tn

    @classmethod
    def from_einsum(
        cls, equation: str, shapes: Sequence[Sequence[int]], names: Sequence[str] | None = None
    ) -> TensorNetwork:
        """Build a network from an explicit einsum equation (``"ij,jk->ik"``)."""
        eq = equation.replace(" ", "")
        if "->" not in eq or "." in eq:
            raise NdCompileError(
                f"einsum equation {equation!r} must be explicit ('...->...') without ellipsis"
            )
        lhs, out = eq.split("->")
        terms = lhs.split(",")
        if len(terms) != len(shapes):
            raise NdCompileError(
                f"einsum {equation!r} has {len(terms)} operands but {len(shapes)} shapes"
            )
        if len(set(out)) != len(out):
            raise NdCompileError(f"einsum {equation!r}: output subscripts {out!r} repeat an index")
        missing = sorted(set(out) - set("".join(terms)))
        if missing:
            raise NdCompileError(
                f"einsum {equation!r}: output indices {missing} appear in no operand"
            )
        names = list(names) if names is not None else [f"t{k}" for k in range(len(terms))]
        tn = cls(output=tuple(out))
        for name, term, shape in zip(names, terms, shapes, strict=True):
            if len(term) != len(shape):
                raise NdCompileError(
                    f"einsum {equation!r}: operand {name} has {len(shape)} dims, "
                    f"subscripts {term!r} have {len(term)}"
                )
            tn.add_tensor(name, tuple(term), shape, role="input")
        return tn

    # ------------------------------------------------------------------ queries
    @property
    def tensors(self) -> list[str]:
        """Tensor names in insertion order (the operand order of plans)."""
        return list(self.graph.nodes)

    def indices(self, name: str) -> tuple[str, ...]:
        """Index names of tensor ``name``."""
        return self.graph.nodes[name]["indices"]

    def equation(self) -> str:
        """The network as an einsum equation with one letter per index."""
        return self.plan(optimizer="greedy").equation

    def plan(
        self,
        optimizer: str = "auto",
        *,
        nominal_batch: int = 64,
        path: Sequence[Sequence[int]] | None = None,
    ) -> NetworkPlan:
        """Choose a contraction order with opt_einsum and lower it (cached).

        Args:
            optimizer: One of :data:`OPTIMIZERS`.
            nominal_batch: Size assumed for the dynamic index when planning.
            path: Use this pairwise path (opt_einsum format) instead of searching.

        Returns:
            The plan; its program accepts operands in :attr:`tensors` order.
        """
        check_optimizer(optimizer)
        operands = tuple(self.indices(t) for t in self.tensors)
        sizes = tuple((i, self.sizes[i]) for i in dict.fromkeys(i for op in operands for i in op))
        fixed = tuple(tuple(step) for step in path) if path is not None else None
        return _plan_cached(
            operands, self.output, sizes, self.dynamic, nominal_batch, optimizer, fixed
        )

    def flops(self, optimizer: str = "auto", *, nominal_batch: int = 64) -> int:
        """FLOPs of the planned contraction (opt_einsum's count)."""
        return self.plan(optimizer, nominal_batch=nominal_batch).flops

    # ----------------------------------------------------------------- emitting
    def emit(
        self,
        graph: fx.Graph,
        inputs: Mapping[str, fx.Node],
        *,
        optimizer: str = "auto",
        nominal_batch: int = 64,
    ) -> fx.Node:
        """Insert the planned contraction into ``graph`` as explicit torch ops.

        Insertion happens at the graph's current insert point (use
        ``graph.inserting_before(node)``).

        Args:
            graph: The FX graph to extend.
            inputs: The FX node providing each tensor, by tensor name.
            optimizer: One of :data:`OPTIMIZERS`.
            nominal_batch: Size assumed for the dynamic index when planning.

        Returns:
            The node holding the result (indices in :attr:`output` order).
        """
        missing = [t for t in self.tensors if t not in inputs]
        if missing:
            raise NdCompileError(f"emit: no FX node given for tensors {missing}")
        plan = self.plan(optimizer, nominal_batch=nominal_batch)
        tracer = GraphAppendingTracer(graph)
        proxies: list[Any] = [Proxy(inputs[t], tracer) for t in self.tensors]
        result = plan.program.run(*proxies)
        if isinstance(result, Proxy):
            result.node.meta[PLAN] = plan
            return result.node
        raise NdCompileError("emit: the network has no operations to emit")  # pragma: no cover

    def merge(self, other: TensorNetwork, *, link: Mapping[str, str], drop: str) -> TensorNetwork:
        """Fuse ``other`` after ``self``: ``other``'s input ``drop`` is ``self``'s output.

        Args:
            other: The network consuming this one's result.
            link: Maps each index of ``other``'s tensor ``drop`` to an output index of
                ``self`` (positionally equal dims).
            drop: Name of the tensor in ``other`` that ``self``'s result replaces.

        Returns:
            A new network computing ``other(self(...))``.
        """
        merged = TensorNetwork(output=(), dynamic=self.dynamic)
        for name in self.tensors:
            data = self.graph.nodes[name]
            merged.add_tensor(name, data["indices"], data["shape"], role=data["role"])
        for name in other.tensors:
            if name == drop:
                continue
            data = other.graph.nodes[name]
            idx = tuple(link.get(i, i) for i in data["indices"])
            merged.add_tensor(name, idx, data["shape"], role=data["role"])
        merged.output = tuple(link.get(i, i) for i in other.output)
        return merged

    def __repr__(self) -> str:
        return f"TensorNetwork({len(self.tensors)} tensors, output={self.output})"
