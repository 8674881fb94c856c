"""Helpers shared by the passes that rewrite dynamo graphs (the ``ndcompile`` backend).

A dynamo graph differs from a ``symbolic_trace`` graph: parameters are lifted to
placeholders, an ``nn.Linear`` is a ``call_function`` to ``torch._C._nn.linear``,
every node carries a FakeTensor in ``meta["example_value"]`` and leading dims may
be SymInts. The helpers here read shapes from those FakeTensors, evaluate newly
inserted nodes on fakes (to validate a rewrite before it is committed), restore
symbolic leading dims after a contraction, and copy a dynamo graph module with the
bookkeeping ``compile_fx`` expects.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from typing import Any, cast

import sympy
import torch
import torch.fx as fx
from torch import Tensor

from ndcompile.errors import NdCompileError

__all__ = [
    "LINEAR_TARGETS",
    "add_constant_inputs",
    "commit_replacement",
    "copy_dynamo_graph",
    "example_value",
    "fake_mode_of",
    "is_linear",
    "linear_args",
    "module_path",
    "restore_leading",
    "rows_hint",
    "same_shape",
    "size_expr",
    "size_hint",
    "static_int",
]

#: Call targets that compute ``x @ W.T + b`` in a dynamo graph.
LINEAR_TARGETS: tuple[Any, ...] = (torch._C._nn.linear, torch.nn.functional.linear)

#: Size assumed for a symbolic dim that has no hint.
DEFAULT_HINT = 64

#: Attributes dynamo sets on the graph module it hands to a backend.
_DYNAMO_ATTRS = (
    "_param_name_to_source",
    "_source_to_user_stacks",
    "compile_subgraph_reason",
    "_backend_id",
)


def is_linear(node: object) -> bool:
    """True for a ``linear(x, weight, bias)`` call node."""
    return (
        isinstance(node, fx.Node) and node.op == "call_function" and (node.target in LINEAR_TARGETS)
    )


def linear_args(node: fx.Node) -> tuple[Any, Any, Any]:
    """``(input, weight, bias)`` of a linear node, whether passed by position or keyword."""
    args = list(node.args) + [None] * (3 - len(node.args))
    x = node.kwargs.get("input", args[0])
    w = node.kwargs.get("weight", args[1])
    b = node.kwargs.get("bias", args[2])
    return x, w, b


def example_value(node: object) -> Any:
    """The FakeTensor (or SymInt) dynamo recorded for ``node``, or None."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value")


def static_int(value: Any) -> int | None:
    """``value`` as a Python int if it is a static size, else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        return int(expr) if expr.is_Integer else None
    return None


def size_expr(value: Any) -> sympy.Expr:
    """A sympy expression for a static or symbolic size."""
    if isinstance(value, torch.SymInt):
        return value.node.expr
    if isinstance(value, sympy.Basic):
        return value
    return sympy.Integer(int(value))


def size_hint(value: Any) -> int:
    """A concrete guess for a size: itself if static, its hint if symbolic."""
    fixed = static_int(value)
    if fixed is not None:
        return fixed
    hint = getattr(getattr(value, "node", None), "hint", None)
    return int(hint) if isinstance(hint, int) and hint > 0 else DEFAULT_HINT


def same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Structural equality of two shapes with static or symbolic sizes."""
    if len(a) != len(b):
        return False
    return all(sympy.expand(size_expr(x) - size_expr(y)) == 0 for x, y in zip(a, b, strict=True))


def module_path(node: fx.Node, *, kind: str | None = None) -> tuple[str, str] | None:
    """Qualified name and type name of the module that made ``node``.

    The innermost module is taken, or the innermost whose type is named ``kind``
    (``"ndlinear.NdLinear"`` matches the class ``NdLinear`` of package ``ndlinear``).
    Dynamo records ``L['self'].fc1`` style paths; the ``L[...]`` root is dropped.
    """
    stack = node.meta.get("nn_module_stack") or {}
    found = None
    for path, cls in stack.values():
        name = _type_name(cls)
        if kind is None or name == kind:
            found = (path, name)
    if found is None:
        return None
    path = re.sub(r"^L\[['\"][^'\"]*['\"]\]\.?", "", str(found[0]))
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
    return path.lstrip(".") or "<root>", found[1]


def _type_name(cls: Any) -> str:
    if not isinstance(cls, type):
        return str(cls)
    package = cls.__module__.split(".")[0]
    return cls.__name__ if package == "torch" else f"{package}.{cls.__name__}"


def fake_mode_of(gm: fx.GraphModule) -> Any:
    """The FakeTensorMode dynamo used for the nodes' example values (None if none).

    This is not the tracing context's mode: dynamo hands the backend a fresh mode
    (sharing the ShapeEnv), and FakeTensors of two modes cannot be mixed.
    """
    for node in gm.graph.nodes:
        mode = getattr(example_value(node), "fake_mode", None)
        if mode is not None:
            return mode
    return None


