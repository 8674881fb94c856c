"""Reuse cases of the buffer pool (:mod:`ndcompile.ir.pages`), run in a fresh interpreter.

``tests/test_pages.py::test_pool_reuse_cases`` runs this file with ``python -m pytest``
in a new process: whether the pool may reuse a buffer depends on the references
other code holds to storages, and the suite's earlier tests can leave some behind
(the pool then declines to reuse, which is safe but would make these cases fail).
"""

from __future__ import annotations

import threading

import pytest
import torch

from ndcompile.ir import pages
from ndcompile.layers.ndlinear import NdLinear

#: Every test starts and ends with an empty pool.
pytestmark = pytest.mark.usefixtures("empty_pool")


def test_a_freed_buffer_is_handed_out_again_and_a_held_one_is_not(small_buffers) -> None:
    like = torch.empty(0)
    a = pages.empty_like_rows(like, (small_buffers,))
    ptr = a.data_ptr()
    b = pages.empty_like_rows(like, (small_buffers,))
    assert b.data_ptr() != ptr  # a is still held
    a.fill_(1.0)
    b.fill_(2.0)
    assert float(a.sum()) == small_buffers
    del a
    c = pages.empty_like_rows(like, (16, small_buffers // 16))
    assert c.data_ptr() == ptr and c.shape == (16, small_buffers // 16) and c.is_contiguous()
    assert pages.pooled_bytes() == (2 * small_buffers * 4, 0)


def test_views_and_saved_tensors_keep_a_buffer_out_of_the_pool(small_buffers) -> None:
    like = torch.empty(0)
    a = pages.empty_like_rows(like, (small_buffers,))
    view = a[10:20]
    view.fill_(3.0)
    ptr = a.data_ptr()
    del a
    b = pages.empty_like_rows(like, (small_buffers,))
    assert b.data_ptr() != ptr
    b.fill_(0.0)
    assert view.tolist() == [3.0] * 10
    del view, b
    c = pages.empty_like_rows(like, (small_buffers,)).requires_grad_()
    z = c.sin()  # autograd saves c
    ptr = c.data_ptr()
    del c
    assert pages.empty_like_rows(like, (small_buffers,)).data_ptr() != ptr
    z.sum().backward()  # the saved input is intact


def test_a_freed_buffer_is_reused_with_another_dtype_of_the_same_size(small_buffers) -> None:
    a = pages.empty_like_rows(torch.empty(0), (small_buffers,))
    ptr = a.data_ptr()
    del a
    b = pages.empty_like_rows(torch.empty(0, dtype=torch.float64), (small_buffers // 2,))
    assert b.data_ptr() == ptr and b.dtype == torch.float64 and b.shape == (small_buffers // 2,)


def test_the_ceiling_and_the_switch(small_buffers, monkeypatch) -> None:
    like = torch.empty(0)
    monkeypatch.setenv("NDCOMPILE_POOL_MB", "0")
    a = pages.empty_like_rows(like, (small_buffers,))
    assert pages.pooled_bytes() == (0, 0)
    del a
    assert pages.pooled_bytes() == (0, 0)
    # A ceiling of two buffers: a third one is not kept, and a free one makes room.
    monkeypatch.setenv("NDCOMPILE_POOL_MB", str(2 * small_buffers * 4 / 2**20))
    a, b = (pages.empty_like_rows(like, (small_buffers,)) for _ in range(2))
    c = pages.empty_like_rows(like, (small_buffers,))
    assert pages.pooled_bytes() == (2 * small_buffers * 4, 0)
    del a
    d = pages.empty_like_rows(like, (2 * small_buffers,))  # evicts a, is not kept either
    assert pages.pooled_bytes() == (small_buffers * 4, 0)
    del b, c, d


def test_release_drops_only_free_buffers(small_buffers) -> None:
    like = torch.empty(0)
    a = pages.empty_like_rows(like, (small_buffers,))
    b = pages.empty_like_rows(like, (small_buffers,))
    del b
    assert pages.pooled_bytes() == (small_buffers * 4, small_buffers * 4)
    assert pages.release_buffers() == small_buffers * 4
    assert pages.pooled_bytes() == (small_buffers * 4, 0)
    del a


def test_tiled_layer_results_stay_intact_while_held(small_buffers) -> None:
    torch.manual_seed(0)
    nd = NdLinear((6, 8), (4, 5), rank=2, dtype=torch.float64, tile=64)
    xs = [torch.randn(1000, 6, 8, dtype=torch.float64) for _ in range(3)]
    untiled = NdLinear((6, 8), (4, 5), rank=2, dtype=torch.float64, tile=0)
    untiled.load_state_dict(nd.state_dict())
    with torch.no_grad():
        y0, y1 = nd(xs[0]), nd(xs[1])
        assert y0.data_ptr() != y1.data_ptr()
        ptr = y0.data_ptr()
        del y0
        y2 = nd(xs[2])
        assert y2.data_ptr() == ptr  # y0's buffer, reused
        for x, y in zip(xs[1:], (y1, y2), strict=True):
            torch.testing.assert_close(y, untiled(x), rtol=1e-12, atol=1e-12)


def test_threads_never_share_a_buffer(small_buffers) -> None:
    like = torch.empty(0)
    spare = [pages.empty_like_rows(like, (small_buffers,)) for _ in range(4)]
    del spare  # four free buffers in the pool
    start = threading.Barrier(8)
    held: list[torch.Tensor] = []
    lock = threading.Lock()

    def grab() -> None:
        start.wait()
        for _ in range(20):
            t = pages.empty_like_rows(like, (small_buffers,))
            with lock:
                held.append(t)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({t.data_ptr() for t in held}) == len(held) == 160


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_a_held_storage_object_keeps_a_buffer_out_of_the_pool(small_buffers) -> None:
    like = torch.empty(0)
    a = pages.empty_like_rows(like, (small_buffers,))
    a.fill_(1.0)
    storage, typed = a.untyped_storage(), a.storage()
    ptr = a.data_ptr()
    del a
    b = pages.empty_like_rows(like, (small_buffers,))
    assert b.data_ptr() != ptr
    b.fill_(7.0)
    assert typed[0] == 1.0 and storage.data_ptr() == ptr
    del storage, typed
    assert pages.empty_like_rows(like, (small_buffers,)).data_ptr() == ptr


def test_shared_memory_is_never_reused(small_buffers) -> None:
    like = torch.empty(0)
    a = pages.empty_like_rows(like, (small_buffers,))
    a.share_memory_()  # what a multiprocessing queue does: another process maps it
    ptr = a.data_ptr()
    del a
    assert pages.empty_like_rows(like, (small_buffers,)).data_ptr() != ptr
    assert pages.pooled_bytes() == (0, small_buffers * 4)  # the shared one was dropped


def test_untiled_layer_results_are_reused_only_once_dropped(small_buffers) -> None:
    layer = NdLinear((6, 8), (4, 5), dtype=torch.float64, tile=0)
    x = torch.randn(200, 6, 8, dtype=torch.float64)  # a 64 KB result
    with torch.no_grad():
        ref = layer(x).clone()
        first = layer(x)
        address = first.data_ptr()
        second = layer(x)  # the first result is still held: a new buffer
        assert second.data_ptr() != address
        del first
        third = layer(x)  # the first result's buffer, free again
    assert third.data_ptr() == address
    torch.testing.assert_close(second, ref, rtol=0, atol=0)
    torch.testing.assert_close(third, ref, rtol=0, atol=0)
