"""Fuse connected linear regions into one planned contraction each.

Consecutive linear maps with no nonlinearity between them (NdLinear -> NdLinear,
Linear -> Linear, einsum -> einsum, matmul chains, with reshapes/permutes between)
are lifted into a sum of tensor networks (:mod:`ndcompile.passes.linear_regions`),
ordered by opt_einsum and emitted as explicit matmul/reshape ops. Bias terms are
carried through later maps exactly (``L(Ax + b) = LAx + Lb``).

Before::

    permute = x.permute(0, 2, 1);  contiguous = permute.contiguous()
    matmul = torch.matmul(contiguous, w1);  matmul_1 = torch.matmul(matmul, w2)

After::

    matmul = torch.matmul(w1.permute(1, 0), x) ...   # one planned network
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ndcompile.errors import NdCompileError
from ndcompile.ir.meta import FUSED_REGION, FUSED_REGIONS, NODE_SHAPE, REGION
from ndcompile.ir.network import NetworkPlan, TensorNetwork, check_optimizer
from ndcompile.passes.regions.analysis import (
    EINSUMS,
    LINEARS,
    MATMULS,
    IndexFactory,
    LinVal,
    RegionError,
    Term,
    leaf_value,
)
from ndcompile.passes.regions.ops import lift_op

__all__ = ["FusedRegion", "fuse_contractions", "lift_regions"]

CONTRACTIONS = MATMULS | LINEARS | EINSUMS | {"matmul", "mm", "bmm"}
LAYOUT_OPS: set[Any] = {"permute", "transpose", "t", "swapaxes", "contiguous"}
LAYOUT_OPS |= {torch.permute, torch.transpose, torch.t, torch.swapaxes}


@dataclass
class FusedRegion:
    """One rewritten region: its output node name and FLOPs before/after."""

    node: str
    contractions: int
    flops_before: int
    flops_after: int
    plans: list[NetworkPlan] = field(default_factory=list)


def _copy(val: LinVal) -> LinVal:
    return LinVal(
        terms=list(val.terms),
        dims=list(val.dims),
        sizes=dict(val.sizes),
        contractions=val.contractions,
        moves=val.moves,
        flops=val.flops,
        nominal=dict(val.nominal),
        sources=val.sources,
    )


def _data_users(node: fx.Node) -> list[fx.Node]:
    """Users that read ``node``'s values (``node.shape`` queries only read its shape)."""
    return [
        u
        for u in node.users
        if not (u.op == "call_function" and u.target is getattr and u.args[1:] == ("shape",))
    ]


def lift_regions(gm: fx.GraphModule) -> dict[fx.Node, LinVal]:
    """Values of the region *outputs* of ``gm`` (nodes whose value leaves a region)."""
    if not any(NODE_SHAPE in n.meta for n in gm.graph.nodes):
        raise NdCompileError(
            "fuse_contractions needs shapes: run "
            "ndcompile.passes.regions.analysis.annotate_shapes(gm, example_inputs) first"
        )
    factory = IndexFactory()
    values: dict[fx.Node, LinVal] = {}

    def value_of(arg: object) -> LinVal:
        if not isinstance(arg, fx.Node):
            raise RegionError("non-tensor operand")
        if arg in values and len(_data_users(arg)) == 1:
            return _copy(values[arg])
        shape = arg.meta.get(NODE_SHAPE)
        meta = arg.meta.get("tensor_meta")
        if shape is None or meta is None or not hasattr(meta, "shape"):
            raise RegionError("operand without shape")
        nominal = tuple(int(s) for s in meta.shape)
        return leaf_value(arg, nominal, tuple(s == -1 for s in shape), factory)

    for node in gm.graph.nodes:
        try:
            val = lift_op(node, value_of, factory)
        except RegionError:
            continue
        val.sources = val.sources | _tags(gm, node)
        values[node] = val
    outputs = {}
    for node, val in values.items():
        users = _data_users(node)
        if len(users) != 1 or users[0] not in values:
            outputs[node] = val
    return outputs


def _tags(gm: fx.GraphModule, node: fx.Node) -> set[tuple[str, str]]:
    region = node.meta.get(FUSED_REGION, node.meta.get(REGION))
    target = node.target
    if node.op == "call_module" or target in CONTRACTIONS:
        # An emitted layer or fused region counts as one source however many ops it has.
        return {("r", str(region))} if region is not None else {("c", node.name)}
    if region is not None:
        return set()
    if target in LAYOUT_OPS:
        return {("m", node.name)}
    return set()


