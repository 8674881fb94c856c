"""Training through the fused two-mode kernel: kernel forward, recomputing backward.

:func:`train_kron2` is the training twin of :func:`ndcompile.kernels.kron2.fused_kron2`.
The forward is the generated kernel and saves only its inputs (the batch and the
factors), as the recomputing paths of :mod:`ndcompile.ir.autodiff` and
:mod:`ndcompile.ir.tiled` do, so training memory is unchanged. The backward
recomputes the planned program's intermediates, as those paths do: ``tile`` rows
at a time for a tiled layer (the tiled op's backward), so its memory bound holds,
and over the whole batch otherwise (:func:`~ndcompile.ir.autodiff.program_vjp`).
The input's gradient comes from the same recomputed intermediates (a second
kernel call for it measured no faster: it would redo the product the factors'
gradients need anyway).

The backward is itself differentiable where the path it replaces was: through
``program_vjp``'s ops for an untiled layer (gradient penalties, Hessian-vector
products); a tiled layer's backward is the tiled op's, which is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ndcompile.ir.autodiff import program_vjp
from ndcompile.ir.program import ContractionProgram
from ndcompile.ir.tiled import tiled_contract_backward
from ndcompile.kernels.kron2 import fused_kron2

__all__ = ["train_kron2"]


class _Kron2(torch.autograd.Function):
    """``fused_kron2`` forward; gradients from the recomputed program."""

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor,
        f1: Tensor,
        f2: Tensor,
        bias: Tensor | None,
        program: ContractionProgram,
        text: str,
        tile: int,
    ) -> Tensor:
        return fused_kron2(x, (f1, f2), bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, f1, f2, bias, program, text, tile = inputs
        ctx.save_for_backward(x, f1, f2)
        ctx.program, ctx.text, ctx.tile = program, text, tile
        ctx.bias_shape = None if bias is None else tuple(bias.shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, f1, f2 = ctx.saved_tensors
        nx, n1, n2, nb = ctx.needs_input_grad[:4]
        nb = bool(nb) and ctx.bias_shape is not None
        needs = [bool(nx), bool(n1), bool(n2), nb]
        grads: list[Tensor | None] = [None, None, None, None]
        if ctx.tile and any(needs):
            found = tiled_contract_backward(grad, x, [f1, f2], ctx.text, ctx.tile, needs)
            grads = [g if wanted else None for g, wanted in zip(found, needs, strict=True)]
        elif any(needs[:3]):
            grads[:3] = program_vjp(ctx.program, [x, f1, f2], grad, needs[:3])
        if nb and grads[3] is None:
            grads[3] = grad.sum(0)
        if grads[3] is not None:
            grads[3] = grads[3].reshape(ctx.bias_shape)
        return (*grads, None, None, None)


def train_kron2(
    x: Tensor,
    factors: Sequence[Tensor],
    bias: Tensor | None,
    program: ContractionProgram,
    text: str,
    tile: int,
) -> Tensor:
    """``bias + sum_r W1[r] @ x[b] @ W2[r]^T`` for every row, with gradients.

    Call where :func:`ndcompile.kernels.kron2.use_fused` (with ``training=True``)
    says so.

    Args:
        x: The batch ``(rows, d1, d2)``.
        factors: The two factors as the program expects them, ``(h, d)`` or
            ``(R, h, d)`` each.
        bias: The full bias (``h1*h2`` elements, any shape) or None.
        program: The layer's planned program (for the factors' gradients).
        text: ``program.to_text()`` (for the tiled op's backward).
        tile: Rows per tile for the factors' gradients; 0: the whole batch at once.

    Returns:
        ``(rows, h1, h2)``.
    """
    f1, f2 = factors
    out = _Kron2.apply(x, f1, f2, bias, program, text, tile)
    assert isinstance(out, Tensor)
    return out
