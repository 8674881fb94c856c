"""Large CPU outputs backed by transparent huge pages.

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
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = ["HUGE_PAGE", "MIN_BYTES", "empty_like_rows", "huge_pages_available"]

#: Size of a transparent huge page on x86-64 and arm64 Linux (4 KiB base pages).
HUGE_PAGE = 2 << 20
#: Smallest buffer that gets the advice: glibc's largest mmap threshold, so smaller
#: buffers usually come from its heap, whose pages are already resident.
MIN_BYTES = 32 << 20
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


def empty_like_rows(like: Tensor, shape: Sequence[int]) -> Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype and device.

    A CPU buffer of at least :data:`MIN_BYTES` has its whole huge pages advised
    before anything touches it (see the module docstring); anything else is plain
    ``like.new_empty(shape)``. A refused advice changes nothing but speed.

    Args:
        like: Supplies dtype and device.
        shape: The shape.

    Returns:
        The new tensor.
    """
    out = like.new_empty(tuple(shape))
    nbytes = out.numel() * out.element_size()
    if out.device.type != "cpu" or nbytes < MIN_BYTES or not huge_pages_available():
        return out
    start = out.data_ptr()
    lo = -(-start // HUGE_PAGE) * HUGE_PAGE
    hi = (start + nbytes) // HUGE_PAGE * HUGE_PAGE
    madvise = _madvise()
    if madvise is not None and hi > lo:
        madvise(lo, hi - lo, _MADV_HUGEPAGE)
    return out
