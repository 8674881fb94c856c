"""The NdLinear computation on tensors or FX proxies: the planned contraction, low-rank term, bias.

:func:`apply_ndlinear` runs a layer's planned program plainly, recomputing its
intermediates in backward (:mod:`ndcompile.ir.autodiff`) or tile by tile on the CPU
(:mod:`ndcompile.ir.tiled`); :func:`mode_bias` turns the paper's per-mode biases
into the full bias the contraction adds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ndcompile.ir.autodiff import run_recomputed
from ndcompile.ir.bias_steps import BiasStep
from ndcompile.ir.network import NetworkPlan
from ndcompile.ir.pages import pooled_result
from ndcompile.ir.program import records_grad
from ndcompile.ir.tiled import run_tiled, should_tile
from ndcompile.kernels.autograd import train_kron2
from ndcompile.kernels.kron2 import fused_kron2, use_fused

__all__ = ["ModeBiases", "apply_ndlinear", "mode_bias"]


def mode_bias(
    biases: Sequence[Tensor],
    factors: Sequence[Tensor],
    order: Sequence[int],
    out_shape: Sequence[int],
) -> Tensor:
    """Full bias (flattened) of per-mode biases applied in ``order``.

    Applying mode ``k`` as ``x -> W_k x + b_k`` (``b_k`` broadcast over the other
    modes) in sequence gives the bias ``sum_t (1 ⊗ .. ⊗ b_{m_t} ⊗ .. ⊗ W_j 1)``:
    modes applied before ``m_t`` contribute ones, modes applied after it
    contribute the row sums of their (rank-1) factors.

    The terms are summed by one reduction over their stack, so inductor makes the
    bias one contiguous buffer before the output add reads it. Summed pairwise, the
    broadcast terms were inlined into that add, which then ran along the last output
    mode alone (8 masked lanes for ``h_N = 8``) instead of along the whole row: the
    wide64 case's forward was 16% slower with per-mode biases than with its full bias.

    Args:
        biases: ``b_k`` of shape ``(h_k,)`` per mode.
        factors: Rank-1 factors ``(1, h_k, d_k)`` per mode.
        order: The order in which the modes are applied.
        out_shape: ``(h1..hN)``.

    Returns:
        The bias of shape ``(prod h,)``.
    """
    n = len(factors)
    out_shape = list(out_shape)
    terms: list[Tensor] = []
    for t, k in enumerate(order):
        term = biases[k]
        view = [1] * n
        view[k] = out_shape[k]
        term = term.reshape(view)
        for j in order[t + 1 :]:
            rows = factors[j][0].sum(dim=1)
            shape = [1] * n
            shape[j] = out_shape[j]
            term = term * rows.reshape(shape)
        terms.append(term.expand(out_shape))
    return torch.stack(terms).sum(0).reshape(-1)


@dataclass(frozen=True)
class ModeBiases:
    """A layer's per-mode biases, added in the GEMMs of their modes or as one full bias.

    Attributes:
        biases: ``b_k`` of shape ``(h_k,)`` per mode (tensors or FX proxies).
        factors: Rank-1 factors ``(1, h_k, d_k)`` per mode.
        order: The order in which the modes are applied.
        out_shape: ``(h1..hN)``.
        steps: Each mode's GEMM in the planned program
            (:func:`~ndcompile.ir.bias_steps.bias_steps`), or None when the program
            does not apply the modes one at a time in ``order``.
    """

    biases: Sequence[Any]
    factors: Sequence[Any]
    order: Sequence[int]
    out_shape: Sequence[int]
    steps: tuple[BiasStep, ...] | None = None

    def full(self) -> Any:
        """The full bias of shape ``(prod h,)`` (:func:`mode_bias`)."""
        return mode_bias(self.biases, self.factors, self.order, self.out_shape)

    def at_steps(self) -> dict[int, Any] | None:
        """``b_k`` by the index of mode ``k``'s matmul, viewed to broadcast against it."""
        if self.steps is None:
            return None
        return {
            s.instruction: self.biases[s.mode].reshape(
                (self.out_shape[s.mode], 1) if s.left else (self.out_shape[s.mode],)
            )
            for s in self.steps
        }