def _fake_run(node: fx.Node) -> Any:
    def value(arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            if "example_value" not in arg.meta:
                raise NdCompileError(f"no example value for {arg.format_node()}")
            return arg.meta["example_value"]
        return arg

    args = fx.node.map_aggregate(node.args, value)
    kwargs = fx.node.map_aggregate(node.kwargs, value)
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    raise NdCompileError(f"cannot evaluate {node.format_node()} on fake tensors")


def _erase(graph: fx.Graph, nodes: Sequence[fx.Node]) -> None:
    for node in reversed(nodes):
        if not node.users:
            graph.erase_node(node)


def commit_replacement(
    graph: fx.Graph,
    new_nodes: Sequence[fx.Node],
    result: fx.Node,
    old: fx.Node,
    dead: Sequence[fx.Node],
    fake_mode: Any,
) -> bool:
    """Validate inserted nodes on FakeTensors, then replace ``old`` by ``result``.

    Every node of ``new_nodes`` (in graph order) is evaluated on fakes; the result
    must have ``old``'s shape and dtype. On any failure the inserted nodes are
    removed and the graph is left as it was.

    Args:
        graph: The graph being rewritten.
        new_nodes: The nodes inserted for the replacement, in order.
        result: The node computing the replacement value.
        old: The node whose value is replaced.
        dead: Nodes (in order, ending with ``old``) to erase once replaced.
        fake_mode: The graph's FakeTensorMode, or None to skip evaluation.

    Returns:
        True if the replacement was committed.
    """
    expected = example_value(old)
    try:
        if fake_mode is not None:
            with fake_mode:
                for node in new_nodes:
                    node.meta["example_value"] = _fake_run(node)
        got = example_value(result) if fake_mode is not None else expected
        ok = (
            isinstance(got, Tensor)
            and isinstance(expected, Tensor)
            and got.dtype == expected.dtype
            and same_shape(got.shape, expected.shape)
        )
    except Exception:  # a failed fake evaluation means "no rewrite", never a crash
        ok = False
    if not ok:
        _erase(graph, new_nodes)
        return False
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in old.meta:
            result.meta.setdefault(key, old.meta[key])
    old.replace_all_uses_with(result)
    _erase(graph, dead)
    return True


def restore_leading(
    graph: fx.Graph, x: fx.Node, lead: Sequence[Any], y: fx.Node, tail: Sequence[int]
) -> fx.Node:
    """Reshape ``y`` of shape ``(prod lead, *tail)`` to ``(*lead, *tail)``.

    Static leading sizes are written as ints; one symbolic size becomes ``-1``;
    further symbolic sizes are read from ``x`` with ``aten.sym_size``.
    """
    if len(lead) == 1:
        return y
    symbolic = [k for k, s in enumerate(lead) if static_int(s) is None]
    shape: list[Any] = []
    for k, s in enumerate(lead):
        fixed = static_int(s)
        if fixed is not None:
            shape.append(fixed)
        elif k == symbolic[0]:
            shape.append(-1)
        else:
            shape.append(graph.call_function(torch.ops.aten.sym_size.int, (x, k)))
    return graph.call_method("reshape", (y, (*shape, *tail)))


def copy_dynamo_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a dynamo graph module that ``compile_fx`` still recognises.

    Node metadata is copied shallowly (FakeTensors are shared); the placeholders'
    ``_dynamo_source`` and the module's dynamo attributes are carried over.
    """
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    val_map: dict[fx.Node, fx.Node] = {}
    copied = graph.graph_copy(gm.graph, val_map, return_output_node=True)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    if copied is not None:
        # With return_output_node=True graph_copy returns (output value, old output node).
        value, old_output = cast(tuple[Any, fx.Node], copied)
        out = graph.output(value, type_expr=getattr(old_output, "type", None))
        out.meta = copy.copy(old_output.meta)
    for old, new in val_map.items():
        if old.op == "placeholder" and hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source  # type: ignore[attr-defined]
    new_gm = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new_gm.meta = gm.meta
    for attr in _DYNAMO_ATTRS:
        if hasattr(gm, attr):
            setattr(new_gm, attr, getattr(gm, attr))
    return new_gm


def add_constant_inputs(
    gm: fx.GraphModule, tensors: dict[str, Tensor], fake_mode: Any
) -> dict[str, fx.Node]:
    """Append placeholders for compile-time constants (fed by the backend's wrapper).

    ``compile_fx`` rejects new ``get_attr`` tensors in a dynamo graph, but accepts
    extra inputs without a dynamo source (as dynamo's DDP optimizer does).

    Returns:
        The new placeholder node of each constant, by name.
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    nodes: dict[str, fx.Node] = {}
    anchor = placeholders[-1] if placeholders else None
    for name, tensor in tensors.items():
        if anchor is None:
            with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
                node = gm.graph.placeholder(name)
        else:
            with gm.graph.inserting_after(anchor):
                node = gm.graph.placeholder(name)
        node._dynamo_source = None  # type: ignore[attr-defined]
        if fake_mode is not None:
            node.meta["example_value"] = fake_mode.from_tensor(tensor, static_shapes=True)
        nodes[name] = anchor = node
    return nodes


def rows_hint(lead: Sequence[Any]) -> int:
    """Concrete guess for the number of rows ``prod(lead)``."""
    return max(1, math.prod(size_hint(s) for s in lead))
