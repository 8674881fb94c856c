"""Tests for ndcompile.ir.pages: large CPU buffers, pooled and advised onto huge pages."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ndcompile.ir import pages
from ndcompile.ir.tiled import run_tiled
from ndcompile.layers.ndlinear import NdLinear

#: Every test starts and ends with an empty pool.
pytestmark = pytest.mark.usefixtures("empty_pool")


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Replace madvise by a recorder; pretend huge pages are on."""
    calls: list[tuple[int, int, int]] = []

    def fake(addr: int, length: int, advice: int) -> int:
        calls.append((addr, length, advice))
        return 0

    monkeypatch.setattr(pages, "_madvise", lambda: fake)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("NDCOMPILE_HUGEPAGES", raising=False)
    return calls


def test_large_buffer_gets_its_aligned_interior_advised(recorder) -> None:
    like = torch.empty(0)
    out = pages.empty_like_rows(like, (pages.MIN_BYTES // 4 + 1000,))
    assert out.dtype == like.dtype and out.is_contiguous()
    (addr, length, advice) = recorder[0]
    start, stop = out.data_ptr(), out.data_ptr() + out.numel() * 4
    assert addr % pages.HUGE_PAGE == 0 and length % pages.HUGE_PAGE == 0
    assert start <= addr and addr + length <= stop
    assert stop - start - length < 2 * pages.HUGE_PAGE
    assert advice == pages._MADV_HUGEPAGE


def test_small_buffers_and_the_switch_skip_the_advice(recorder, monkeypatch) -> None:
    like = torch.empty(0, dtype=torch.float64)
    small = pages.empty_like_rows(like, (1000, 3))
    assert small.shape == (1000, 3) and small.dtype == torch.float64
    monkeypatch.setenv("NDCOMPILE_HUGEPAGES", "0")
    assert not pages.huge_pages_available()
    pages.empty_like_rows(like, (pages.MIN_BYTES // 8 + 8,))
    assert recorder == []


def test_thp_never_turns_it_off(tmp_path, monkeypatch) -> None:
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(pages, "_THP_SETTING", str(setting))
    pages._madvise.cache_clear()
    try:
        assert pages._madvise() is None
        assert not pages.huge_pages_available()
    finally:
        pages._madvise.cache_clear()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux-only")
def test_real_advice_keeps_an_ordinary_tensor() -> None:
    out = pages.empty_like_rows(torch.empty(0), (pages.MIN_BYTES // 4 + 3,))
    out.fill_(2.0)
    assert float(out.sum()) == 2.0 * out.numel()
    out.resize_(10)  # an ordinary, resizable torch allocation
    assert out.shape == (10,)


def test_tiled_forward_and_backward_use_it(recorder, monkeypatch) -> None:
    monkeypatch.setattr(pages, "MIN_BYTES", 1 << 12)
    nd = NdLinear((6, 8), (4, 5), dtype=torch.float64, tile=4096)
    # A result of 4.8 MB and an input gradient of 11.5 MB each span whole huge pages.
    x = torch.randn(30_000, 6, 8, dtype=torch.float64, requires_grad=True)
    factors = nd.factor_operands()
    y = run_tiled(nd.program_text, nd.tile, x, factors, None)
    y.sum().backward()
    assert len(recorder) == 2  # the output and the input's gradient
    ref = nd.plan().program.run(x.detach(), *[f.detach() for f in factors])
    torch.testing.assert_close(y.detach(), ref, rtol=1e-12, atol=1e-12)


def test_fake_tensors_are_not_pooled(small_buffers) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = pages.empty_like_rows(mode.from_tensor(torch.empty(0)), (small_buffers,))
    assert fake.shape == (small_buffers,)
    assert pages.pooled_bytes() == (0, 0)
    real = pages.empty_like_rows(torch.empty(0), (small_buffers,))
    real.fill_(1.0)


def test_peak_live_bytes_sees_pooled_buffers_freed(small_buffers) -> None:
    from ndcompile.layers.memory import peak_live_bytes

    def work() -> None:
        a = pages.empty_like_rows(torch.empty(0), (small_buffers,))
        del a
        b = pages.empty_like_rows(torch.empty(0), (2 * small_buffers,))
        del b

    stats = peak_live_bytes(work)
    assert stats.end_bytes == 0
    assert stats.peak_bytes == 2 * small_buffers * 4


def test_pool_reuse_cases() -> None:
    """Run ``tests/pool_cases.py`` (reuse, views, dtypes, ceiling, threads, sharing)."""
    cases = Path(__file__).with_name("pool_cases.py")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"\b10 passed", proc.stdout), proc.stdout


def test_untiled_results_come_from_the_pool(small_buffers) -> None:
    layer = NdLinear((6, 8), (4, 5), dtype=torch.float64, tile=0)
    x = torch.randn(200, 6, 8, dtype=torch.float64)  # a 64 KB result
    ref = layer.plan().program.run(x, *[f.detach() for f in layer.factor_operands()])
    ref = ref + layer.bias.detach().reshape(4, 5)
    with torch.no_grad():
        pooled = layer(x)
        small = layer(x[:20])  # below the pool's size
    assert pages.pooled_bytes()[0] == pooled.numel() * 8
    trained = layer(x)  # gradients flow: a plain result, never a pooled buffer
    assert trained.requires_grad and pages.pooled_bytes()[0] == pooled.numel() * 8
    for got, want in ((pooled, ref), (small, ref[:20]), (trained.detach(), ref)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, "modes"])
def test_a_trainable_bias_on_frozen_factors_gets_a_plain_result(small_buffers, bias) -> None:
    layer = NdLinear((6, 8), (4, 5), bias=bias, dtype=torch.float64, tile=0)
    for f in layer.factors:
        f.requires_grad_(False)
    x = torch.randn(200, 6, 8, dtype=torch.float64)
    y = layer(x)  # out= ops have no autograd: this run must not write into the pool
    y.square().sum().backward()
    grads = [p.grad for p in layer.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert pages.pooled_bytes() == (0, 0)


def test_autocast_vmap_and_tracing_get_plain_results(small_buffers) -> None:
    layer = NdLinear((6, 8), (4, 5), dtype=torch.float32, tile=0)
    x = torch.randn(200, 6, 8)
    with torch.no_grad():
        want = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        mapped = torch.func.vmap(layer)(torch.stack([x, 2 * x]))
        traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(mapped[0], want)
    graph = str(traced.graph)
    assert "set_" not in graph
    torch.testing.assert_close(traced(x), want)
