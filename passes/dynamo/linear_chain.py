"""Dynamo pass: fuse two consecutive linear maps when that is exact and cheaper.

``linear(linear(x, W1, b1), W2, b2) == linear(x, W2 @ W1, W2 @ b1 + b2)`` up to
floating-point rounding. Reshapes between the two are allowed when they keep the
feature (last) dim and only regroup leading dims, since rows then stay rows; they
are re-applied after the fused map. The fusion is taken only when its FLOPs,
including forming ``W2 @ W1`` on every call (the weights may be trained), are
below the chain's: ``rows*n0*n2 + n0*n1*n2 < rows*(n0*n1 + n1*n2)``. A bottleneck
(``n1`` small) is therefore never fused.

Before::

    linear = torch._C._nn.linear(l_x_, w1, b1)
    linear_1 = torch._C._nn.linear(linear, w2, b2)

After::

    matmul = torch.matmul(w2, w1);  matmul_1 = torch.matmul(w2, b1);  add = matmul_1 + b2
    linear_2 = torch._C._nn.linear(l_x_, matmul, add)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.fx as fx
from torch import Tensor

from ndcompile.passes.dynamo.common import (
    commit_replacement,
    example_value,
    fake_mode_of,
    is_linear,
    linear_args,
    module_path,
    rows_hint,
    same_shape,
    static_int,
)
from ndcompile.passes.runner import ReportedResult
from ndcompile.report import LayerReport

__all__ = ["LinearPair", "find_linear_pair", "fuse_linear_chains"]

_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten}

#: Iteration guard of the fixed-point loop.
MAX_FUSIONS = 10_000


class LinearPair:
    """Two linear nodes ``second(reshape*(first(x)))`` that may be fused.

    Attributes:
        first: The inner linear node.
        middle: Reshapes of leading dims between them, innermost first.
        second: The outer linear node.
        n0: Input features of ``first``.
        n1: Features between the two maps.
        n2: Output features of ``second``.
        rows: Rows per call (nominal for symbolic dims).
    """

    def __init__(
        self, first: fx.Node, middle: list[fx.Node], second: fx.Node, dims: tuple[int, ...]
    ) -> None:
        self.first, self.middle, self.second = first, middle, second
        self.n0, self.n1, self.n2, self.rows = dims

    @property
    def flops_before(self) -> int:
        """FLOPs of the two maps."""
        return 2 * self.rows * (self.n0 * self.n1 + self.n1 * self.n2)

    @property
    def flops_after(self) -> int:
        """FLOPs of the fused map, forming ``W2 @ W1`` included."""
        return 2 * self.rows * self.n0 * self.n2 + 2 * self.n0 * self.n1 * self.n2


def _weight_dims(node: fx.Node) -> tuple[int, int] | None:
    _, w, b = linear_args(node)
    wv, bv = example_value(w), example_value(b)
    if not isinstance(wv, Tensor) or wv.dim() != 2:
        return None
    out, inp = static_int(wv.shape[0]), static_int(wv.shape[1])
    if out is None or inp is None:
        return None
    if b is not None and not (isinstance(bv, Tensor) and tuple(bv.shape) == (out,)):
        return None
    return out, inp


def _row_reshape(node: fx.Node) -> bool:
    """True for a reshape-family node that keeps the last dim and only regroups rows."""
    is_reshape = (node.op == "call_method" and node.target in _RESHAPE_METHODS) or (
        node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS
    )
    if not is_reshape or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    src, out = example_value(node.args[0]), example_value(node)
    if not isinstance(src, Tensor) or not isinstance(out, Tensor) or src.dim() < 1:
        return False
    if out.dim() < 1 or not same_shape(src.shape[-1:], out.shape[-1:]):
        return False
    return _last_dim_arg(node) is not None


def _last_dim_arg(node: fx.Node) -> tuple[str, int | None] | None:
    """How a row reshape spells its last dim: ``("shape", position)`` or ``("flatten", None)``.

    A ``flatten`` that keeps the last dim (checked on shapes) never names it, so its
    arguments carry over unchanged; a ``view``/``reshape`` must give it as a literal.
    """
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name == "flatten":
        return ("flatten", None)
    shape = node.args[1:]
    if len(shape) == 1 and isinstance(shape[0], list | tuple):
        shape = tuple(shape[0])
    if not shape or not isinstance(shape[-1], int) or shape[-1] < 0 or node.kwargs:
        return None
    return ("shape", len(shape) - 1)


def find_linear_pair(second: fx.Node) -> LinearPair | None:
    """The fusable pair ending at linear node ``second``, or None."""
    if not is_linear(second):
        return None
    x2, _, _ = linear_args(second)
    middle: list[fx.Node] = []
    while isinstance(x2, fx.Node) and not is_linear(x2) and _row_reshape(x2):
        if len(x2.users) != 1:
            return None
        middle.insert(0, x2)
        x2 = x2.args[0]
    if not is_linear(x2) or len(x2.users) != 1:
        return None
    first = x2
    x, _, _ = linear_args(first)
    xv, d1, d2 = example_value(x), _weight_dims(first), _weight_dims(second)
    if not isinstance(xv, Tensor) or d1 is None or d2 is None or d1[0] != d2[1]:
        return None
    operands = (x, first, second, *linear_args(first)[1:], *linear_args(second)[1:])
    values = [example_value(a) for a in operands if a is not None]
    if not all(isinstance(v, Tensor) for v in values) or len({v.dtype for v in values}) != 1:
        return None
    n1, n0 = d1
    n2 = d2[0]
    return LinearPair(first, middle, second, (n0, n1, n2, rows_hint(xv.shape[:-1])))


def _emit(graph: fx.Graph, pair: LinearPair) -> fx.Node:
    x, w1, b1 = linear_args(pair.first)
    _, w2, b2 = linear_args(pair.second)
    weight = graph.call_function(torch.matmul, (w2, w1))
    bias: Any = None
    if b1 is not None:
        bias = graph.call_function(torch.matmul, (w2, b1))
    if b2 is not None:
        bias = b2 if bias is None else graph.call_function(torch.add, (bias, b2))
    target = cast(Callable[..., Any], pair.second.target)  # a call_function linear
    result = graph.call_function(target, (x, weight, bias))
    for middle in pair.middle:
        kind, index = _last_dim_arg(middle)  # type: ignore[misc]
        args: list[Any] = [result, *middle.args[1:]]
        if kind == "shape" and len(args) == 2 and isinstance(args[1], list | tuple):
            shape = list(args[1])
            shape[index] = pair.n2  # type: ignore[index]
            args[1] = type(args[1])(shape)
        elif kind == "shape":
            args[1 + index] = pair.n2  # type: ignore[operator]
        result = graph.create_node(middle.op, middle.target, tuple(args), dict(middle.kwargs))
    return result


def _entry(pair: LinearPair, *, reason: str | None = None) -> LayerReport:
    names = []
    for node in (pair.first, pair.second):
        found = module_path(node)
        names.append(found[0] if found else node.name)
    return LayerReport(
        name="+".join(names),
        kind="Linear chain",
        status="skipped" if reason else "fused",
        in_features=pair.n0,
        out_features=pair.n2,
        params_before=pair.n0 * pair.n1 + pair.n1 * pair.n2,
        params_after=pair.n0 * pair.n1 + pair.n1 * pair.n2,
        flops_before=pair.flops_before,
        flops_after=pair.flops_after,
        reason=reason,
        extra={"hidden": pair.n1, "rows": pair.rows, "fused_weight": (pair.n2, pair.n0)},
    )


def fuse_linear_chains(gm: fx.GraphModule) -> ReportedResult:
    """Fuse consecutive linear maps of a dynamo graph where exact and cheaper.

    Applied to a fixed point, so ``l3(l2(l1(x)))`` can become one map. Each fusion is
    checked on FakeTensors before it is committed.

    Args:
        gm: A dynamo graph module (modified in place).

    Returns:
        ``ReportedResult(gm, modified)`` whose ``layers`` has one entry per fused or
        rejected pair.
    """
    graph, fake_mode = gm.graph, fake_mode_of(gm)
    entries: list[LayerReport] = []
    rejected: dict[fx.Node, str] = {}
    for _ in range(MAX_FUSIONS):
        pair = None
        for node in graph.nodes:
            if node in rejected:
                continue
            pair = find_linear_pair(node)
            if pair is None:
                continue
            if pair.flops_after < pair.flops_before:
                break
            rejected[node] = (
                f"not fused: {pair.flops_after:,} FLOPs fused vs {pair.flops_before:,} apart "
                f"(hidden size {pair.n1})"
            )
            entries.append(_entry(pair, reason=rejected[node]))
            pair = None
        if pair is None:
            break
        before = set(graph.nodes)
        with graph.inserting_before(pair.second):
            result = _emit(graph, pair)
        new_nodes = [n for n in graph.nodes if n not in before]
        dead = [pair.first, *pair.middle, pair.second]
        if commit_replacement(graph, new_nodes, result, pair.second, dead, fake_mode):
            entries.append(_entry(pair))
        else:
            rejected[pair.second] = "not fused: the fused map failed shape validation"
            entries.append(_entry(pair, reason=rejected[pair.second]))
    modified = any(e.status == "fused" for e in entries)
    if modified:
        graph.lint()
        gm.recompile()
    return ReportedResult(gm, modified, layers=entries)
