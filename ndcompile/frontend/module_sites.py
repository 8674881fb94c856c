"""Linear sites of a whole model, from a :class:`~ndcompile.frontend.capture.Capture`.

Every Linear-like layer of the model gets a :class:`~ndcompile.frontend.sites.LinearSite`:
called ones get modes planned from their input (dims a reshape merged, or a balanced
factorisation of the feature size), the others a reason (never called on the
example, part of an NdLinear layer, a functional call module surgery cannot
replace, ...). transformers ``Conv1D`` layers get an ``nn.Linear`` view of their
weight (stored transposed) so every fit sees one convention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ndcompile.errors import NdCompileError
from ndcompile.frontend.capture import Capture, LinearCall, linear_like
from ndcompile.frontend.sites import (
    LinearSite,
    ShapeOverrides,
    plan_site,
    subclass_skip_reason,
    tied_parameters,
)
from ndcompile.frontend.trace import is_reference_ndlinear

__all__ = ["conv1d_as_linear", "plan_module_sites"]


def conv1d_as_linear(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what a transformers ``Conv1D`` computes.

    Its weight is a transposed *view* of the Conv1D's ``(in, out)`` weight (no copy),
    and its bias is the Conv1D's bias.
    """
    weight = cast(Tensor, conv.weight)
    bias = cast(Tensor | None, conv.bias)
    n_in, n_out = weight.shape
    linear = nn.Linear(n_in, n_out, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().t(), requires_grad=weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
    return linear


def _containers(model: nn.Module) -> dict[str, str]:
    """Qualified name -> class of every NdLinear-like layer that holds Linears itself."""
    return {n: type(m).__name__ for n, m in model.named_modules() if is_reference_ndlinear(m)}


def _inside(name: str, containers: Mapping[str, str]) -> str | None:
    for prefix, cls in containers.items():
        if name.startswith(f"{prefix}."):
            return f"part of {cls} {prefix!r} (exact mode converts it as one layer)"
    return None


def plan_module_sites(
    model: nn.Module,
    capture: Capture,
    *,
    shapes: ShapeOverrides | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    n_modes: int = 2,
    min_features: int = 16,
) -> list[LinearSite]:
    """One site per Linear-like layer of ``model`` (call order first, then the rest).

    Args:
        model: The model the capture ran on.
        capture: Its Linear-like calls.
        shapes: Per-layer ``(in_modes, out_modes)`` overrides by qualified name.
        include: Glob patterns of layer names to convert (default: all).
        exclude: Glob patterns of layer names to leave alone.
        n_modes: Modes to split a feature size into when the input gives none.
        min_features: Layers with fewer input or output features are skipped.

    Returns:
        Sites with modes or a skip reason.

    Raises:
        NdCompileError: If ``shapes`` names a layer that is not Linear-like.
    """
    calls: dict[str, list[LinearCall]] = {}
    for call in capture.calls:
        calls.setdefault(call.name, []).append(call)
    layers = {n: m for n, m in model.named_modules() if n and linear_like(m)}
    unknown = sorted(set(shapes or {}) - set(layers))
    if unknown:
        raise NdCompileError(
            f"shapes overrides name layers that are not nn.Linear in the model: {unknown} "
            "(Linear-like layers are nn.Linear and transformers Conv1D)",
            hint=f"valid names: {', '.join(sorted(layers)) or '(none)'}",
        )
    tied = tied_parameters(model)
    containers = _containers(model)
    order = [n for n in capture.names() if n in layers]
    order += [n for n in layers if n not in calls]
    sites = [
        _site(name, layers[name], calls.get(name, []), capture, containers, tied) for name in order
    ]
    for site in sites:
        if site.skip_reason is None:
            first = calls[site.name][0]
            plan_site(
                site,
                first.graph_modes,
                shapes or {},
                include,
                exclude,
                n_modes,
                min_features,
                tied,
            )
    sites += [_functional_site(model, n, found) for n, found in calls.items() if n not in layers]
    return sites


def _site(
    name: str,
    module: nn.Module,
    found: list[LinearCall],
    capture: Capture,
    containers: Mapping[str, str],
    tied: dict[int, list[str]],
) -> LinearSite:
    kind = linear_like(module) or "Linear"
    linear = conv1d_as_linear(module) if kind == "Conv1D" else module
    assert isinstance(linear, nn.Linear)
    if kind == "Conv1D":  # the tied-weight check looks at the Conv1D's own parameter
        tied[id(linear.weight)] = tied.get(id(module.weight), [])
    site = LinearSite(name, linear, kind=kind, calls=len(found))
    if found:
        site.rows = max(1, _rows(found[0].input_shape))
    site.skip_reason = _inside(name, containers)
    if site.skip_reason is not None:
        return site
    computed = _computed_weight(module)
    if computed is not None:
        site.skip_reason = (
            f"its weight is computed by {computed}, not a plain parameter; remove the "
            "reparametrization (e.g. torch.nn.utils.parametrize.remove_parametrizations) "
            "to convert it"
        )
    elif not found:
        how = "(captured with torch.export)" if capture.method == "torch.export" else ""
        site.skip_reason = f"not called on the example input {how}".strip()
    elif any(c.kind == "F.linear" for c in found):
        caller = next(c.caller for c in found if c.kind == "F.linear") or "<root>"
        site.skip_reason = (
            f"its weight is used by F.linear inside {caller!r}, not through its own forward: "
            "replacing the module would not change that call"
        )
    elif kind == "Linear":
        site.skip_reason = subclass_skip_reason(linear, found[0].input_shape)
    return site


def _computed_weight(module: nn.Module) -> str | None:
    """What computes a layer's weight when it is not a plain parameter (None if it is)."""
    if parametrize.is_parametrized(module, "weight"):
        kinds = [type(p).__name__ for p in module.parametrizations["weight"]]  # type: ignore[union-attr,index]
        return f"a parametrization ({', '.join(kinds)})"
    if "weight" not in module._parameters:
        hooks = [type(h).__name__ for h in module._forward_pre_hooks.values()]
        return f"a forward pre-hook ({', '.join(hooks) or 'unknown'})"
    return None


def _functional_site(model: nn.Module, name: str, found: list[LinearCall]) -> LinearSite:
    owner = model.get_submodule(name) if name else model
    param = found[0].param
    weight = getattr(owner, param).detach()
    out_f, in_f = weight.shape if weight.dim() == 2 else (0, 0)
    view = nn.Linear(int(in_f), int(out_f), bias=False, device="meta")
    view.weight = nn.Parameter(weight, requires_grad=False)
    site = LinearSite(f"{name}.{param}" if name else param, view, kind="F.linear", calls=len(found))
    site.rows = max(1, _rows(found[0].input_shape))
    where = f"F.linear on parameter {param!r} of {type(owner).__name__} {name or '<root>'!r}"
    if isinstance(owner, nn.MultiheadAttention):
        why = (
            "a subclass of nn.MultiheadAttention (its forward may differ)"
            if type(owner) is not nn.MultiheadAttention
            else "the model itself, excluded, or read from a checkpoint"
        )
        site.skip_reason = (
            f"{where}: the attention is {why}, so it is not split into separate "
            "q/k/v projection layers (ndcompile.layers.attention.ProjectedAttention)"
        )
        return site
    site.skip_reason = (
        f"{where}: module surgery replaces modules, not functional calls; convert with "
        "output='graph' if the model traces with torch.fx"
    )
    return site


def _rows(shape: tuple[int, ...]) -> int:
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows
