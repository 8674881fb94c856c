"""Capture a model's Linear-like calls without ``torch.fx.symbolic_trace``.

Most real models (every Hugging Face transformer tried) cannot be traced
symbolically, but ``torch.export.export(..., strict=False)`` captures them: it
runs the model's Python on fake tensors and records ATen ops, each with the
``nn_module_stack`` of the module that called it. :func:`capture_linear_calls`
walks that graph for

- ``aten.linear`` (``nn.Linear`` and ``F.linear``) and
- ``aten.addmm`` with a parameter as the matrix (transformers ``Conv1D``),

and records, per call, the qualified name of the module owning the weight, the
input shape, and the modes a ``view``/``reshape``/``flatten`` merged right before
the call (the paper's image case). Where export fails (data-dependent control
flow, unsupported ops), forward hooks on the Linear-like modules record their
input shapes instead (no mode structure; functional calls are not seen), and the
reason is kept for the report.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn

from ndcompile.errors import first_line
from ndcompile.frontend.inputs import ExampleInputs, tensor_leaves
from ndcompile.frontend.sites import merged_modes

__all__ = ["Capture", "LinearCall", "capture_linear_calls", "is_conv1d", "linear_like"]

_aten = torch.ops.aten
_RESHAPES = {
    _aten.view.default,
    _aten.reshape.default,
    _aten._unsafe_view.default,
    _aten.flatten.using_ints,
}


@dataclass
class LinearCall:
    """One call of a Linear-like layer on the example input.

    Attributes:
        name: Qualified name of the module owning the weight.
        kind: ``"Linear"``, ``"Conv1D"`` or ``"F.linear"`` (a functional call on the
            parameter ``param`` of module ``name``).
        input_shape: Shape of the input at the call (features last).
        graph_modes: Modes merged by a reshape right before the call, or None.
        param: Name of the weight parameter inside the module.
        caller: Qualified name of the module whose forward made the call.
    """

    name: str
    kind: str
    input_shape: tuple[int, ...]
    graph_modes: tuple[int, ...] | None = None
    param: str = "weight"
    caller: str | None = None


@dataclass
class Capture:
    """What the front end saw.

    Attributes:
        method: ``"torch.export"`` or ``"forward hooks"``.
        calls: Every Linear-like call, in execution order.
        fallback_reason: Why export was not used (None when it was).
    """

    method: str
    calls: list[LinearCall] = field(default_factory=list)
    fallback_reason: str | None = None

    def names(self) -> list[str]:
        """Qualified names of the called layers, first call first, each once."""
        return list(dict.fromkeys(c.name for c in self.calls))


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (a Linear with its weight stored ``(in, out)``)."""
    cls = type(module)
    return (
        cls.__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(weight := getattr(module, "weight", None), Tensor)
        and weight.dim() == 2
    )


def linear_like(module: nn.Module) -> str | None:
    """``"Linear"`` or ``"Conv1D"`` for a Linear-like module, None otherwise."""
    if isinstance(module, nn.Linear):
        return "Linear"
    if is_conv1d(module):
        return "Conv1D"
    return None


