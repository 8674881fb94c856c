"""Find ``nn.Linear`` call sites and the N-D mode structure of their inputs.

A Linear acts on ``(*, n)``; its leading dims are batch dims and are never mixed.
The modes ``(d1..dN)`` of the feature dim come from, in order of preference:

1. a user override ``shapes={"fc1": ((32, 32), (16, 16))}``;
2. dims merged by a ``flatten``/``view``/``reshape``/``nn.Flatten`` feeding the
   Linear: ``(B, H, W, C) -> (B, H*W*C)`` gives modes ``(H, W, C)``;
3. a balanced factorisation of ``n`` into ``n_modes`` factors (768 -> (24, 32)).

Output modes are a balanced factorisation of ``out_features`` into as many modes,
ordered like the input modes. Sites that cannot be split are kept with a reason.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ndcompile.compress.kronecker_shapes import plan_mode_shapes
from ndcompile.errors import NdCompileError
from ndcompile.frontend.trace import node_shape

__all__ = [
    "LinearSite",
    "ShapeOverrides",
    "find_linear_sites",
    "forward_is_linear",
    "is_selected",
    "merged_modes",
    "order_like",
    "subclass_skip_reason",
]

ShapeOverrides = Mapping[str, tuple[Sequence[int], Sequence[int]]]

_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}


@dataclass
class LinearSite:
    """One ``nn.Linear`` module and where the graph calls it.

    Attributes:
        name: Qualified module name.
        module: The Linear.
        nodes: The ``call_module`` nodes calling it (more than one if reused).
        in_shape: Input modes, or None if skipped.
        out_shape: Output modes, or None if skipped.
        source: Where the modes came from: ``"override"``, ``"graph"``, ``"factored"``.
        rows: Rows (product of leading dims) per call in the example input.
        skip_reason: Why the site is not converted, or None.
        kind: ``"Linear"``, ``"Conv1D"`` (transformers, weight stored transposed; ``module``
            is then an ``nn.Linear`` holding a transposed copy) or ``"F.linear"``.
        calls: Calls on the example input when the site was found without a graph.
    """

    name: str
    module: nn.Linear
    nodes: list[fx.Node] = field(default_factory=list)
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    source: str = ""
    rows: int = 1
    skip_reason: str | None = None
    kind: str = "Linear"
    calls: int = 0

    @property
    def n_calls(self) -> int:
        """How often the example input calls the layer."""
        return len(self.nodes) or self.calls

    @property
    def convertible(self) -> bool:
        """True when the site has modes and no skip reason."""
        return self.skip_reason is None and self.in_shape is not None


def order_like(values: Sequence[int], reference: Sequence[int]) -> tuple[int, ...]:
    """Permute ``values`` so their rank order follows ``reference``'s.

    ``order_like((12, 16, 16), (32, 32, 3)) == (16, 16, 12)``: the largest value goes
    where the reference is largest.
    """
    ranks = sorted(range(len(reference)), key=lambda k: (reference[k], k))
    out = [0] * len(values)
    for value, pos in zip(sorted(values), ranks, strict=True):
        out[pos] = value
    return tuple(out)


def _called_module(node: fx.Node) -> nn.Module:
    """The module a ``call_module`` node of a GraphModule's graph calls."""
    gm = node.graph.owning_module
    assert gm is not None  # the node is in a traced GraphModule
    return gm.get_submodule(cast(str, node.target))


def _graph_modes(node: fx.Node, n: int) -> tuple[int, ...] | None:
    """Modes merged by a reshape-family op producing ``node``, if any."""
    is_reshape = (
        (node.op == "call_method" and node.target in _RESHAPE_METHODS)
        or (node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS)
        or (node.op == "call_module" and isinstance(_called_module(node), nn.Flatten))
    )
    if not is_reshape or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    return merged_modes(node_shape(node.args[0]), node_shape(node), n)


