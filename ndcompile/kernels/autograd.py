"""Training through the fused two-mode kernel: kernel forward, recomputing backward.

:func:`train_kron2` is the training twin of :func:`ndcompile.kernels.kron2.fused_kron2`.
The forward is the generated kernel and saves only its inputs (the batch and the
factors), as the recomputing paths of :mod:`ndcompile.ir.autodiff` and
:mod:`ndcompile.ir.tiled` do, so training memory is unchanged. In backward:

* the input's gradient is the same kind of two-mode contraction with transposed
  factors, ``dx[b] = sum_r W1[r]^T g[b] W2[r]``, and runs through the kernel of
  that transposed shape where one builds;
* the factors' (and the bias's) gradients recompute the planned program's
  intermediates ``tile`` rows at a time (the tiled op's backward), so the memory
  bound of a tiled layer holds.

Double backward is not supported (as for the tiled op).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ndcompile.ir.tiled import tiled_contract_backward
from ndcompile.kernels.kron2 import fused_kron2, kernel_shape, kron2_function

__all__ = ["train_kron2"]


def _transposed(factors: Sequence[Tensor]) -> list[Tensor]:
    """The factors of the input-gradient map: ``(R, d, h)`` (or ``(d, h)``) each."""
    return [f.transpose(-1, -2) for f in factors]


class _Kron2(torch.autograd.Function):
    """``fused_kron2`` forward; input gradient by the kernel, the rest tile by tile."""

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor, f1: Tensor, f2: Tensor, bias: Tensor | None, program: str, tile: int
    ) -> Tensor:
        return fused_kron2(x, (f1, f2), bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, f1, f2, bias, program, tile = inputs
        ctx.save_for_backward(x, f1, f2)
        ctx.program, ctx.tile = program, tile
        ctx.bias_shape = None if bias is None else tuple(bias.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, f1, f2 = ctx.saved_tensors
        nx, n1, n2, nb = ctx.needs_input_grad[:4]
        nb = bool(nb) and ctx.bias_shape is not None
        grad = grad.contiguous()
        back = _transposed((f1, f2))
        by_kernel = bool(nx) and kron2_function(kernel_shape(grad, back)) is not None
        dx = fused_kron2(grad, back, None) if by_kernel else None
        needs = [bool(nx) and not by_kernel, bool(n1), bool(n2), nb]
        grads: list[Tensor | None] = [None, None, None, None]
        if any(needs):
            tile = ctx.tile or max(1, x.shape[0])
            found = tiled_contract_backward(grad, x, [f1, f2], ctx.program, tile, needs)
            grads = [g if wanted else None for g, wanted in zip(found, needs, strict=True)]
        if by_kernel:
            grads[0] = dx
        if grads[3] is not None:
            grads[3] = grads[3].reshape(ctx.bias_shape)
        return (*grads, None, None)


def train_kron2(
    x: Tensor, factors: Sequence[Tensor], bias: Tensor | None, program: str, tile: int
) -> Tensor:
    """``bias + sum_r W1[r] @ x[b] @ W2[r]^T`` for every row, with gradients.

    Call where :func:`ndcompile.kernels.kron2.use_fused` (with ``training=True``)
    says so.

    Args:
        x: The batch ``(rows, d1, d2)``.
        factors: The two factors as the program expects them, ``(h, d)`` or
            ``(R, h, d)`` each.
        bias: The full bias (``h1*h2`` elements, any shape) or None.
        program: The layer's planned program as text (for the factors' gradients).
        tile: Rows per tile for the factors' gradients; 0: the whole batch at once.

    Returns:
        ``(rows, h1, h2)``.
    """
    f1, f2 = factors
    out = _Kron2.apply(x, f1, f2, bias, program, tile)
    assert isinstance(out, Tensor)
    return out
