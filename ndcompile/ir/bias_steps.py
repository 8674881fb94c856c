"""Per-mode biases added inside the GEMMs of a schedule that applies one mode at a time.

The reference NdLinear applies mode ``k`` as ``x -> x W_k^T + b_k``: each mode's bias
is the bias of its own GEMM (``addmm``), and the modes applied after it carry it
along. ndcompile folds the per-mode biases into one full bias over ``prod h``
(:func:`~ndcompile.layers.execution.mode_bias`), which no GEMM of the program can
take (it varies along every output mode, a GEMM's bias along one): added after the
last GEMM, it costs one more pass over the output. Where the planned program
applies single modes in the reference's own order, :func:`bias_steps` finds each
mode's GEMM, so the program can add ``b_k`` there instead
(:meth:`ContractionProgram.run`'s ``step_biases``), exactly as the reference does:
``b_k`` broadcast along the rows of the product of mode ``k``, then transformed by
the later modes like the rest of the intermediate. Layers do so in eager runs,
where it saves the full bias's small ops; under ``torch.compile`` they add the
full bias (:func:`~ndcompile.layers.execution.apply_ndlinear`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ndcompile.ir.program import ContractionProgram

__all__ = ["BiasStep", "bias_steps", "mode_steps"]


@dataclass(frozen=True)
class BiasStep:
    """The GEMM of one mode in a program that applies one mode at a time.

    Attributes:
        instruction: Index of the matmul in the program's instructions.
        mode: The mode ``k`` its factor ``W_k`` contracts.
        left: Whether the factor is the left operand: the product's output mode is
            then its row dim (a bias viewed ``(h_k, 1)``), else its last dim
            (``(h_k,)``).
    """

    instruction: int
    mode: int
    left: bool


def mode_steps(program: ContractionProgram, n_modes: int) -> tuple[BiasStep, ...] | None:
    """The per-mode GEMMs of ``program``, in execution order, or None.

    Every register is traced back to the operands it is computed from (input 0 is
    ``x``, input ``k + 1`` the factor of mode ``k``). A program qualifies when each
    of its matmuls multiplies the ``x`` chain by one factor alone and each mode has
    exactly one such matmul; factor-by-factor products (Kronecker blocks) and sums
    of terms (rank-R chains) do not. Per-mode biases exist for rank 1 only: a
    rank-R program with stacked factors passes the check, but its products are
    per-term, not the reference's.

    Args:
        program: A program over ``x`` and ``n_modes`` factors.
        n_modes: Number of modes.

    Returns:
        One step per mode, in the order the program applies them; None when the
        program does not apply single modes one at a time.
    """
    if program.n_inputs != n_modes + 1:
        return None
    origin: dict[int, frozenset[int]] = {k: frozenset((k,)) for k in range(program.n_inputs)}
    steps: list[BiasStep] = []
    for index, ins in enumerate(program.instructions):
        sources = [origin[s] for s in ins.srcs]
        if ins.op in ("reshape", "permute", "select", "sum"):
            origin[ins.out] = sources[0]
            continue
        if ins.op != "matmul":
            return None
        a, b = sources
        if (0 in a) == (0 in b):
            return None  # a factor-by-factor product, or x twice
        factor = b if 0 in a else a
        if len(factor) != 1:
            return None
        steps.append(BiasStep(index, next(iter(factor)) - 1, left=0 in b))
        origin[ins.out] = a | b
    if sorted(s.mode for s in steps) != list(range(n_modes)):
        return None
    return tuple(steps)


def bias_steps(program: ContractionProgram, order: Sequence[int]) -> tuple[BiasStep, ...] | None:
    """The GEMMs that can add per-mode biases applied in ``order``, or None.

    Adding ``b_k`` after mode ``k``'s GEMM gives the reference's bias exactly when
    the program applies the modes in the reference's order (the same modes come
    after each one, to carry its bias along).

    Args:
        program: The planned program.
        order: The order in which the reference applies the modes.

    Returns:
        The steps in ``order``; None when the program applies the modes otherwise.
    """
    steps = mode_steps(program, len(order))
    if steps is None or tuple(s.mode for s in steps) != tuple(order):
        return None
    return steps
