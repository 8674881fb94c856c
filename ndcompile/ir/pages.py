"""Large CPU outputs: reused when freed, and backed by transparent huge pages.

glibc serves every allocation of 32 MiB or more (its largest mmap threshold) with a
fresh ``mmap``, so a layer that returns such a tensor takes one page fault per 4 KiB
page the first time it writes it: on a VM that is about a microsecond a page, and
for the transformer MLP's 50 MB output (768 -> 3072 over 4,096 rows) it was half of
the tiled forward's time. Advising the kernel to back the buffer's aligned interior
with 2 MiB pages (``madvise(MADV_HUGEPAGE)``) before the first write cuts the faults
512-fold. The tensor stays an ordinary ``torch.empty`` allocation: it is freed,
resized, shared and pickled as any other.

The advice is given only on Linux with transparent huge pages not set to ``never``,
only for buffers of at least :data:`MIN_BYTES`, and never when the environment sets
``NDCOMPILE_HUGEPAGES=0``.

Even on huge pages the kernel zeroes every fresh page, which costs as much as writing
the buffer: PyTorch's CPU allocator has no cache, so a layer called again gets new
pages each time. The buffers made here are therefore kept in a small pool, as
PyTorch's CUDA caching allocator does for GPU memory: a buffer is handed out again
only once nothing but the pool refers to its storage (the caller's tensor, its views
and anything autograd saved are gone), so a returned tensor is never written behind
its holder's back. The pool keeps at most ``NDCOMPILE_POOL_MB`` MiB (default
:data:`POOL_MB`; ``0`` turns it off) and :func:`release_buffers` drops the free ones.

The tiled op (:mod:`ndcompile.ir.tiled`) takes its output from here, and so does an
untiled program run eagerly without gradients (:func:`pooled_result`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ndcompile.ir.autodiff import register_shapes
from ndcompile.ir.program import ContractionProgram, records_grad

__all__ = [
    "HUGE_PAGE",
    "MIN_BYTES",
    "POOL_MB",
    "eager_cpu",
    "empty_like_rows",
    "huge_pages_available",
    "pool_paused",
    "pooled_bytes",
    "pooled_result",
    "release_buffers",
    "result_shape",
]

#: Size of a transparent huge page on x86-64 and arm64 Linux (4 KiB base pages).
HUGE_PAGE = 2 << 20
#: Smallest buffer that gets the advice: glibc's largest mmap threshold, so smaller
#: buffers usually come from its heap, whose pages are already resident.
MIN_BYTES = 32 << 20
#: Default ceiling of the buffer pool, in MiB (``NDCOMPILE_POOL_MB`` overrides it).
POOL_MB = 256
_MADV_HUGEPAGE = 14
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.cache
def _madvise() -> Any:
    try:
        with open(_THP_SETTING) as fh:
            if "[never]" in fh.read():
                return None
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def huge_pages_available() -> bool:
    """Whether large outputs are advised onto huge pages on this machine and process."""
    if not sys.platform.startswith("linux") or os.environ.get("NDCOMPILE_HUGEPAGES") == "0":
        return False
    return _madvise() is not None


def _state(storage: torch.UntypedStorage) -> tuple[int, int, bool]:
    """C++ use count, Python reference count and sharedness of ``storage``."""
    return (
        torch._C._storage_Use_Count(storage._cdata),
        sys.getrefcount(storage),
        storage.is_shared(),
    )


def _free(storage: torch.UntypedStorage) -> bool:
    """Whether only the pool refers to ``storage`` (called from a loop over the pool).

    Tensors and views of it hold C++ references (its use count); the storage's own
    Python object, which ``tensor.untyped_storage()`` returns to every caller, holds
    Python references. Memory shared with other processes is never free: they map it.
    """
    use, refs, shared = _state(storage)
    return use == 1 and refs <= _POOL_REFS and not shared


def _probe(storage: torch.UntypedStorage) -> int:
    # Called exactly as _free is, so it sees the same references.
    _, refs, _ = _state(storage)
    return refs


#: Python references that :func:`_free` sees on a pool entry nothing else refers to
#: (the pool's list, the loop variable, the calls' arguments), measured at import.
_POOL_REFS = [_probe(s) for s in [torch.UntypedStorage(0)]][0]  # noqa: RUF015 - as the pool loops


class _Pool:
    """CPU storages made by :func:`empty_like_rows`, reused once only the pool holds them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.storages: list[torch.UntypedStorage] = []

    def take(self, like: Tensor, shape: tuple[int, ...], nbytes: int) -> Tensor | None:
        # The tensor is made under the lock: until it exists the storage still looks
        # free, and another thread must not take it too.
        with self.lock:
            self.storages = [s for s in self.storages if not s.is_shared()]
            for storage in [s for s in self.storages if s.nbytes() == nbytes and _free(s)]:
                return like.new_empty(0).set_(storage, 0, shape, _contiguous_strides(shape))
        return None

    def keep(self, storage: torch.UntypedStorage, limit: int) -> None:
        with self.lock:
            total = sum(s.nbytes() for s in self.storages) + storage.nbytes()
            for old in [s for s in self.storages if _free(s)]:
                if total <= limit:
                    break
                self.storages.remove(old)
                total -= old.nbytes()
            if total <= limit:
                self.storages.append(storage)

    def split(self) -> tuple[list[torch.UntypedStorage], list[torch.UntypedStorage]]:
        """``(in use, free)``, under the caller's lock."""
        flags = [_free(s) for s in self.storages]
        used = [s for s, f in zip(self.storages, flags, strict=True) if not f]
        free = [s for s, f in zip(self.storages, flags, strict=True) if f]
        return used, free

    def release(self) -> int:
        with self.lock:
            self.storages, free = self.split()
        return sum(s.nbytes() for s in free)


