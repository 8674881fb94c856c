"""The reference NdLinear's own schedule, as plans the planner always has among its candidates.

The reference layer (``ndlinear.NdLinear``) applies the modes one at a time, first to
last, each as ``transpose(mode, -1) -> contiguous -> view(-1, d) -> Linear -> view ->
transpose back``. Two plans reproduce it:

* :func:`reference_schedule`: the same order of contractions, laid out by
  ndcompile's lowering (broadcast ``bmm`` where a mode sits in the middle, no copies);
* :func:`reference_layout_plan`: the same order *and* the same memory traffic:
  every mode is moved to the last axis by one copy and contracted by one 2-D GEMM,
  exactly the op sequence the reference emits (its transposes back and forth fused
  into one copy per mode, as inductor fuses them when it compiles the reference).

Timing both (eagerly or under inductor) is what makes an autotuned layer never
slower than the reference on the machine that runs it.
"""

from __future__ import annotations

import dataclasses
import math

from ndcompile.ir.network import NetworkPlan, TensorNetwork
from ndcompile.ir.program import ContractionProgram, Instruction

__all__ = ["reference_layout_plan", "reference_schedule", "sequential_path"]


def sequential_path(order: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Path applying the modes to ``x`` one at a time in ``order`` (operands x, W0..)."""
    labels = ["x", *(f"W{k}" for k in range(len(order)))]
    path: list[tuple[int, ...]] = []
    for k in order:
        i, j = sorted((labels.index("x"), labels.index(f"W{k}")))
        path.append((i, j))
        labels.pop(j)
        labels.pop(i)
        labels.append("x")
    return path


def reference_schedule(
    tn: TensorNetwork, n_modes: int, batch: int, optimizer: str = "auto"
) -> NetworkPlan:
    """The reference NdLinear's own schedule: modes applied one at a time, first to last."""
    return tn.plan(optimizer, nominal_batch=batch, path=sequential_path(tuple(range(n_modes))))


def _layout_program(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], batch: int, output: tuple[str, ...]
) -> ContractionProgram:
    """Operands ``x (B, d1..dN)`` and ``W_k (h_k, d_k)``; one copy and one GEMM per mode."""
    n = len(in_shape)
    code: list[Instruction] = []
    reg = n + 1
    cur = 0
    dims = list(in_shape)
    copied = 0

    def emit(op: str, srcs: tuple[int, ...], arg: tuple[int, ...], sizes: tuple[int, ...]) -> int:
        nonlocal reg
        code.append(Instruction(op, srcs, reg, arg, sizes))
        reg += 1
        return reg - 1

    for k, (d, h) in enumerate(zip(in_shape, out_shape, strict=True)):
        axis = k + 1
        perm = list(range(n + 1))
        perm[axis], perm[n] = perm[n], perm[axis]
        elements = math.prod(dims)
        if axis != n:
            # A view; the reshape below copies it (the reference's .contiguous()).
            cur = emit("permute", (cur,), tuple(perm), (batch * elements,))
            copied += elements
        cur = emit("reshape", (cur,), (-1, d), ())
        w_t = emit("permute", (k + 1,), (1, 0), (h * d,))
        rows = batch * elements // d
        cur = emit("matmul", (cur, w_t), (2, 2), (1, rows, d, h, 1, 1))
        dims[k] = h
        swapped = [dims[p - 1] for p in perm[1:]]
        cur = emit("reshape", (cur,), (-1, *swapped), ())
        if axis != n:
            cur = emit("permute", (cur,), tuple(perm), (0,))  # a view back, never copied
    return ContractionProgram(
        n_inputs=n + 1,
        instructions=code,
        result=cur,
        output=output,
        permuted_elements=copied,
    )


def reference_layout_plan(
    tn: TensorNetwork,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    batch: int,
    optimizer: str = "auto",
) -> NetworkPlan:
    """The reference's op sequence: per mode, one copy moving it last and one 2-D GEMM.

    Args:
        tn: The rank-1 NdLinear network of ``in_shape -> out_shape``.
        in_shape: Input modes.
        out_shape: Output modes.
        batch: Nominal batch (for the cost model's sizes).
        optimizer: Optimizer named in the plan's equation and FLOP count.

    Returns:
        A plan with the reference schedule's order and FLOPs and the reference's layout.
    """
    order = reference_schedule(tn, len(in_shape), batch, optimizer)
    program = _layout_program(tuple(in_shape), tuple(out_shape), batch, tn.output)
    return dataclasses.replace(order, optimizer="reference layout", program=program)
