"""Dense reconstruction: turn every NdLinear of a converted model back into ``nn.Linear``.

A converted ``fx.GraphModule`` holds each NdLinear contraction inlined as explicit
ops that read the layer's factors with ``get_attr``. :func:`to_dense` copies the
module and, for every contraction, calls a dense ``nn.Linear`` (the layer's
:meth:`~ndcompile.layers.ndlinear.NdLinear.to_dense`) on the contraction's input instead,
then lets dead-code elimination drop the contraction ops.

The ops of one inlined call are the nodes tagged by
:func:`~ndcompile.passes.fx.emit.emit_ndlinear` with the same
``meta[REGION] = "<layer>@<output node>"``; the output carries
``meta[PLAN]``, and the input is the one node outside the region that
the region reads. Whether the call sees flattened modes (an ``nn.Linear`` site) or
N-D modes is read from the shapes recorded at conversion (``meta["tensor_meta"]``).

Before (``gm.code``)::

    reshape = flatten.reshape((-1, 4, 24)) ... matmul_1 = torch.matmul(reshape_3, reshape_4)
    reshape_5 = matmul_1.reshape((-1, 64)); add_1 = reshape_5 + fc1_bias

After::

    fc1 = self.fc1(flatten)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import cast

import torch
import torch.fx as fx
from torch import nn

from ndcompile.errors import NdCompileError
from ndcompile.ir.meta import PLAN, REGION
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.passes import set_submodule

__all__ = ["ContractionSite", "find_contraction_sites", "to_dense"]

#: Node meta key grouping the ops emitted for one NdLinear call.
REGION_KEY = REGION


@dataclass
class ContractionSite:
    """One NdLinear call in a graph (an inlined contraction or a ``call_module``).

    Attributes:
        layer: Qualified name of the NdLinear.
        input: The node fed to the layer (``(*, prod d)`` or ``(*, d1..dN)``).
        output: The node holding the layer's result.
        flat: True when input and output have flattened modes (an ``nn.Linear`` site).
    """

    layer: str
    input: fx.Node
    output: fx.Node
    flat: bool


def _submodule(gm: fx.GraphModule, name: str) -> nn.Module | None:
    try:
        return gm.get_submodule(name)
    except AttributeError:
        return None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def _is_flat(layer: NdLinear, x: fx.Node, out: fx.Node, name: str) -> bool:
    """Whether the call works on flattened modes, from the recorded shapes."""
    n = len(layer.in_shape)
    if n == 1:
        return True
    for shape, modes, features in (
        (_shape(x), layer.in_shape, layer.in_features),
        (_shape(out), layer.out_shape, layer.out_features),
    ):
        if shape is None:
            continue
        if tuple(shape[-n:]) == modes:
            return False
        if shape and shape[-1] == features:
            return True
    raise NdCompileError(
        f"cannot tell whether the call at {out.format_node()} sees flattened or N-D "
        f"inputs: no shape matching {layer.in_shape} or ({layer.in_features},) is recorded",
        layer=name,
        hint="run torch.fx.passes.shape_prop.ShapeProp on the graph first",
    )


def _is_shape_query(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)


def _region_site(gm: fx.GraphModule, tag: str, nodes: list[fx.Node]) -> ContractionSite:
    name = tag.rpartition("@")[0]
    layer = _submodule(gm, name)
    if not isinstance(layer, NdLinear):
        raise NdCompileError(
            f"contraction region {tag!r} names {name!r}, which is not an NdLinear in the model",
            layer=name,
        )
    members = set(nodes)
    outputs = [n for n in nodes if PLAN in n.meta]
    escaping = [n for n in nodes if any(u not in members for u in n.users)]
    # Leading dims may be read from an earlier layer's input (``x0.shape``): a shape
    # query is not a data input of the region.
    inputs = list(
        dict.fromkeys(
            a
            for n in nodes
            if not _is_shape_query(n)
            for a in n.all_input_nodes
            if a not in members
        )
    )
    if len(outputs) != 1 or any(n is not outputs[0] for n in escaping) or len(inputs) != 1:
        raise NdCompileError(
            f"contraction region {tag!r} is not a single call: outputs "
            f"{[n.name for n in outputs]}, values used outside {[n.name for n in escaping]}, "
            f"inputs {[n.name for n in inputs]}",
            layer=name,
            hint="a later pass changed the layer's ops; call to_dense on the result of "
            "ndcompile.convert directly",
        )
    x, out = inputs[0], outputs[0]
    return ContractionSite(name, x, out, _is_flat(layer, x, out, name))


def find_contraction_sites(gm: fx.GraphModule) -> list[ContractionSite]:
    """Every NdLinear call in ``gm`` in graph order: inlined contractions and ``call_module``.

    Raises:
        NdCompileError: If a region does not have one input and one output, or a
            marked contraction output has no region.
    """
    regions: dict[str, list[fx.Node]] = {}
    order: list[tuple[fx.Node, str | None]] = []
    for node in gm.graph.nodes:
        tag = node.meta.get(REGION_KEY)
        if isinstance(tag, str):
            regions.setdefault(tag, []).append(node)
        if PLAN in node.meta and not isinstance(tag, str):
            raise NdCompileError(
                f"the contraction ending at {node.format_node()} carries no region tag",
                hint="to_dense works on graphs made by ndcompile.convert/optimize",
            )
        if PLAN in node.meta or (
            node.op == "call_module" and isinstance(_submodule(gm, node.target), NdLinear)
        ):
            order.append((node, tag if isinstance(tag, str) else None))
    sites = []
    for node, tag in order:
        if tag is None:
            # An untagged site is a call_module of an NdLinear on its input node.
            name = cast(str, node.target)
            layer = cast(NdLinear, gm.get_submodule(name))
            x = cast(fx.Node, node.args[0])
            sites.append(ContractionSite(name, x, node, len(layer.in_shape) == 1))
        else:
            sites.append(_region_site(gm, tag, regions[tag]))
    return sites


def _recorded_inputs(gm: fx.GraphModule) -> tuple[torch.Tensor, ...] | None:
    """Inputs shaped like the recorded example (seeded random floats), or None."""
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None:
            return None
        if meta.dtype.is_floating_point:
            inputs.append(torch.randn(tuple(meta.shape), generator=gen).to(meta.dtype))
        else:
            inputs.append(torch.zeros(tuple(meta.shape), dtype=meta.dtype))
    return tuple(inputs)


def _check_equal(converted: fx.GraphModule, dense: fx.GraphModule) -> None:
    """Compare both models on inputs shaped like the recorded example."""
    from ndcompile.pipeline.convert import relative_error

    inputs = _recorded_inputs(converted)
    if inputs is None:
        return
    device = next((p.device for p in converted.parameters()), torch.device("cpu"))
    inputs = tuple(t.to(device) for t in inputs)
    with torch.no_grad():
        try:
            want = converted(*inputs)
        except Exception:  # the recorded shapes do not suffice to run the model
            return
        got = dense(*inputs)
    dtypes = {p.dtype for p in converted.parameters()}
    tol = 1e-10 if dtypes == {torch.float64} else 1e-2 if dtypes - {torch.float32} else 1e-4
    err = relative_error(want, got)
    if not err <= tol:
        raise NdCompileError(
            f"the dense model differs from the converted one (relative error {err:.3e} > {tol:g})",
            hint="please report this with the model",
        )


def _densify_graph(gm: fx.GraphModule) -> None:
    """Replace every NdLinear call of ``gm`` (in place) by a dense ``nn.Linear`` call."""
    graph = gm.graph
    replaced: dict[fx.Node, fx.Node] = {}
    for site in find_contraction_sites(gm):
        layer = cast(NdLinear, gm.get_submodule(site.layer))
        with graph.inserting_before(site.output):
            x = replaced.get(site.input, site.input)
            if not site.flat:
                x = graph.call_method("flatten", (x, -len(layer.in_shape)))
            y = graph.call_module(site.layer, (x,))
            if not site.flat:
                y = graph.call_method("unflatten", (y, -1, layer.out_shape))
        y.meta["tensor_meta"] = site.output.meta.get("tensor_meta")
        site.output.replace_all_uses_with(y)
        replaced[site.output] = y
        if site.output.op == "call_module":
            graph.erase_node(site.output)
    graph.eliminate_dead_code()
    for name in sorted(n for n, m in gm.named_modules() if isinstance(m, NdLinear)):
        left = [n for n in graph.nodes if n.op == "get_attr" and n.target.startswith(f"{name}.")]
        if left:
            raise NdCompileError(
                f"the graph still reads {[n.target for n in left]} outside the layer's "
                "contraction (a later pass fused it with other ops); cannot replace it by "
                "a dense Linear",
                layer=name,
            )
        set_submodule(gm, name, cast(NdLinear, gm.get_submodule(name)).to_dense())
    graph.lint()
    gm.recompile()


def _converted_graphs(model: nn.Module) -> list[str]:
    """Names of the outermost GraphModules under ``model`` that hold NdLinear layers."""
    if isinstance(model, fx.GraphModule):
        return [""]
    names: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in names):
            continue
        if isinstance(module, fx.GraphModule) and any(
            isinstance(m, NdLinear) for m in module.modules()
        ):
            names.append(name)
    return names


def to_dense(converted: nn.Module, *, check: bool = True) -> nn.Module:
    """A copy of ``converted`` with every NdLinear computed by a dense ``nn.Linear``.

    Each NdLinear submodule is replaced, under the same qualified name, by the
    ``nn.Linear`` holding its full weight (``sum_r kron(F1[r], ..., FN[r])``, plus
    the low-rank residual if any) and bias; the graph calls it on the (flattened)
    input in place of the contraction. The result computes the same function
    within floating-point tolerance and has no NdLinear left. ``converted`` is not
    modified.

    Args:
        converted: A model from :func:`ndcompile.convert` or ``optimize``: a
            GraphModule, or a model whose converted submodules are GraphModules
            (convert's result for models not traceable as a whole).
        check: Run each converted graph and its dense copy on seeded inputs shaped
            like the recorded example input and raise if they differ beyond
            floating-point tolerance.

    Returns:
        The dense model (a GraphModule when ``converted`` is one).

    Raises:
        NdCompileError: If a contraction cannot be located in a graph, an NdLinear
            is called eagerly outside any graph, or the check fails.
    """
    if not isinstance(converted, nn.Module):
        raise NdCompileError(f"to_dense expects an nn.Module, got {type(converted).__name__}")
    dense = copy.deepcopy(converted)
    for name in _converted_graphs(dense):
        # _converted_graphs names GraphModules ("" when the model is one).
        graph_module = cast(fx.GraphModule, dense.get_submodule(name) if name else dense)
        _densify_graph(graph_module)
        if check:
            original = cast(fx.GraphModule, converted.get_submodule(name) if name else converted)
            _check_equal(original, graph_module)
    for name, m in list(dense.named_modules()):
        if isinstance(m, NdLinear) and m.flat:  # a drop-in for nn.Linear (module surgery)
            set_submodule(dense, name, m.to_dense())
    eager = [name for name, m in dense.named_modules() if isinstance(m, NdLinear)]
    if eager:
        raise NdCompileError(
            f"NdLinear layers {eager} are called eagerly, outside a converted graph: an "
            "NdLinear takes (*, d1..dN) inputs and an nn.Linear flat ones, so one cannot "
            "stand in for the other",
            hint="convert the model (ndcompile.convert(..., mode='exact')) first, or use "
            "NdLinear.to_dense() and flatten the input yourself",
        )
    return dense