def merged_modes(
    src: Sequence[int] | None, out: Sequence[int] | None, n: int
) -> tuple[int, ...] | None:
    """Modes a reshape from ``src`` to ``out`` merges into the last dim ``n``, if any.

    ``(B, H, W, C) -> (B, H*W*C)`` merges ``(H, W, C)``; leading dims must be kept
    as they are (they are batch dims), size-1 dims are dropped, and at least two
    modes must remain.
    """
    if src is None or out is None or not out or out[-1] != n:
        return None
    lead = tuple(out[:-1])
    if tuple(src[: len(lead)]) != lead:
        return None
    modes = tuple(int(d) for d in src[len(lead) :] if d != 1)
    if math.prod(modes) != n or len(modes) < 2:
        return None
    return modes


def tied_parameters(root: nn.Module) -> dict[int, list[str]]:
    """Parameter id -> every qualified name it appears under."""
    names: dict[int, list[str]] = {}
    for mod_name, mod in root.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False):
            names.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def is_selected(name: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    """Whether ``name`` matches one of ``include`` (all when empty) and none of ``exclude``."""
    if include and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, pat) for pat in exclude))


def check_override(name: str, module: nn.Linear, spec: object) -> tuple[tuple, tuple]:
    try:
        # Unchecked user input: a malformed spec raises TypeError / ValueError here.
        parts = cast(Iterable[Iterable[Any]], spec)
        in_shape, out_shape = (tuple(int(v) for v in part) for part in parts)
    except (TypeError, ValueError) as exc:
        raise NdCompileError(
            f"shapes override {spec!r} is not a pair (in_modes, out_modes)", layer=name
        ) from exc
    if math.prod(in_shape) != module.in_features or math.prod(out_shape) != module.out_features:
        raise NdCompileError(
            f"shapes override {in_shape} -> {out_shape} does not match Linear("
            f"{module.in_features}, {module.out_features})",
            layer=name,
            hint="the products of the modes must equal in_features and out_features",
        )
    if len(in_shape) != len(out_shape):
        raise NdCompileError(
            f"shapes override {in_shape} -> {out_shape} has different numbers of modes",
            layer=name,
        )
    return in_shape, out_shape


def find_linear_sites(
    gm: fx.GraphModule,
    *,
    shapes: ShapeOverrides | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    n_modes: int = 2,
    min_features: int = 16,
    name_prefix: str = "",
) -> list[LinearSite]:
    """List every ``nn.Linear`` in ``gm`` with its planned modes or a skip reason.

    ``gm`` must have been shape-propagated. Linears that exist in the module tree
    but are not called by the graph (e.g. inside an opaque leaf module) are listed
    too, with the reason.

    Args:
        gm: A traced, shape-propagated graph module.
        shapes: Per-layer ``(in_modes, out_modes)`` overrides by qualified name.
        include: Glob patterns of layer names to convert (default: all).
        exclude: Glob patterns of layer names to leave alone.
        n_modes: Modes to split a feature size into when the graph gives none.
        min_features: Layers with fewer input or output features are skipped.
        name_prefix: Prefix of ``gm`` inside a larger model (for partial conversion):
            ``include``/``exclude``/``shapes`` match ``name_prefix + name``.

    Returns:
        Sites in graph order, followed by uncalled Linears.
    """
    linears = {name_prefix + n for n, m in gm.named_modules() if isinstance(m, nn.Linear)}
    shapes = {
        k[len(name_prefix) :]: v
        for k, v in (shapes or {}).items()
        if k in linears or not name_prefix
    }
    unknown = sorted(set(shapes) - {n[len(name_prefix) :] for n in linears})
    if unknown:
        raise NdCompileError(
            f"shapes overrides name layers that are not nn.Linear in the model: {unknown}"
        )
    tied = tied_parameters(gm)
    sites: dict[str, LinearSite] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.Linear):
            continue
        site = sites.get(node.target)
        if site is None:
            site = sites[node.target] = LinearSite(node.target, module)
        site.nodes.append(node)
        x = node.args[0]
        shape = node_shape(x) if isinstance(x, fx.Node) else None
        if shape is None:
            site.skip_reason = "input shape unknown (shape propagation gave no metadata)"
            continue
        site.rows = math.prod(shape[:-1])
        if site.in_shape is not None or site.skip_reason is not None:
            continue
        site.skip_reason = subclass_skip_reason(module, shape)
        if site.skip_reason is not None:
            continue
        graph_modes = _graph_modes(x, module.in_features)
        plan_site(
            site, graph_modes, shapes, include, exclude, n_modes, min_features, tied, name_prefix
        )

    called = set(sites)
    for name, module in gm.named_modules():
        if isinstance(module, nn.Linear) and name not in called:
            parent = name.rpartition(".")[0] or "<root>"
            sites[name] = LinearSite(
                name,
                module,
                skip_reason=f"not called directly by the traced graph "
                f"(used inside {parent!r}, which is traced as a leaf)",
            )
    return list(sites.values())


