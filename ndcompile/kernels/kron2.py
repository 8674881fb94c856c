"""The fused two-mode NdLinear kernel: eligibility, operand layout and the call.

:func:`fused_kron2` runs a two-mode layer ``y[b] = bias + sum_r W1[r] x[b] W2[r]^T``
in one pass over the batch (see :mod:`ndcompile.kernels.codegen`), on plain
float32/float64 CPU tensors:

* eagerly, in inference, and as the forward of training through
  :func:`ndcompile.kernels.autograd.train_kron2`; never under ``jit.trace``,
  autocast, functorch transforms, forward-mode AD, tensor subclasses, or dispatch
  and function modes (a FLOP counter or a fake mode then sees the planned ops);
* under ``torch.compile``, in inference only, as the ``ndcompile::kron2`` custom
  op, which inductor calls as an extern kernel (the backend's passes emit it too,
  see :func:`graph_kron2`); never under ``torch.export``, whose programs must run
  where no kernel can be built.

Everywhere else the layer runs its planned program. Each layer shape is compiled
once per machine (cached on disk) and loaded once per process.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.overrides import _get_current_function_mode_stack
from torch.utils._device import DeviceContext
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ndcompile.ir.pages import empty_like_rows
from ndcompile.ir.program import records_grad
from ndcompile.kernels.build import compile_library, kernels_enabled, vector_unit
from ndcompile.kernels.codegen import KernelShape, kernel_order, kernel_source, padded_columns

__all__ = [
    "STREAM_BYTES",
    "fused_kron2",
    "graph_kron2",
    "kernel_shape",
    "kron2_function",
    "use_fused",
]

#: Results of at least this many bytes are written with non-temporal stores (they
#: would not stay in cache for the next op anyway).
STREAM_BYTES = 8 << 20

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_PLAIN = (Tensor, torch.nn.Parameter)
Kernel = Callable[..., None]


@functools.cache
def kron2_function(shape: KernelShape) -> tuple[Kernel, str, int] | None:
    """The compiled kernel for ``shape`` here, its mode order and padded ``h2``; or None."""
    unit = vector_unit()
    order = None if unit is None else kernel_order(shape, unit)
    if unit is None or order is None:
        return None
    lib = compile_library(kernel_source(shape, unit), shape.name)
    if lib is None:
        return None
    fn = getattr(lib, shape.name)
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long, ctypes.c_int, ctypes.c_int]
    return fn, order, padded_columns(shape, unit)


def kernel_shape(rows: Tensor, factors: Sequence[Tensor]) -> KernelShape | None:
    """The kernel specialisation for this batch and these factors, or None if they do not fit."""
    dims = _kernel_dims(rows.shape, [f.shape for f in factors])
    return None if dims is None else KernelShape(*dims, _DTYPES[rows.dtype])


def _kernel_dims(
    rows: Sequence[Any], factors: Sequence[Sequence[Any]]
) -> tuple[int, int, int, int, int] | None:
    """``(d1, d2, h1, h2, rank)`` of a batch ``(rows, d1, d2)`` and two factors, or None.

    Factors are ``(h, d)`` or ``(R, h, d)``; None when the shapes do not match up.
    """
    if len(factors) != 2 or len(rows) != 3:
        return None
    f1, f2 = (tuple(f) if len(f) == 3 else (1, *f) for f in factors)
    if f1[0] != f2[0] or (f1[2], f2[2]) != (rows[1], rows[2]):
        return None
    return int(rows[1]), int(rows[2]), int(f1[1]), int(f2[1]), int(f1[0])


def use_fused(
    rows: Tensor,
    factors: Sequence[Tensor],
    biases: Sequence[Tensor | None] = (),
    *,
    training: bool = False,
) -> bool:
    """Whether :func:`fused_kron2` runs this call (see the module docstring).

    Args:
        rows: The batch ``(rows, d1, d2)``.
        factors: The two factors, ``(h, d)`` or ``(R, h, d)`` each.
        biases: The tensors the bias is made of (the full bias, or the per-mode
            biases it is computed from); None entries are skipped.
        training: Allow operands that autograd records (eagerly only): the call
            then goes through :func:`ndcompile.kernels.autograd.train_kron2`.
    """
    if torch.compiler.is_compiling():
        return _compiled_use(rows, factors, biases)
    if type(rows) is not Tensor or not kernels_enabled():
        return False
    operands = _cpu_operands(rows, factors, biases)
    if operands is None:
        return False
    if torch.jit.is_tracing() or torch.is_autocast_enabled("cpu"):
        return False
    if _get_current_dispatch_mode() is not None or _function_modes():
        return False  # FLOP counters, fake, debug and override modes see the planned ops
    if any(type(t) not in _PLAIN for t in operands):
        return False  # subclasses (their ops and data are their own) and functorch wrappers
    if any(forward_ad.unpack_dual(t).tangent is not None for t in operands):
        return False  # forward-mode AD: the planned ops carry the tangents
    if records_grad(operands) and not training:
        return False
    shape = kernel_shape(rows, factors)
    return shape is not None and kron2_function(shape) is not None


def _function_modes() -> bool:
    """Whether a ``TorchFunctionMode`` other than a default-device context is active."""
    return any(not isinstance(m, DeviceContext) for m in _get_current_function_mode_stack())


def _cpu_operands(
    rows: Tensor, factors: Sequence[Tensor], biases: Sequence[Tensor | None]
) -> list[Tensor] | None:
    """All operands when they are CPU tensors of one kernel dtype and two modes, else None."""
    operands = [rows, *factors, *(b for b in biases if b is not None)]
    if any(t.device.type != "cpu" or t.dtype != rows.dtype for t in operands):
        return None
    if rows.dtype not in _DTYPES or len(factors) != 2 or rows.dim() != 3:
        return None
    return operands


def _compiled_use(rows: Tensor, factors: Sequence[Tensor], biases: Sequence[Tensor | None]) -> bool:
    """:func:`use_fused` while dynamo traces: the graph calls ``ndcompile::kron2``.

    Not while exporting: an exported program runs where no kernel may be built.
    Grad mode, dtypes and devices are guarded by dynamo; whether the kernel builds
    is decided once, at trace time.
    """
    if torch.compiler.is_exporting() or torch.is_autocast_enabled("cpu"):
        return False
    operands = _cpu_operands(rows, factors, biases)
    if operands is None or records_grad(operands):
        return False
    dims = _kernel_dims(rows.shape, [f.shape for f in factors])
    return dims is not None and _kernel_ready(*dims, _DTYPES[rows.dtype])


def graph_kron2(
    like: Any,
    in_shape: Sequence[int],
    factors: Sequence[Any],
    biases: Sequence[Any] = (),
    result: Any = None,
) -> bool:
    """Whether a graph captured now calls ``ndcompile::kron2`` for a two-mode contraction.

    The graph-level twin of :func:`use_fused` for the ``torch.compile`` backend's
    passes, which decide once per captured graph: an inference graph (dynamo
    guards on the grad mode, and the replaced result must not record gradients,
    as it would inside ``torch.enable_grad()`` in the model) on float32/float64
    CPU values of one dtype whose kernel builds.

    Args:
        like: The batch's example value (a FakeTensor).
        in_shape: The two input modes ``(d1, d2)``.
        factors: The two factors' example values, ``(h, d)`` or ``(R, h, d)`` each.
        biases: The example values the bias is made of (the full bias or per-mode
            biases); None entries are skipped.
        result: The example value of the result being replaced, or None.
    """
    if len(in_shape) != 2 or len(factors) != 2 or torch.is_grad_enabled():
        return False
    if getattr(result, "requires_grad", False) or torch.is_autocast_enabled("cpu"):
        return False
    values = [like, *factors, *(b for b in biases if b is not None)]
    if not all(isinstance(v, Tensor) for v in values):
        return False
    if any(v.device.type != "cpu" or v.dtype != like.dtype for v in values):
        return False
    shapes = [tuple(f.shape) for f in factors]
    sizes = [*in_shape, *(d for f in shapes for d in f)]
    if like.dtype not in _DTYPES or not all(isinstance(d, int) for d in sizes):
        return False
    dims = _kernel_dims((0, *in_shape), shapes)
    return dims is not None and _kernel_ready(*dims, _DTYPES[like.dtype])


@torch.compiler.assume_constant_result
def _kernel_ready(d1: int, d2: int, h1: int, h2: int, rank: int, dtype: str) -> bool:
    if not kernels_enabled():
        return False
    return kron2_function(KernelShape(d1, d2, h1, h2, rank, dtype)) is not None


@torch.library.custom_op("ndcompile::kron2", mutates_args=())
def _kron2_op(rows: Tensor, w1: Tensor, w2: Tensor, bias: Tensor | None) -> Tensor:
    return _run(rows, (w1, w2), bias)


@_kron2_op.register_fake
def _kron2_fake(rows: Tensor, w1: Tensor, w2: Tensor, bias: Tensor | None) -> Tensor:
    return rows.new_empty((rows.shape[0], w1.shape[-2], w2.shape[-2]))


def fused_kron2(rows: Tensor, factors: Sequence[Tensor], bias: Tensor | None) -> Tensor:
    """``(rows, h1, h2)`` = ``bias + sum_r W1[r] @ rows[b] @ W2[r]^T`` for every row.

    Call only where :func:`use_fused` says so. Under ``torch.compile`` this is the
    ``ndcompile::kron2`` custom op (inductor calls the kernel); eagerly, the kernel.

    Args:
        rows: The batch ``(rows, d1, d2)``.
        factors: The two factors, ``(h, d)`` or ``(R, h, d)`` each.
        bias: The full bias (``h1*h2`` elements) or None.

    Returns:
        A new contiguous tensor (from the buffer pool when it is large).
    """
    if torch.compiler.is_compiling():
        w1, w2 = factors
        return torch.ops.ndcompile.kron2(rows, w1, w2, bias)  # type: ignore[no-any-return]
    return _run(rows, factors, bias)


def _run(rows: Tensor, factors: Sequence[Tensor], bias: Tensor | None) -> Tensor:
    """Call the compiled kernel (see :func:`fused_kron2`).

    Without one (a compiled graph that decided on another machine or process, or a
    call :func:`use_fused` did not approve), the same contraction runs in PyTorch.
    """
    f1, f2 = (f if f.dim() == 3 else f.unsqueeze(0) for f in factors)
    shape = kernel_shape(rows, factors)
    found = None if shape is None or not kernels_enabled() else kron2_function(shape)
    if shape is None or found is None:
        y = torch.einsum("rji,bik,rnk->bjn", f1, rows, f2)
        return y if bias is None else y + bias.reshape(y.shape[1:])
    fn, order, width = found
    x = rows.contiguous()
    # Order "21" takes the stacked first factors (h1, R, d1); "12" takes them as is.
    w1 = (f1.permute(1, 0, 2) if order == "21" else f1).contiguous()
    w2t = _padded(f2.transpose(1, 2), width)  # (R, d2, width): zero columns past h2
    b = None if bias is None else _padded(bias.reshape(shape.h1, shape.h2), width)
    y = empty_like_rows(x, (x.shape[0], shape.h1, shape.h2))
    unit = vector_unit()
    stream = int(
        unit is not None
        and bool(unit.stream)
        and y.numel() * y.element_size() >= STREAM_BYTES
        and y.data_ptr() % unit.bytes == 0
    )
    fn(
        x.data_ptr(),
        w1.data_ptr(),
        w2t.data_ptr(),
        None if b is None else b.data_ptr(),
        y.data_ptr(),
        x.shape[0],
        torch.get_num_threads(),
        stream,
    )
    return y


def _padded(t: Tensor, width: int) -> Tensor:
    """``t`` contiguous, its last dim zero-padded to ``width``."""
    if t.shape[-1] == width:
        return t.contiguous()
    out = t.new_zeros((*t.shape[:-1], width))
    out[..., : t.shape[-1]] = t
    return out
