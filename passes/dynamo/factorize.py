"""Dynamo pass: replace dense linear maps by nearest Kronecker sums (inference only).

For every ``linear(x, W, b)`` whose weight is a lifted parameter, the nearest
rank-R Kronecker sum of the *real* weight (from the backend's example inputs) is
computed once at compile time (:func:`ndcompile.compress.kronecker.nearest_kronecker` or
:func:`~ndcompile.compress.kronecker.rank_for_tolerance`) and the map becomes the planned
NdLinear contraction over those factors. The factors are constants: they enter
the graph as extra placeholders that the backend feeds on every call (a dynamo
graph cannot gain parameters or buffers). Gradients would not reach the dense
weight any more, so the pass refuses to run while autograd records a weight.

Before::

    linear = torch._C._nn.linear(l_x_, l_self_modules_fc_parameters_weight_, bias)

After::

    reshape = l_x_.reshape((-1, 6, 8))
    matmul = torch.matmul(_ndcompile_fc_f0, reshape) ...;  add = reshape_2 + bias
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ndcompile.compress.kronecker import KroneckerFit, nearest_kronecker, rank_for_tolerance
from ndcompile.compress.kronecker_shapes import plan_mode_shapes
from ndcompile.errors import NdCompileError
from ndcompile.frontend.sites import order_like
from ndcompile.ir.network import NetworkPlan, TensorNetwork
from ndcompile.ir.tiled import graph_tile
from ndcompile.kernels.kron2 import graph_kron2
from ndcompile.passes.dynamo.common import (
    add_constant_inputs,
    commit_replacement,
    example_value,
    fake_mode_of,
    is_linear,
    linear_args,
    module_path,
    restore_leading,
    rows_hint,
)
from ndcompile.passes.runner import ReportedResult
from ndcompile.report import LayerReport

__all__ = ["FACTORIZE_KEYS", "FactorizeSpec", "factorize_linears"]

#: Keys accepted in the backend's ``factorize`` option.
FACTORIZE_KEYS: tuple[str, ...] = ("rank", "tol", "max_rank", "n_modes", "min_features")


@dataclass(frozen=True)
class FactorizeSpec:
    """What to factorize and how.

    Attributes:
        rank: Kronecker rank R (clamped per layer to the largest useful rank).
        tol: Alternatively, the smallest rank whose relative weight error is <= tol.
        max_rank: Largest rank tried with ``tol``; layers not meeting it stay dense.
        n_modes: Modes each feature dim is split into.
        min_features: Layers with fewer input or output features stay dense.
    """

    rank: int | None = None
    tol: float | None = None
    max_rank: int = 8
    n_modes: int = 2
    min_features: int = 16

    @classmethod
    def from_option(cls, value: Mapping[str, Any] | None) -> FactorizeSpec | None:
        """Validate the backend's ``factorize`` option (None: no factorization)."""
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise NdCompileError(
                f"option 'factorize' must be None or a dict, got {value!r}",
                hint="use factorize={'rank': 2} or factorize={'tol': 0.05}",
            )
        unknown = sorted(set(value) - set(FACTORIZE_KEYS))
        if unknown:
            raise NdCompileError(
                f"unknown factorize keys {unknown}; valid keys are: {', '.join(FACTORIZE_KEYS)}"
            )
        spec = cls(**value)
        if (spec.rank is None) == (spec.tol is None):
            raise NdCompileError(
                f"factorize needs exactly one of 'rank' or 'tol', got {dict(value)}",
                hint="use factorize={'rank': 2} or factorize={'tol': 0.05, 'max_rank': 8}",
            )
        ints = {"max_rank": spec.max_rank, "n_modes": spec.n_modes, "rank": spec.rank or 1}
        bad = {k: v for k, v in ints.items() if not isinstance(v, int) or v < 1}
        if bad or spec.n_modes < 2 or (spec.tol is not None and not spec.tol >= 0):
            raise NdCompileError(
                f"invalid factorize values {dict(value)}: rank, max_rank >= 1, n_modes >= 2 "
                "and tol >= 0 are required"
            )
        return spec