def plan_site(
    site: LinearSite,
    graph_modes: tuple[int, ...] | None,
    shapes: Mapping[str, object],
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    n_modes: int,
    min_features: int,
    tied: dict[int, list[str]],
    name_prefix: str = "",
) -> None:
    """Fill ``site``'s modes, or its skip reason."""
    m = site.module
    if not is_selected(name_prefix + site.name, include, exclude):
        site.skip_reason = "not selected by include/exclude"
        return
    names = tied.get(id(m.weight), [])
    if len(names) > 1:
        others = [n for n in names if not n.startswith(f"{site.name}.")]
        site.skip_reason = f"weight is tied to {others}; converting would untie it"
        return
    if site.name in shapes:
        site.in_shape, site.out_shape = check_override(site.name, m, shapes[site.name])
        site.source = "override"
        return
    if min(m.in_features, m.out_features) < min_features:
        site.skip_reason = (
            f"too small to factorize (Linear({m.in_features}, {m.out_features}), "
            f"min_features={min_features})"
        )
        return
    modes = graph_modes
    site.source = "graph"
    if modes is None:
        modes = plan_mode_shapes(m.in_features, n_modes)
        site.source = "factored"
    if modes is None:
        site.skip_reason = (
            f"in_features={m.in_features} cannot be split into {n_modes} modes >= 2 "
            "(prime or too small)"
        )
        return
    out = plan_mode_shapes(m.out_features, len(modes))
    if out is None:
        site.skip_reason = (
            f"out_features={m.out_features} cannot be split into {len(modes)} modes >= 2 "
            f"to match input modes {modes}; pass shapes={{{site.name!r}: (in, out)}}"
        )
        return
    site.in_shape, site.out_shape = modes, order_like(out, modes)


def forward_is_linear(module: nn.Linear, input_shape: Sequence[int]) -> bool:
    """Whether a subclass of ``nn.Linear`` computes ``F.linear`` with its own weight and bias.

    Some model libraries subclass ``nn.Linear`` to write the same product another way
    (transformers' ``FalconLinear``: ``input @ self.weight.T + self.bias``); others add
    to it (scaling, adapters, dropout). The forward runs once, without gradients, on a
    seeded random input of the call's rank with at most two rows per leading dim, and is
    compared with ``F.linear``. A forward that fails, differs, or cannot run (weights on
    the meta device) counts as different.

    Args:
        module: The layer.
        input_shape: The shape of one of its calls' input.

    Returns:
        True when both agree to float tolerance.
    """
    weight = module.weight
    if not isinstance(weight, torch.Tensor) or weight.is_meta or not weight.is_floating_point():
        return False
    rows = tuple(min(int(d), 2) for d in input_shape[:-1])
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(*rows, module.in_features, generator=gen, dtype=torch.float64)
    probe = probe.to(device=weight.device, dtype=weight.dtype)
    try:
        with torch.no_grad():
            got = module(probe)
            want = F.linear(probe, weight, module.bias)
    except Exception:  # a forward that needs more than one tensor is not a plain Linear
        return False
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
        return False
    tol = 1e-3 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
    return bool(
        torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max().clamp(min=1)))
    )


def subclass_skip_reason(module: nn.Linear, input_shape: Sequence[int]) -> str | None:
    """Why a subclass of ``nn.Linear`` is not converted, or None (plain, or computes F.linear)."""
    if type(module) is nn.Linear or forward_is_linear(module, input_shape):
        return None
    if module.weight.is_meta:
        return (
            f"{type(module).__name__} subclasses nn.Linear, and its forward cannot be "
            "checked against F.linear with its weights on the meta device"
        )
    return (
        f"{type(module).__name__} subclasses nn.Linear and its forward differs from "
        "F.linear on a probe input"
    )
