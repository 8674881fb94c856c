"""FX front end: trace a model with NdLinear layers as leaves and propagate shapes."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ndcompile.errors import NdCompileError, UntraceableError
from ndcompile.layers.ndlinear import NdLinear

__all__ = [
    "NdTracer",
    "as_tuple",
    "is_reference_ndlinear",
    "node_shape",
    "propagate_shapes",
    "run_reference",
    "trace",
]


def is_reference_ndlinear(module: nn.Module) -> bool:
    """True for the reference package's ``ndlinear.NdLinear`` (checked by type name)."""
    cls = type(module)
    return cls.__name__ == "NdLinear" and cls.__module__.split(".")[0] == "ndlinear"


class NdTracer(fx.Tracer):
    """``fx.Tracer`` keeping NdLinear layers (ours and the reference one) as leaves.

    The reference ``ndlinear.NdLinear`` cannot be traced symbolically (its forward
    unpacks a shape proxy), and ours is handled as one known contraction.

    Args:
        leaf_modules: Extra module types to keep as leaves.
    """

    def __init__(self, leaf_modules: Sequence[type[nn.Module]] = ()) -> None:
        super().__init__()
        self.extra_leaves = tuple(leaf_modules)

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        """Trace ``root``; grad-mode changes inside ``forward`` make it untraceable.

        torch.fx does not record ``torch.no_grad()``/``set_grad_enabled`` blocks, so a
        traced graph would silently compute gradients the model meant to block.
        """
        original = torch._C._set_grad_enabled

        def refuse(mode: bool) -> None:
            raise RuntimeError(
                "forward changes the grad mode (torch.no_grad/set_grad_enabled), which "
                "torch.fx cannot record"
            )

        torch._C._set_grad_enabled = refuse  # type: ignore[assignment]
        try:
            graph = super().trace(root, concrete_args)
        finally:
            torch._C._set_grad_enabled = original  # type: ignore[assignment]
        for node in graph.nodes:
            if isinstance(node.type, str):  # PEP 563 string annotations break pickling
                node.type = None
        return graph

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, NdLinear) or is_reference_ndlinear(m):
            return True
        if self.extra_leaves and isinstance(m, self.extra_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def as_tuple(example_input: Any) -> tuple[Any, ...]:
    """Normalise an example input (a tensor or a tuple/list of them) to a tuple."""
    if isinstance(example_input, tuple | list):
        return tuple(example_input)
    return (example_input,)


def trace(model: nn.Module, *, leaf_modules: Sequence[type[nn.Module]] = ()) -> fx.GraphModule:
    """Symbolically trace ``model`` with :class:`NdTracer`.

    Args:
        model: The module to trace (not modified).
        leaf_modules: Extra module types to keep as leaves.

    Returns:
        A GraphModule sharing ``model``'s submodules and parameters.

    Raises:
        NdCompileError: If tracing fails; names the model and the tracing error.
    """
    tracer = NdTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # any tracing failure is reported the same way
        raise UntraceableError(
            f"cannot trace {type(model).__name__} with torch.fx: {type(exc).__name__}: {exc}",
            layer=type(model).__name__,
            hint="make data-dependent control flow static, or pass the offending submodule "
            "type in leaf_modules=... so it is kept as an opaque call",
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    # GraphModule rebuilds modules reached only through get_attr paths as plain
    # nn.Module containers; put the real ones (e.g. NdLinear) back.
    for name, module in list(gm.named_modules()):
        if name and type(module) is nn.Module:
            real = tracer.root.get_submodule(name)
            if type(real) is not nn.Module:
                parent, _, leaf = name.rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, leaf, real)
    return gm


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> None:
    """Fill ``node.meta["tensor_meta"]`` by running ``gm`` on the example inputs.

    Raises:
        NdCompileError: If the model fails on the example input (wrong shape, ...).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]
    if len(example_inputs) < len(required) or len(example_inputs) > len(placeholders):
        raise NdCompileError(
            f"the model's forward takes {len(required)}..{len(placeholders)} inputs "
            f"({', '.join(n.name for n in placeholders)}), got {len(example_inputs)}",
            hint="pass a tuple with one example tensor per forward argument",
        )
    try:
        # ShapeProp prints a traceback to stderr on failure; the error below says it all.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        raise _example_error(type(gm).__name__, example_inputs, exc) from exc


def run_reference(model: nn.Module, example_inputs: tuple[Any, ...]) -> Any:
    """Run the original model on the example inputs without recording gradients.

    Raises:
        NdCompileError: If the model fails on the example input.
    """
    try:
        with torch.no_grad():
            return model(*example_inputs)
    except Exception as exc:
        raise _example_error(type(model).__name__, example_inputs, exc) from exc


def _example_error(name: str, example_inputs: tuple[Any, ...], exc: Exception) -> NdCompileError:
    exc = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc  # ShapeProp wraps it
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in example_inputs]
    return NdCompileError(
        f"running the model on the example input {shapes} failed: "
        f"{type(exc).__name__}: {exc}".splitlines()[0],
        layer=name,
        hint="give an example input of the shape the model expects",
    )


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The static shape recorded by shape propagation, or None."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None