def _max_rank(in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    sizes = [h * d for h, d in zip(out_shape, in_shape, strict=True)]
    return math.prod(sizes) // max(sizes)


def _constant_name(layer: str, k: int, taken: Mapping[str, Any]) -> str:
    base = f"_ndcompile_{re.sub(r'[^0-9a-zA-Z_]', '_', layer)}_f{k}"
    name, n = base, 1
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    return name


def _converted(
    name: str, w: Tensor, fit: KroneckerFit, modes: tuple, plan: NetworkPlan, rows: int
) -> LayerReport:
    return LayerReport(
        name=name,
        kind="Linear",
        status="converted",
        in_features=int(w.shape[1]),
        out_features=int(w.shape[0]),
        in_shape=modes[0],
        out_shape=modes[1],
        mode_source="factored",
        rank=fit.rank,
        params_before=w.numel(),
        params_after=sum(f.numel() for f in fit.factors),
        flops_before=2 * rows * w.numel(),
        flops_after=plan.flops,
        naive_flops=plan.naive_flops,
        largest_intermediate=plan.largest_intermediate,
        plan=str(plan),
        weight_rel_error=fit.rel_error,
        extra={"method": fit.method, "tol_met": fit.tol_met, "rows": rows},
    )


def _fit(spec: FactorizeSpec, w: Tensor, modes: tuple, layer: str) -> KroneckerFit:
    in_shape, out_shape = modes
    top = _max_rank(in_shape, out_shape)
    if spec.rank is not None:
        return nearest_kronecker(w, in_shape, out_shape, min(spec.rank, top), layer=layer)
    assert spec.tol is not None
    return rank_for_tolerance(w, in_shape, out_shape, spec.tol, max_rank=spec.max_rank, layer=layer)


def _skip(name: str, w: Tensor, reason: str) -> LayerReport:
    return LayerReport(
        name=name,
        kind="Linear",
        in_features=int(w.shape[1]),
        out_features=int(w.shape[0]),
        params_before=w.numel(),
        reason=reason,
    )


def _plan_layer(
    spec: FactorizeSpec, name: str, w: Tensor, rows: int, optimizer: str
) -> tuple[KroneckerFit, tuple, NetworkPlan] | LayerReport:
    """The fit, modes and plan of one layer, or a skipped entry saying why."""
    out_f, in_f = (int(s) for s in w.shape)
    if min(in_f, out_f) < spec.min_features:
        return _skip(
            name, w, f"too small (Linear({in_f}, {out_f}), min_features={spec.min_features})"
        )
    in_shape = plan_mode_shapes(in_f, spec.n_modes)
    out_modes = plan_mode_shapes(out_f, spec.n_modes)
    if in_shape is None or out_modes is None:
        return _skip(name, w, f"Linear({in_f}, {out_f}) cannot be split into {spec.n_modes} modes")
    modes = (in_shape, order_like(out_modes, in_shape))
    if torch.is_grad_enabled() and w.requires_grad:
        raise NdCompileError(
            f"factorize replaces the weight {tuple(w.shape)} by constants, so training "
            "would silently stop updating it",
            layer=name,
            hint="run the compiled model under torch.no_grad()/torch.inference_mode(), or "
            "use ndcompile.convert(model, x, mode='factorize') for trainable factors",
        )
    fit = _fit(spec, w.detach(), modes, name)
    if fit.tol_met is False:
        return _skip(
            name,
            w,
            f"no rank <= {spec.max_rank} meets tol={spec.tol} (error {fit.rel_error:.3g} at "
            f"rank {fit.rank})",
        )
    plan = TensorNetwork.from_ndlinear(*modes, rank=fit.rank).plan(optimizer, nominal_batch=rows)
    dense = 2 * rows * in_f * out_f
    if plan.flops >= dense:
        return _skip(name, w, f"rank {fit.rank} is not cheaper ({plan.flops:,} vs {dense:,} FLOPs)")
    return fit, modes, plan


def _emit(
    graph: fx.Graph,
    node: fx.Node,
    modes: tuple,
    factors: Sequence[fx.Node],
    rank: int,
    optimizer: str,
    rows: int,
) -> fx.Node:
    x, _, b = linear_args(node)
    in_shape, out_shape = modes
    tn = TensorNetwork.from_ndlinear(in_shape, out_shape, rank=rank)
    xr = graph.call_method("reshape", (x, (-1, *in_shape)))
    values = [example_value(f) for f in factors]
    tile = 0
    fused = False
    if all(isinstance(v, Tensor) for v in values):
        program = tn.plan(optimizer, nominal_batch=rows).program
        shapes = [tuple(v.shape) for v in values]
        biases = [] if b is None else [example_value(b)]
        fused = graph_kron2(example_value(x), in_shape, values, biases, example_value(node))
        tile = 0 if fused else graph_tile(program, in_shape, shapes, example_value(x), rows)
    if fused:
        # The generated kernel adds the bias as it writes each row.
        y = graph.call_function(torch.ops.ndcompile.kron2.default, (xr, *factors, b))
        b = None
    elif tile:
        args = (xr, list(factors), None, program.to_text(), tile)
        y = graph.call_function(torch.ops.ndcompile.tiled_contract.default, args)
    else:
        inputs = {"x": xr, **{f"W{k}": f for k, f in enumerate(factors)}}
        y = tn.emit(graph, inputs, optimizer=optimizer, nominal_batch=rows)
    y = graph.call_method("reshape", (y, (-1, math.prod(out_shape))))
    y = restore_leading(graph, x, tuple(example_value(x).shape[:-1]), y, (math.prod(out_shape),))
    if b is not None:
        y = graph.call_function(torch.add, (y, b))
    return y


def factorize_linears(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    spec: FactorizeSpec,
    *,
    optimizer: str = "auto",
) -> ReportedResult:
    """Replace dense linear maps of a dynamo graph by Kronecker-sum contractions.

    Args:
        gm: A dynamo graph module (modified in place).
        example_inputs: The backend's example inputs (real weights), one per placeholder.
        spec: Rank or tolerance and layer filters.
        optimizer: Planner optimizer.

    Returns:
        ``ReportedResult`` with one ``layers`` entry per dense linear and the
        ``constants``; the constants
        (factor tensors by placeholder name, in placeholder order) must be passed
        after the original inputs on every call.

    Raises:
        NdCompileError: If autograd is recording and a weight requires grad.
    """
    graph, fake_mode = gm.graph, fake_mode_of(gm)
    placeholders = list(graph.find_nodes(op="placeholder"))
    real = dict(zip(placeholders, example_inputs, strict=False))
    entries: list[LayerReport] = []
    constants: dict[str, Tensor] = {}
    shared: dict[fx.Node, tuple[KroneckerFit, tuple, NetworkPlan, list[fx.Node]]] = {}
    for node in [n for n in graph.nodes if is_linear(n)]:
        x, w_node, _ = linear_args(node)
        w = real.get(w_node)
        found = module_path(node)
        name = found[0] if found else getattr(w_node, "name", node.name)
        xv = example_value(x)
        if not isinstance(w, Tensor) or w.dim() != 2 or not isinstance(xv, Tensor):
            continue
        if is_fake(w):
            entries.append(_skip(name, w, "weight values are not available (fake tensor)"))
            continue
        rows = rows_hint(xv.shape[:-1])
        if w_node in shared:
            fit, modes, plan, factor_nodes = shared[w_node]
        else:
            planned = _plan_layer(spec, name, w, rows, optimizer)
            if isinstance(planned, LayerReport):
                entries.append(planned)
                continue
            fit, modes, plan = planned
            tensors = {
                _constant_name(name, k, constants): (f[0] if fit.rank == 1 else f).contiguous()
                for k, f in enumerate(fit.factors)
            }
            constants.update(tensors)
            factor_nodes = list(add_constant_inputs(gm, tensors, fake_mode).values())
            shared[w_node] = (fit, modes, plan, factor_nodes)
        before = set(graph.nodes)
        with graph.inserting_before(node):
            result = _emit(graph, node, modes, factor_nodes, fit.rank, optimizer, rows)
        new_nodes = [n for n in graph.nodes if n not in before]
        if not commit_replacement(graph, new_nodes, result, node, [node], fake_mode):
            entries.append(_skip(name, w, "the factorized map failed shape validation"))
            continue
        entries.append(_converted(name, w, fit, modes, plan, rows))
    for node in list(graph.find_nodes(op="placeholder")):
        if node.target in constants and not node.users:
            del constants[str(node.target)]
            graph.erase_node(node)
    if constants:
        graph.lint()
        gm.recompile()
    return ReportedResult(gm, bool(constants), layers=entries, constants=constants)
