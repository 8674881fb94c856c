"""Testing helpers: random einsum networks and forward/backward module comparisons.

These helpers are used by ndcompile's own test suite and are public so that users
can check their conversions the same way::

    from ndcompile.testing import assert_close_forward_backward
    assert_close_forward_backward(model, converted, x, atol=1e-6, rtol=1e-5)
"""

from __future__ import annotations

import math
import random
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ndcompile.ir.program import ContractionProgram

__all__ = [
    "RandomNetwork",
    "activation_permutes",
    "assert_close_forward_backward",
    "dispatched_ops",
    "graph_op_counts",
    "random_network",
]


@dataclass(frozen=True)
class RandomNetwork:
    """A random einsum network: operand subscripts, output subscripts and index sizes.

    Attributes:
        operands: Subscripts of each operand (one letter per index).
        output: Subscripts of the result.
        sizes: Size of every index.
        dynamic: The index playing the batch role (first operand and output), or None.
    """

    operands: tuple[str, ...]
    output: str
    sizes: Mapping[str, int]
    dynamic: str | None = None

    @property
    def equation(self) -> str:
        """The einsum equation, e.g. ``"ab,bc->ac"``."""
        return ",".join(self.operands) + "->" + self.output

    def shapes(self, batch: int | None = None) -> list[tuple[int, ...]]:
        """Operand shapes; the dynamic index takes size ``batch`` when given."""
        size = dict(self.sizes)
        if self.dynamic is not None and batch is not None:
            size[self.dynamic] = batch
        return [tuple(size[i] for i in op) for op in self.operands]

    def tensors(
        self, *, batch: int | None = None, dtype: torch.dtype = torch.float64, seed: int = 0
    ) -> list[Tensor]:
        """Random operands (standard normal) from a seeded generator."""
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(s, generator=gen, dtype=dtype) for s in self.shapes(batch)]


def random_network(
    seed: int,
    *,
    n_tensors: tuple[int, int] = (2, 5),
    max_dims: int = 3,
    sizes: tuple[int, int] = (1, 5),
    n_indices: tuple[int, int] = (2, 8),
    dynamic: bool = False,
) -> RandomNetwork:
    """A random, valid einsum network.

    Indices may be shared by any number of operands (hyperedges), appear in only one
    operand (summed out there or kept in the output), and the output lists a random
    subset of the indices in random order, so contractions, batch (kept shared)
    indices, outer products and reductions all occur.

    Args:
        seed: Seed of the generator; equal seeds give equal networks.
        n_tensors: Inclusive range of the number of operands.
        max_dims: Most indices per operand.
        sizes: Inclusive range of index sizes.
        n_indices: Inclusive range of the number of distinct indices.
        dynamic: Add a batch index ``"z"`` to the first operand and the output.

    Returns:
        The network.
    """
    rng = random.Random(seed)
    count = rng.randint(*n_tensors)
    letters = list(string.ascii_lowercase[: rng.randint(*n_indices)])
    operands: list[list[str]] = []
    for _ in range(count):
        dims = rng.randint(1, max_dims)
        operands.append(rng.sample(letters, min(dims, len(letters))))
    used = [i for i in letters if any(i in op for op in operands)]
    output = [i for i in used if rng.random() < 0.4]
    rng.shuffle(output)
    size = {i: rng.randint(*sizes) for i in used}
    dyn = None
    if dynamic:
        dyn = "z"
        operands[0].insert(0, dyn)
        output.insert(rng.randint(0, len(output)), dyn)
        size[dyn] = rng.randint(2, 6)
    return RandomNetwork(
        operands=tuple("".join(op) for op in operands),
        output="".join(output),
        sizes=size,
        dynamic=dyn,
    )


def activation_permutes(program: ContractionProgram, activations: Sequence[int] = (0,)) -> int:
    """Number of ``permute`` instructions whose input depends on the given operands.

    Args:
        program: A lowered contraction.
        activations: Operand registers holding activations (default: operand 0).

    Returns:
        How many permutes move data derived from an activation (weight-only
        permutes are not counted: they are cheap and constant-foldable).
    """
    tainted = set(activations)
    count = 0
    for ins in program.instructions:
        if any(s in tainted for s in ins.srcs):
            tainted.add(ins.out)
            count += ins.op == "permute"
    return count