class _TensorOutputs(nn.Module):
    """Calls the model and returns only the tensors of its output.

    Export refuses outputs it has no pytree for (e.g. a Hugging Face ``DynamicCache``);
    only the graph matters here, not what the output holds.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: object, **kwargs: object) -> tuple[Tensor, ...]:
        return tuple(tensor_leaves(self.model(*args, **kwargs)))


_PREFIX = "model."


def capture_linear_calls(model: nn.Module, example: ExampleInputs) -> Capture:
    """Every Linear-like call ``model`` makes on ``example``.

    Args:
        model: The model (a private copy: export may run its Python).
        example: The example call.

    Returns:
        A :class:`Capture`; export first, forward hooks where export fails.
    """
    try:
        capture = _export_calls(model, example)
    except Exception as exc:  # any export failure falls back to hooks, with the reason
        reason = f"{type(exc).__name__}: {first_line(exc)}"
        capture = _hook_calls(model, example)
        capture.fallback_reason = reason[:300]
        return capture
    _add_subclass_calls(model, example, capture)
    return capture


def _add_subclass_calls(model: nn.Module, example: ExampleInputs, capture: Capture) -> None:
    """Calls of ``nn.Linear`` subclasses whose forward export shows as other ops.

    A subclass may write the product as ``input @ self.weight.T`` (transformers'
    ``FalconLinear``), which the graph holds as a matmul, not a linear. Such layers
    are found by one more eager run with forward hooks on them alone; whether their
    forward really is a Linear is checked later
    (:func:`~ndcompile.frontend.sites.forward_is_linear`).
    """
    seen = {c.name for c in capture.calls}
    missing = {
        name
        for name, module in model.named_modules()
        if name
        and isinstance(module, nn.Linear)
        and type(module) is not nn.Linear
        and name not in seen
    }
    if not missing:
        return
    # On failure the layers stay "not called", as export saw them.
    with contextlib.suppress(Exception):
        capture.calls += _hook_calls(model, example, only=missing).calls


def _export_calls(model: nn.Module, example: ExampleInputs) -> Capture:
    quiet = logging.getLogger("torch._dynamo")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            program = torch.export.export(
                _TensorOutputs(model), example.args, example.kwargs, strict=False
            )
    finally:
        quiet.setLevel(level)
    params = program.graph_signature.inputs_to_parameters
    named = dict(model.named_parameters(remove_duplicate=False))
    capture = Capture("torch.export")
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is _aten.linear.default:
            x, w = node.args[0], node.args[1]
        elif node.target is _aten.addmm.default and len(node.args) >= 3:
            x, w = node.args[1], node.args[2]
        else:
            continue
        fqn = params.get(getattr(w, "name", ""))
        if fqn is None or not fqn.startswith(_PREFIX):
            continue  # a computed weight, not a layer's parameter
        call = _describe_call(model, named, node, x, fqn[len(_PREFIX) :])
        if call is not None:
            capture.calls.append(call)
    return capture


def _caller(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path[len(_PREFIX) :] if path.startswith(_PREFIX) else None


def _describe_call(
    model: nn.Module,
    named: dict[str, nn.Parameter],
    node: torch.fx.Node,
    x: object,
    fqn: str,
) -> LinearCall | None:
    val = getattr(x, "meta", {}).get("val")
    if not isinstance(val, Tensor):
        return None
    shape = tuple(int(d) for d in val.shape)
    weight = named.get(fqn)
    caller = _caller(node)
    # A tied weight is recorded under one of its names: prefer the calling module's.
    if caller is not None and weight is not None:
        try:
            mod = model.get_submodule(caller)
        except AttributeError:
            mod = None
        if mod is not None and getattr(mod, "weight", None) is weight:
            fqn = f"{caller}.weight"
    owner, _, param = fqn.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    kind = linear_like(module) if param == "weight" and caller == owner else None
    if kind == "Linear" and node.target is not _aten.linear.default:
        kind = None
    if kind == "Conv1D" and node.target is not _aten.addmm.default:
        kind = None
    modes = None
    if getattr(x, "target", None) in _RESHAPES:
        # x is the reshape's fx.Node; its first argument is the node it reshapes.
        reshaped = cast(torch.fx.Node, cast(torch.fx.Node, x).args[0])
        src = reshaped.meta.get("val")
        if isinstance(src, Tensor):
            modes = merged_modes(tuple(int(d) for d in src.shape), shape, shape[-1])
    return LinearCall(owner, kind or "F.linear", shape, modes, param, caller)


def _hook_calls(model: nn.Module, example: ExampleInputs, only: set[str] | None = None) -> Capture:
    capture = Capture("forward hooks")
    handles = []
    for name, module in model.named_modules():
        kind = linear_like(module)
        if kind is None or not name or (only is not None and name not in only):
            continue

        def hook(_m: nn.Module, args: tuple, *, _n: str = name, _k: str = kind) -> None:
            if args and isinstance(args[0], Tensor):
                capture.calls.append(LinearCall(_n, _k, tuple(args[0].shape)))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            example(model)
    except Exception as exc:
        raise example.failure(model, exc) from exc
    finally:
        for h in handles:
            h.remove()
    return capture