def _worth_fusing(val: LinVal) -> bool:
    """Two or more contraction sources, or one plus layout ops to remove.

    A region emitted by an earlier run counts as one source, so a second run over
    its own output is a no-op.
    """
    contractions = sum(kind in ("c", "r") for kind, _ in val.sources)
    moves = sum(kind == "m" for kind, _ in val.sources)
    return contractions >= 2 or (contractions >= 1 and moves >= 1)


def _emit_term(
    gm: fx.GraphModule, val: LinVal, term: Term, optimizer: str
) -> tuple[fx.Node, NetworkPlan | None]:
    graph = gm.graph
    present = {i for leaf in term.leaves for d in leaf.dims for i in d}
    dynamic = {i for i in present if val.sizes[i] == -1}
    if len(dynamic) > 1:
        raise RegionError("more than one batch-varying index")
    dyn = next(iter(dynamic), None)
    out_idx = [i for d in val.dims for i in d if i in present]
    tn = TensorNetwork(output=out_idx, dynamic=dyn)
    inputs: dict[str, fx.Node] = {}
    for k, leaf in enumerate(term.leaves):
        src = leaf.source if isinstance(leaf.source, fx.Node) else graph.get_attr(leaf.source)
        atoms = [i for d in leaf.dims for i in d]
        sizes = [val.sizes[i] for i in atoms]
        if not all(len(d) == 1 for d in leaf.dims):
            src = graph.call_method("reshape", (src, tuple(sizes)))
        tn.add_tensor(f"t{k}", atoms, sizes, role="input")
        inputs[f"t{k}"] = src
    nominal = val.nominal[dyn] if dyn is not None else 64
    plan = tn.plan(optimizer, nominal_batch=nominal) if len(term.leaves) > 1 else None
    result = tn.emit(graph, inputs, optimizer=optimizer, nominal_batch=nominal)
    shape = []
    for d in val.dims:
        have = [i for i in d if i in present]
        if have and len(have) != len(d):
            raise RegionError("bias broadcasts over part of a merged dim")
        if not have:
            shape.append(1)
        elif any(val.sizes[i] == -1 for i in d):
            shape.append(-1)
        else:
            shape.append(math.prod(val.sizes[i] for i in d))
    if [len(d) for d in val.dims] != [1] * len(val.dims) or len(out_idx) != len(val.dims):
        result = graph.call_method("reshape", (result, tuple(shape)))
    if term.scale != 1.0:
        result = graph.call_function(operator.mul, (result, term.scale))
    return result, plan


def fuse_contractions(gm: fx.GraphModule, *, optimizer: str = "auto") -> PassResult:
    """Rewrite each linear region with >= 2 contractions (or a contraction plus
    layout ops) into one planned contraction, when that does not add FLOPs.

    Requires ``meta[NODE_SHAPE]`` (see ``annotate_shapes``). Fused regions are
    recorded in ``gm.meta[FUSED_REGIONS]``.

    Returns:
        ``PassResult(gm, modified)``.
    """
    check_optimizer(optimizer)
    fused: list[FusedRegion] = []
    for node, val in lift_regions(gm).items():
        if not _worth_fusing(val):
            continue
        region = FusedRegion(node.name, val.contractions, val.flops, 0)
        with gm.graph.inserting_before(node):
            marker = gm.graph.call_function(operator.mul, (node, 1.0))  # insertion anchor
        new_nodes_before = set(gm.graph.nodes)
        try:
            with gm.graph.inserting_before(marker):
                out = None
                for term in val.terms:
                    res, plan = _emit_term(gm, val, term, optimizer)
                    if plan is not None:
                        region.plans.append(plan)
                        region.flops_after += plan.flops
                    out = res if out is None else gm.graph.call_function(operator.add, (out, res))
        except RegionError:
            out = None
        if out is None or region.flops_after > max(val.flops, 1):
            for n in reversed(list(gm.graph.nodes)):
                if n not in new_nodes_before and not n.users:
                    gm.graph.erase_node(n)
            gm.graph.erase_node(marker)
            continue
        gm.graph.erase_node(marker)
        for n in gm.graph.nodes:
            if n not in new_nodes_before:
                index = len(gm.meta.get(FUSED_REGIONS, [])) + len(fused)
                n.meta[FUSED_REGION] = f"fused#{index}"
                n.meta.pop(REGION, None)
        out.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", NODE_SHAPE)})
        node.replace_all_uses_with(out)
        fused.append(region)
    if fused:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        gm.meta.setdefault(FUSED_REGIONS, []).extend(fused)
    return PassResult(gm, bool(fused))
