"""Dense form of Kronecker sums and the Van Loan–Pitsianis rearrangement.

An NdLinear weight with input mode shape ``in_shape = (d1, ..., dN)``, output mode
shape ``out_shape = (h1, ..., hN)`` and rank ``R`` is stored as ``N`` factor tensors,
factor ``i`` of shape ``(R, h_i, d_i)``. The equivalent dense weight (laid out like
``nn.Linear.weight``, acting on the row-major flattened input) is::

    W = sum_r kron(F1[r], kron(F2[r], ..., FN[r]))      # shape (prod(h), prod(d))

:func:`kron_dense` builds it from tensors (checking their shapes) and
:func:`kronecker_sum` from the static mode sizes alone, so it also runs on FX proxies.
The rearrangement (:func:`rearrange`) maps ``W`` to an N-way tensor of shape
``(h1*d1, ..., hN*dN)`` in which a rank-R Kronecker sum becomes a rank-R CP tensor (a
rank-R matrix for N = 2); :func:`unrearrange` is its inverse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ndcompile.compress.kronecker_shapes import _check_modes, _check_weight
from ndcompile.errors import NdCompileError

__all__ = ["kron_dense", "kronecker_sum", "rearrange", "unrearrange"]


def kron_dense(factors: Sequence[Tensor]) -> Tensor:
    """Build the dense weight ``sum_r kron(F1[r], ..., FN[r])`` from NdLinear factors.

    Args:
        factors: N tensors, factor i of shape ``(R, h_i, d_i)``, same R, dtype, device.

    Returns:
        Tensor of shape ``(prod(h), prod(d))``.

    Raises:
        NdCompileError: If there are no factors or their shapes are inconsistent.
    """
    shapes = [tuple(f.shape) for f in factors]
    if not shapes or any(len(s) != 3 or s[0] != shapes[0][0] for s in shapes):
        raise NdCompileError(
            f"factors must be a non-empty list of 3-D tensors (R, h_i, d_i) with a common R, "
            f"got shapes {shapes}",
            hint="pass the factors of one NdLinear layer, e.g. KroneckerFit.factors",
        )
    acc = factors[0]
    for i, f in enumerate(factors[1:], start=2):
        r, a, c = acc.shape
        _, b, d = f.shape
        if i == len(factors):  # last step: contract r to avoid an (R, H, D) intermediate
            return torch.einsum("rac,rbd->abcd", acc, f).reshape(a * b, c * d)
        acc = torch.einsum("rac,rbd->rabcd", acc, f).reshape(r, a * b, c * d)
    return acc.sum(0)


def kronecker_sum(
    factors: Sequence[Tensor], in_shape: Sequence[int], out_shape: Sequence[int]
) -> Tensor:
    """``sum_r F1[r] ⊗ ... ⊗ FN[r]`` as a ``(prod h, prod d)`` matrix.

    Uses only the static mode sizes, so it also runs on FX proxies. The rank index
    is summed in the last step (one matmul), so no ``R``-fold dense tensor is built.

    Args:
        factors: Factor ``k`` of shape ``(R, h_k, d_k)``.
        in_shape: ``(d1..dN)``.
        out_shape: ``(h1..hN)``.
    """
    acc, rows, cols = factors[0], out_shape[0], in_shape[0]
    if len(factors) == 1:
        return acc.sum(0)
    for f, h, d in zip(factors[1:-1], out_shape[1:-1], in_shape[1:-1], strict=True):
        acc = torch.einsum("rac,rbd->rabcd", acc, f).reshape(-1, rows * h, cols * d)
        rows, cols = rows * h, cols * d
    last = torch.einsum("rac,rbd->abcd", acc, factors[-1])
    return last.reshape(rows * out_shape[-1], cols * in_shape[-1])


def rearrange(w: Tensor, in_shape: Sequence[int], out_shape: Sequence[int]) -> Tensor:
    """Van Loan–Pitsianis rearrangement of a dense weight into an N-way tensor.

    ``W`` (prod h, prod d) is viewed as (h1..hN, d1..dN), permuted to
    (h1, d1, ..., hN, dN) and reshaped to (h1*d1, ..., hN*dN). A rank-R Kronecker sum
    becomes a rank-R CP tensor whose mode-i vectors are the flattened ``F_i[r]``.

    Args:
        w: Dense weight of shape ``(prod(out_shape), prod(in_shape))``.
        in_shape: Input mode sizes (d1..dN).
        out_shape: Output mode sizes (h1..hN).

    Returns:
        Tensor of shape ``(h1*d1, ..., hN*dN)``.

    Raises:
        NdCompileError: If the shapes do not match ``w``.
    """
    _check_weight(w, in_shape, out_shape, None)
    n = len(in_shape)
    perm = [x for i in range(n) for x in (i, n + i)]
    t = w.reshape(*out_shape, *in_shape).permute(perm)
    return t.reshape([h * d for h, d in zip(out_shape, in_shape, strict=True)])


def unrearrange(t: Tensor, in_shape: Sequence[int], out_shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`rearrange`: N-way tensor (h1*d1, ..., hN*dN) -> dense weight.

    Args:
        t: Tensor with ``prod(h) * prod(d)`` elements laid out as (h1*d1, ..., hN*dN).
        in_shape: Input mode sizes (d1..dN).
        out_shape: Output mode sizes (h1..hN).

    Returns:
        Dense weight of shape ``(prod(out_shape), prod(in_shape))``.

    Raises:
        NdCompileError: If the shapes do not match ``t``.
    """
    _check_modes(in_shape, out_shape, None)
    expect = tuple(h * d for h, d in zip(out_shape, in_shape, strict=True))
    if tuple(t.shape) != expect:
        raise NdCompileError(
            f"rearranged tensor has shape {tuple(t.shape)} but in_shape={tuple(in_shape)}, "
            f"out_shape={tuple(out_shape)} need {expect}",
            hint="pass the same mode shapes that were given to rearrange",
        )
    n = len(in_shape)
    t = t.reshape([s for h, d in zip(out_shape, in_shape, strict=True) for s in (h, d)])
    t = t.permute([2 * i for i in range(n)] + [2 * i + 1 for i in range(n)])
    return t.reshape(math.prod(out_shape), math.prod(in_shape))