def graph_op_counts(gm: fx.GraphModule) -> Counter[str]:
    """Count the calls in ``gm``'s graph by target name (``matmul``, ``permute``, ...).

    ``call_module`` nodes count under the module's class name.
    """
    counts: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            target = node.target
            counts[target if isinstance(target, str) else target.__name__] += 1
        elif node.op == "call_module":
            counts[type(gm.get_submodule(node.target)).__name__] += 1
    return counts


def dispatched_ops(fn: Callable[[], Any]) -> Counter[str]:
    """Run ``fn()`` and count the ops it dispatches by schema name (``aten::bmm``, ...).

    Custom ops count under their own name (``ndcompile::tiled_contract``), not the
    ops inside them.
    """
    counts: Counter[str] = Counter()

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            counts[func._schema.name] += 1
            return func(*args, **(kwargs or {}))

    with _Recorder():
        fn()
    return counts


def _grad_leaves(inputs: Sequence[Any]) -> list[Any]:
    out = []
    for t in inputs:
        if isinstance(t, Tensor) and t.is_floating_point():
            out.append(t.detach().clone().requires_grad_(True))
        else:
            out.append(t)
    return out


def _prefixed(prefix: str) -> Callable[[str], str]:
    """An ``assert_close`` ``msg`` callable that prefixes torch's message."""
    return lambda m: f"{prefix}: {m}"


def _cotangents(outputs: Sequence[Tensor], seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype) for y in outputs]


def assert_close_forward_backward(
    m1: nn.Module,
    m2: nn.Module,
    x: Tensor | Sequence[Tensor],
    *,
    atol: float,
    rtol: float,
    param_map: Mapping[str, str] | None = None,
    seed: int = 0,
) -> list[str]:
    """Assert two modules agree in output, input gradients and parameter gradients.

    Both modules run on copies of ``x``; the outputs are contracted with the same
    random cotangent and differentiated with ``torch.autograd.grad`` (the modules'
    ``.grad`` fields are not touched).

    Args:
        m1: The reference module.
        m2: The module under test.
        x: One input tensor or a sequence of positional inputs.
        atol: Absolute tolerance.
        rtol: Relative tolerance.
        param_map: Pairs ``(name in m1, name in m2)`` of parameters whose gradients
            must agree (``m2``'s gradient is reshaped to ``m1``'s shape). By default
            every parameter name present in both modules with equal numel.
        seed: Seed of the cotangent.

    Returns:
        The names (in ``m1``) of the parameters whose gradients were compared.

    Raises:
        AssertionError: On any mismatch, naming the output, input or parameter.
    """
    inputs = [x] if isinstance(x, Tensor) else list(x)
    p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    if param_map is None:
        param_map = {n: n for n, p in p1.items() if n in p2 and p2[n].numel() == p.numel()}
    missing = [(a, b) for a, b in param_map.items() if a not in p1 or b not in p2]
    if missing:
        raise AssertionError(f"param_map names parameters that do not exist: {missing}")

    results = []
    for module, params, names in ((m1, p1, list(param_map)), (m2, p2, list(param_map.values()))):
        leaves = _grad_leaves(inputs)
        out = [t for t in tree_leaves(module(*leaves)) if isinstance(t, Tensor)]
        wrt = [t for t in leaves if isinstance(t, Tensor) and t.requires_grad]
        wrt += [params[n] for n in names]
        cot = _cotangents(out, seed)
        loss = cast(Tensor, sum((y * c).sum() for y, c in zip(out, cot, strict=True)))
        raw = torch.autograd.grad(loss, wrt, allow_unused=True) if wrt else ()
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(raw, wrt, strict=True)]
        results.append((out, grads))

    (out1, g1), (out2, g2) = results
    if len(out1) != len(out2):
        raise AssertionError(f"modules return {len(out1)} vs {len(out2)} tensors")
    for k, (a, b) in enumerate(zip(out1, out2, strict=True)):
        torch.testing.assert_close(b, a, atol=atol, rtol=rtol, msg=_prefixed(f"output {k}"))
    n_in = len(g1) - len(param_map)
    labels = [f"grad of input {k}" for k in range(n_in)]
    labels += [f"grad of parameter {a} / {b}" for a, b in param_map.items()]
    for label, a, b in zip(labels, g1, g2, strict=True):
        b = b.reshape(a.shape) if math.prod(a.shape) == b.numel() else b
        torch.testing.assert_close(b, a, atol=atol, rtol=rtol, msg=_prefixed(label))
    return list(param_map)
