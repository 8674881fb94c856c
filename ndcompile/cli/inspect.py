"""``ndcompile inspect``: what convert would do to a model, or what a ``.pt2`` contains.

For a model, :func:`plan_model` traces it with torch.fx and lists every
Linear/NdLinear site with its planned modes (and where they come from), parameters
and FLOPs before and after, and whether convert would rewrite it or skip it (with
the reason). Models torch.fx cannot trace, and models called with keyword inputs,
are captured as convert captures them (torch.export, forward hooks where that
fails) and every Linear-like layer (``nn.Linear``, transformers ``Conv1D``,
``F.linear`` calls) gets a row. For an exported program, :func:`describe_program`
lists the parameters, the NdLinear factor groups and the linear/matmul ops.
Neither writes anything.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ndcompile.errors import UntraceableError
from ndcompile.frontend.inputs import ExampleInputs, example_inputs
from ndcompile.frontend.sites import LinearSite, ShapeOverrides, find_linear_sites
from ndcompile.frontend.trace import is_reference_ndlinear, node_shape, propagate_shapes, trace
from ndcompile.ir.network import TensorNetwork
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.pipeline.attention import with_split_attention
from ndcompile.pipeline.modes import get_mode
from ndcompile.pipeline.options import ConvertOptions
from ndcompile.pipeline.surgery import find_module_sites
from ndcompile.report import format_count, format_shape

__all__ = ["MATMUL_OPS", "describe_program", "format_plan", "format_program", "plan_model"]

#: aten ops listed by ``inspect`` on an exported program.
MATMUL_OPS = ("linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "tensordot")

_VIEW_OPS = {
    "select", "reshape", "view", "permute", "transpose", "t", "unsqueeze", "squeeze",
    "expand", "contiguous", "clone", "_unsafe_view", "alias", "flatten",
}  # fmt: skip


def _site_row(site: LinearSite, mode: str, rank: int, tol: float | None, optimizer: str) -> dict:
    m = site.module
    calls = site.n_calls
    bias = m.bias is not None
    row: dict[str, Any] = {
        "name": site.name,
        "kind": site.kind,
        "in_features": m.in_features,
        "out_features": m.out_features,
        "in_shape": site.in_shape,
        "out_shape": site.out_shape,
        "mode_source": site.source or None,
        "rank": None,
        "params_before": sum(p.numel() for p in m.parameters()),
        "params_after": None,
        "flops_before": 2 * site.rows * m.in_features * m.out_features * calls,
        "flops_after": None,
        "action": "skip",
        "reason": site.skip_reason,
    }
    if mode == "exact":
        row["reason"] = "mode 'exact' keeps dense Linear layers as they are"
        return row
    if not site.convertible:
        return row
    assert site.in_shape is not None and site.out_shape is not None
    factors = sum(h * d for h, d in zip(site.out_shape, site.in_shape, strict=True))
    if mode == "factorize" and tol is None and rank * factors >= m.in_features * m.out_features:
        row["reason"] = (
            f"rank {rank} factors ({rank * factors:,} params) are not smaller than the dense "
            f"weight ({m.weight.numel():,})"
        )
        return row
    plan = TensorNetwork.from_ndlinear(site.in_shape, site.out_shape, rank).plan(
        optimizer, nominal_batch=max(site.rows, 1)
    )
    if mode == "adapter":  # dense base kept, trainable adapter added
        row.update(
            action="adapt",
            rank=rank,
            params_after=row["params_before"] + rank * factors,
            flops_after=row["flops_before"] + (plan.flops + m.out_features * site.rows) * calls,
        )
        return row
    if tol is not None:  # the rank is chosen while fitting: sizes unknown until then
        row.update(action="convert", rank=f"tol {tol:g}")
        return row
    row.update(
        action="convert",
        rank=rank,
        params_after=rank * factors + (m.out_features if bias else 0),
        flops_after=(plan.flops + m.out_features * site.rows) * calls,
    )
    return row


def _as_ndlinear(module: nn.Module) -> tuple[NdLinear, str] | None:
    """A private NdLinear for an NdLinear-like module (ours or the reference package's)."""
    if isinstance(module, NdLinear):
        return copy.deepcopy(module), "NdLinear"
    if is_reference_ndlinear(module):
        return NdLinear.from_reference(module), "ndlinear.NdLinear"
    return None


def _ndlinear_row(
    name: str, module: nn.Module, layer: NdLinear, kind: str, rows_in: int, mode: str
) -> dict:
    """The row of an NdLinear-like ``module`` (planned as ``layer``) called on ``rows_in`` rows."""
    layer.replan(plan_batch=max(rows_in, 1))
    plan = layer.plan()
    params = sum(p.numel() for p in module.parameters())
    return {
        "name": name, "kind": kind,
        "in_features": layer.in_features, "out_features": layer.out_features,
        "in_shape": layer.in_shape, "out_shape": layer.out_shape,
        "mode_source": "layer", "rank": layer.rank,
        "params_before": params, "params_after": params,
        "flops_before": plan.naive_flops, "flops_after": plan.flops,
        "action": "inline" if mode == "exact" else "keep",
        "reason": None if mode == "exact" else "already factorized (use --mode exact)",
    }  # fmt: skip


def _ndlinear_rows(gm: fx.GraphModule, mode: str) -> list[dict]:
    rows = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        found = _as_ndlinear(module)
        if found is None:
            continue
        layer, kind = found
        shape = node_shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        rows_in = math.prod(shape[: -len(layer.in_shape)]) if shape else 1
        rows.append(_ndlinear_row(str(node.target), module, layer, kind, rows_in, mode))
    return rows


def _module_ndlinear_rows(model: nn.Module, mode: str) -> list[dict]:
    """NdLinear-like layers of a model without a graph (FLOPs per row of input)."""
    rows = []
    for name, module in model.named_modules():
        found = _as_ndlinear(module) if name else None
        if found is not None:
            rows.append(_ndlinear_row(name, module, *found, rows_in=1, mode=mode))
    return rows


def _graph_sites(
    model: nn.Module, example: ExampleInputs, opts: ConvertOptions
) -> tuple[list[LinearSite], list[dict]]:
    """Sites and NdLinear rows from a torch.fx trace (raises UntraceableError)."""
    if example.kwargs:
        raise UntraceableError("keyword example inputs: the traced graph is called positionally")
    gm = trace(model)
    try:
        propagate_shapes(gm, example.args)
    except Exception as exc:  # shapes the graph cannot reproduce: capture instead
        raise UntraceableError(f"shape propagation failed: {type(exc).__name__}") from exc
    sites = find_linear_sites(gm, shapes=opts.shapes, include=opts.include, exclude=opts.exclude)
    return sites, _ndlinear_rows(gm, opts.mode)


def _captured_sites(
    model: nn.Module, example: ExampleInputs, opts: ConvertOptions, notes: list[str]
) -> tuple[list[LinearSite], list[dict]]:
    """Sites as ``convert`` finds them (torch.export, or hooks), the model left as it was."""
    sites = find_module_sites(model, example, opts, notes)
    return sites, _module_ndlinear_rows(model, opts.mode)


def plan_model(
    model: nn.Module,
    example: Any,
    *,
    mode: str = "fresh",
    rank: int | None = None,
    tol: float | None = None,
    budget: float | None = None,
    shapes: ShapeOverrides | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    optimizer: str = "auto",
    notes: list[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per Linear-like/NdLinear site of ``model``: modes, params, FLOPs, action.

    Nothing is converted and ``model`` is not modified. The model is traced with
    torch.fx; when it cannot be (or is called with keyword inputs) a copy is
    captured as ``convert`` captures it, so every Linear-like layer still gets a
    row, with the same skip rules. FLOPs are counted on the example input. With
    ``budget`` the rows show the pure Kronecker sum at the budget (conversion may
    pick a Kronecker + low-rank hybrid of the same size).

    Args:
        model: The model.
        example: How it is called (any form :func:`ndcompile.convert` takes).
        mode: Conversion mode; the other options are those of ``convert``.
        rank: Kronecker rank.
        tol: ``factorize``: relative weight error.
        budget: ``factorize``: parameter fraction per layer.
        shapes: Per-layer mode overrides.
        include: Layer-name globs to convert.
        exclude: Layer-name globs to skip.
        optimizer: Contraction-order optimizer.
        notes: Where notes on how the layers were found are appended.
    """
    opts = ConvertOptions(
        mode=mode,
        rank=rank,
        tol=tol,
        budget=budget,
        shapes=shapes,
        include=include,  # type: ignore[arg-type]
        exclude=exclude,  # type: ignore[arg-type]
        optimizer=optimizer,
    )
    notes = [] if notes is None else notes
    call = example_inputs(example)
    strategy = get_mode(mode)
    if strategy.replaces_sites:  # as convert does: attention projections become layers
        model = with_split_attention(model, include, exclude, notes)
    try:
        sites, rows = _graph_sites(model, call, opts)
    except UntraceableError as exc:
        notes.append(f"not traceable with torch.fx ({str(exc).splitlines()[0]})")
        sites, rows = _captured_sites(model, call, opts, notes)
    for site in sites:
        if site.convertible and strategy.replaces_sites:
            site.skip_reason = strategy.skip_reason(site, opts)
        r = rank or 1
        if budget is not None and site.in_shape is not None and site.out_shape is not None:
            per_term = sum(h * d for h, d in zip(site.out_shape, site.in_shape, strict=True))
            dense = site.module.in_features * site.module.out_features
            r = max(1, int(budget * dense) // per_term)
        rows.append(_site_row(site, mode, r, tol, optimizer))
    return rows


def format_plan(rows: list[dict[str, Any]], title: str) -> str:
    """The rows of :func:`plan_model` as a table followed by the skip reasons."""
    header = ("layer", "kind", "features", "modes in -> out", "source", "action", "params", "FLOPs")
    table = [header]
    for r in rows:
        after = r["params_after"] if r["action"] != "skip" else None
        flops_after = r["flops_after"] if r["action"] != "skip" else None
        table.append(
            (
                r["name"], r["kind"], f"{r['in_features']} -> {r['out_features']}",
                f"{format_shape(r['in_shape'])} -> {format_shape(r['out_shape'])}"
                if r["in_shape"] else "-",
                r["mode_source"] or "-", r["action"],
                format_count(r["params_before"]) + (f" -> {format_count(after)}" if after else ""),
                format_count(r["flops_before"])
                + (f" -> {format_count(flops_after)}" if flops_after else ""),
            )
        )  # fmt: skip
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    lines = [title]
    for k, row in enumerate(table):
        lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
        if k == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    lines.extend(f"  {r['name']}: {r['reason']}" for r in rows if r["reason"])
    return "\n".join(lines)


def _param_source(node: Any, params: dict[str, str]) -> str | None:
    """The parameter an operand reads, following view-like ops back to a placeholder."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 16:
        if node.op == "placeholder":
            return params.get(node.name)
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if node.op != "call_function" or name not in _VIEW_OPS or not node.args:
            return None
        node, seen = node.args[0], seen + 1
    return None


def _val_shape(node: Any) -> tuple[int | str, ...] | None:
    """The node's shape; a dynamic dim is shown as its symbol or expression (``s0``, ``8*s0``)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(s if isinstance(s, int) else str(s) for s in val.shape)


def describe_program(program: Any) -> dict[str, Any]:
    """Inputs, parameters, NdLinear factor groups and linear/matmul ops of an ExportedProgram."""
    sig = program.graph_signature
    params = dict(sig.inputs_to_parameters)
    state = program.state_dict
    shapes = {name: tuple(state[name].shape) for name in sig.parameters if name in state}
    inputs = [
        {"name": n.name, "shape": _val_shape(n), "dtype": str(n.meta["val"].dtype)}
        for n in program.graph.nodes
        if n.op == "placeholder" and n.name in sig.user_inputs
    ]
    groups: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
    for name, shape in shapes.items():
        match = re.fullmatch(r"(.+)\.factors\.(\d+)", name)
        if match and len(shape) == 3:
            groups.setdefault(match.group(1), []).append((int(match.group(2)), shape))
    factorized = []
    for layer, factors in groups.items():
        factors.sort()
        bias = shapes.get(f"{layer}.bias")
        in_shape = tuple(s[2] for _, s in factors)
        out_shape = tuple(s[1] for _, s in factors)
        factorized.append(
            {
                "name": layer, "rank": factors[0][1][0],
                "in_shape": in_shape, "out_shape": out_shape,
                "params": sum(math.prod(s) for _, s in factors) + (math.prod(bias) if bias else 0),
                "dense_params": math.prod(in_shape) * math.prod(out_shape)
                + (math.prod(bias) if bias else 0),
            }
        )  # fmt: skip
    ops = []
    for node in program.graph.nodes:
        name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
        if name.split(".")[0] not in MATMUL_OPS:
            continue
        operands = [a for a in node.args if isinstance(a, fx.Node)]
        ops.append(
            {
                "op": f"aten.{name}",
                "operands": [
                    {"param": _param_source(a, params), "shape": _val_shape(a)} for a in operands
                ],
                "out": _val_shape(node),
            }
        )
    return {
        "inputs": inputs,
        "parameters": {k: list(v) for k, v in shapes.items()},
        "num_parameters": sum(math.prod(v) for v in shapes.values()),
        "factorized": factorized,
        "ops": ops,
    }


def format_program(info: dict[str, Any], title: str) -> str:
    """:func:`describe_program`'s result as readable text."""
    lines = [title]
    lines.append(
        "  inputs: "
        + ", ".join(f"{i['name']} {format_shape(i['shape'])} {i['dtype']}" for i in info["inputs"])
    )
    params = info["parameters"]
    lines.append(f"  parameters ({len(params)} tensors, {info['num_parameters']:,} values):")
    width = max((len(k) for k in params), default=0)
    lines.extend(f"    {k.ljust(width)}  {format_shape(tuple(v))}" for k, v in params.items())
    if info["factorized"]:
        lines.append("  NdLinear layers:")
        for f in info["factorized"]:
            lines.append(
                f"    {f['name']}: rank {f['rank']}, {format_shape(f['in_shape'])} -> "
                f"{format_shape(f['out_shape'])}, {f['params']:,} params "
                f"(dense {f['dense_params']:,})"
            )
    lines.append(f"  linear/matmul ops ({len(info['ops'])}):")
    for op in info["ops"]:
        operands = ", ".join(
            f"{o['param'] or ''}<{format_shape(o['shape'])}>" for o in op["operands"]
        )
        lines.append(f"    {op['op']}({operands}) -> {format_shape(op['out'])}")
    return "\n".join(lines)