_POOL = _Pool()


_PAUSED = threading.local()


@contextlib.contextmanager
def pool_paused() -> Iterator[None]:
    """Within the block (on this thread), buffers are neither taken from nor kept in the pool.

    Tools that follow every storage's lifetime (such as
    :func:`ndcompile.layers.memory.peak_live_bytes`) use it: a pooled storage outlives
    the tensors made from it.
    """
    depth = getattr(_PAUSED, "depth", 0)
    _PAUSED.depth = depth + 1
    try:
        yield
    finally:
        _PAUSED.depth = depth


def _pool_limit() -> int:
    """The pool's ceiling in bytes (0: off), from ``NDCOMPILE_POOL_MB``."""
    paused: int = getattr(_PAUSED, "depth", 0)
    if paused or not hasattr(torch._C, "_storage_Use_Count"):
        return 0
    text = os.environ.get("NDCOMPILE_POOL_MB", "")
    try:
        mb = float(text) if text else POOL_MB
    except ValueError:
        mb = POOL_MB
    return max(0, int(mb * (1 << 20)))


def pooled_bytes() -> tuple[int, int]:
    """Bytes the pool holds: ``(in use by callers, free for reuse)``."""
    with _POOL.lock:
        used, free = _POOL.split()
        return sum(s.nbytes() for s in used), sum(s.nbytes() for s in free)


def release_buffers() -> int:
    """Drop the pool's free buffers (as ``torch.cuda.empty_cache`` does on a GPU).

    Returns:
        The bytes released.
    """
    return _POOL.release()


def empty_like_rows(like: Tensor, shape: Sequence[int]) -> Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype and device.

    A CPU buffer of at least :data:`MIN_BYTES` comes from the pool when one of its
    size is free; a new one has its whole huge pages advised before anything touches
    it and joins the pool (see the module docstring). Anything else is plain
    ``like.new_empty(shape)``. A refused advice changes nothing but speed.

    Args:
        like: Supplies dtype and device.
        shape: The shape.

    Returns:
        The new tensor (contiguous, storage offset 0).
    """
    shape = tuple(shape)
    nbytes = math.prod(shape) * like.element_size()
    if like.device.type != "cpu" or nbytes < MIN_BYTES or not _plain(like):
        return like.new_empty(shape)
    limit = _pool_limit()
    reused = _POOL.take(like, shape, nbytes) if limit else None
    if reused is not None:
        return reused
    out = like.new_empty(shape)
    if huge_pages_available():
        _advise(out.data_ptr(), nbytes)
    if limit:
        _POOL.keep(out.untyped_storage(), limit)
    return out


def _plain(like: Tensor) -> bool:
    """A real tensor (not a fake, functional or other subclass) whose memory is its own."""
    return type(like) in (Tensor, torch.nn.Parameter)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _advise(start: int, nbytes: int) -> None:
    lo = -(-start // HUGE_PAGE) * HUGE_PAGE
    hi = (start + nbytes) // HUGE_PAGE * HUGE_PAGE
    madvise = _madvise()
    if madvise is not None and hi > lo:
        madvise(lo, hi - lo, _MADV_HUGEPAGE)


def result_shape(program: ContractionProgram, x: Tensor, factors: Sequence[Tensor]) -> tuple:
    """The shape of ``program``'s result on the batch ``x`` and ``factors``."""
    shapes = register_shapes(program, [x.shape, *[f.shape for f in factors]])
    return tuple(shapes[program.result])


def eager_cpu(x: Any) -> bool:
    """Whether ``x`` is a CPU tensor whose ops run as written: not exported, no autocast."""
    if not isinstance(x, Tensor) or x.device.type != "cpu":
        return False
    return not (torch.compiler.is_exporting() or torch.is_autocast_enabled("cpu"))


def pooled_result(
    program: ContractionProgram,
    x: Tensor,
    factors: Sequence[Tensor],
    out_elements: int,
    biases: Sequence[Tensor] = (),
) -> Tensor | None:
    """A buffer from the pool for the result of an untiled eager CPU run, or None.

    A result of :data:`MIN_BYTES` or more would otherwise be fresh
    pages that the kernel zeroes on first write (as the tiled op's output would be),
    so the untiled program writes it into a pooled buffer when its last matmul can
    write there directly. Small results, runs that record gradients (``out=`` ops
    have no autograd), autocast, and traced, vmapped, exported or compiled code get
    None: a plain result.

    Args:
        program: The program run over the whole batch ``x``.
        x: The batch (rows along dim 0).
        factors: The program's other operands.
        out_elements: Elements of one result row.
        biases: Tensors added into the result (full or per-mode biases).

    Returns:
        A contiguous tensor of the program's result shape, or None.
    """
    if type(x) is not Tensor or torch.compiler.is_compiling():
        return None  # decided before the size, which dynamo would guard on
    if x.shape[0] * out_elements * x.element_size() < MIN_BYTES:
        return None  # most calls stop here, before the checks below
    if not eager_cpu(x) or torch.jit.is_tracing() or not program.writes_out():
        return None
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return None
    if records_grad((x, *factors, *biases)):
        return None
    return empty_like_rows(x, result_shape(program, x, factors))