def apply_ndlinear(
    x: Any,
    factors: Sequence[Any],
    bias: Any,
    plan: NetworkPlan,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    *,
    flat_input: bool,
    lead: Any = None,
    lowrank: tuple[Any, Any] | None = None,
    recompute: bool = False,
    tile: int = 0,
    whole_tiles: int = 2,
    text: str = "",
) -> Any:
    """The NdLinear computation on tensors or FX proxies.

    Args:
        x: Input ``(*, prod d)`` if ``flat_input`` else ``(*, d1..dN)``.
        factors: Factor operands as the plan expects them.
        bias: Full bias ``(prod h,)``, per-mode biases (added in their modes' GEMMs
            when the program runs whole and their steps are known, else folded
            into the full bias), or None.
        plan: The planned contraction.
        in_shape: ``(d1..dN)``.
        out_shape: ``(h1..hN)``.
        flat_input: Whether input and output have flattened modes (the ``nn.Linear``
            convention) rather than N-D modes.
        lead: The leading (batch) dims of ``x`` when they can be read from another
            tensor with the same leading dims (so the graph does not query ``x``);
            default ``x``'s own.
        lowrank: ``(U, V)`` of a low-rank residual ``U @ V`` added to the weight.
        recompute: Save only the contraction's inputs for backward and recompute
            its intermediates there (:mod:`ndcompile.ir.autodiff`); ignored for FX
            proxies.
        tile: Batch rows per tile of a tiled contraction (:mod:`ndcompile.ir.tiled`),
            used on CPU tensors with more than ``whole_tiles`` tiles of rows; 0
            never tiles.
            Tiled runs recompute in backward, so with ``recompute=False`` they are
            used only where no gradient is taken.
        whole_tiles: Batches of at most this many tiles run whole where no gradient
            is taken (two where one is).
        text: ``plan.program.to_text()`` (needed when ``tile`` is set).

    Returns:
        ``(*, prod h)`` if ``flat_input`` else ``(*, h1..hN)``; leading dims as ``x``'s.
    """
    if lead is None:
        lead = x.shape[:-1] if flat_input else x.shape[: -len(in_shape)]
    rows = x.reshape((-1, *in_shape))
    grad = isinstance(rows, Tensor) and records_grad((rows, *factors))
    # Training tiles batches of more than two tiles whatever ``whole_tiles`` says: a
    # whole-batch recompute holds the whole batch's intermediates at once.
    tiled = bool(text) and should_tile(rows, tile, 2 if grad else whole_tiles)
    if tiled and not recompute:
        tiled = not grad
    saved = not tiled and recompute and grad
    # On the CPU a two-mode layer runs in one generated kernel that keeps each row's
    # intermediate in cache (ndcompile.kernels). In training it is the forward of the
    # recomputing paths (tiled or saved), whose backward stays as it was.
    mode_biases = bias.biases if isinstance(bias, ModeBiases) else [bias]
    fused = (
        isinstance(rows, Tensor)
        and (tiled or saved or not grad)
        and use_fused(rows, factors, mode_biases, training=True)
    )
    # A trainable bias with frozen factors also needs the autograd function.
    fused_grad = fused and records_grad(
        [rows, *factors, *(t for t in mode_biases if t is not None)]
    )
    steps = None
    if isinstance(bias, ModeBiases):
        # Eagerly, the GEMMs take the biases and the full bias's small ops (a few
        # kernel launches a call) are saved; under torch.compile inductor fuses
        # those into one kernel, and one add over the output beats a bias pass over
        # every intermediate (wide64 compiled: 1.72 ms folded vs 2.20 in the GEMMs).
        eager = isinstance(rows, Tensor) and not torch.compiler.is_compiling()
        steps = bias.at_steps() if eager and not (tiled or saved or fused) else None
        bias = None if steps is not None else bias.full()
    # The tiled op and a plain run add the bias (in the last GEMM where it fits, else
    # in place outside autograd); the recomputing autograd function and FX proxies
    # leave it to the end.
    fused_bias = bias if fused or tiled or (isinstance(rows, Tensor) and not saved) else None
    b = None if fused_bias is None else fused_bias.reshape(out_shape)
    if fused_grad:
        y = train_kron2(rows, factors, b, plan.program, text, tile if tiled else 0)
    elif fused:
        y = fused_kron2(rows, factors, b)
    elif tiled:
        y = run_tiled(text, tile, rows, factors, b)
    elif saved:
        # Training: the result in row-major order, whatever layout the program leaves
        # it in. A permuted result hands its permutation to the ops after it: under
        # inductor the bias gradient then reduces over the batch in one OpenMP
        # region per output element (image32, `modes 0 | 1 | 2`, compiled train
        # step with a bias: 5.0 ms permuted, 3.0 ms row-major).
        y = run_recomputed(plan.program, rows, *factors).contiguous()
    else:
        added = [t for t in (b, *(steps or {}).values()) if isinstance(t, Tensor)]
        out = pooled_result(plan.program, rows, factors, math.prod(out_shape), added)
        y = plan.program.run(rows, *factors, out=out, bias=b, step_biases=steps)
    if lowrank is not None:
        u, v = lowrank
        flat = x.reshape((-1, math.prod(in_shape)))
        y = y + torch.matmul(torch.matmul(flat, v.t()), u.t()).reshape((-1, *out_shape))
    y = y.reshape(lead + ((math.prod(out_shape),) if flat_input else out_shape))
    if bias is not None and fused_bias is None:
        y = y + (bias if flat_input else bias.reshape(out_shape))
    return y
