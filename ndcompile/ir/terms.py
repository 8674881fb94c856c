"""Rank-R Kronecker sums as R separate rank-1 chains: the alternative to stacked factors.

The tensor network of a rank-R NdLinear shares the rank index between all factors,
so its planned program stacks them: one GEMM per mode over all R terms, the sum
over ``r`` folded into the last contraction (one pass over an R-times larger
intermediate). :func:`sum_of_terms` builds the other candidate, R rank-1 programs
whose results are added (no stacked intermediate, R passes over the output); the
planner keeps whichever its cost model (or autotuning) finds faster.
"""

from __future__ import annotations

from ndcompile.ir.program import ContractionProgram, Instruction

__all__ = ["sum_of_terms"]


def sum_of_terms(term: ContractionProgram, rank: int, elements: int) -> ContractionProgram:
    """The rank-R Kronecker sum as R separate rank-1 chains, added up.

    ``term`` contracts ``x`` with rank-1 factors ``(h_k, d_k)``; the result takes
    ``x`` and rank-R factors ``(R, h_k, d_k)``, selects term ``r`` of every factor,
    runs ``term`` on it and adds the R results (no stacked intermediate, but R
    passes over the output).

    Args:
        term: The rank-1 program (input 0 is ``x``, inputs 1.. the factors).
        rank: Number of terms ``R``.
        elements: Elements of the result at the nominal batch size (for cost models).

    Returns:
        A program with the same inputs as the rank-R network.
    """
    code: list[Instruction] = []
    next_reg = term.n_inputs
    total: int | None = None
    for r in range(rank):
        regs = {0: 0}
        for k in range(1, term.n_inputs):
            code.append(Instruction("select", (k,), next_reg, (0, r)))
            regs[k], next_reg = next_reg, next_reg + 1
        for ins in term.instructions:
            srcs = tuple(regs[s] for s in ins.srcs)
            code.append(Instruction(ins.op, srcs, next_reg, ins.arg, ins.dims))
            regs[ins.out], next_reg = next_reg, next_reg + 1
        if total is None:
            total = regs[term.result]
        else:
            code.append(Instruction("add", (total, regs[term.result]), next_reg, (), (elements,)))
            total, next_reg = next_reg, next_reg + 1
    assert total is not None
    return ContractionProgram(
        n_inputs=term.n_inputs,
        instructions=code,
        result=total,
        output=term.output,
        permuted_elements=rank * term.permuted_elements,
    )
