"""Tests of ndcompile.compress.whitened_metric: the leading singular triplets of top_svd."""

from __future__ import annotations

import torch

from ndcompile.compress.whitened_metric import top_svd


def test_top_svd_matches_full_svd() -> None:
    m = torch.randn(30, 50, dtype=torch.float64)
    for mat in (m, m.T):
        u, s, vh = top_svd(mat, 7)
        ref = torch.linalg.svd(mat, full_matrices=False)
        torch.testing.assert_close(s, ref.S[:7])
        best = (ref.U[:, :7] * ref.S[:7]) @ ref.Vh[:7]
        torch.testing.assert_close((u * s) @ vh, best)


def test_top_svd_truncated_path_matches_full_svd() -> None:
    gen = torch.Generator().manual_seed(5)
    q1 = torch.linalg.qr(torch.randn(300, 30, generator=gen, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(400, 30, generator=gen, dtype=torch.float64)).Q
    m = (q1 * 0.7 ** torch.arange(30.0, dtype=torch.float64)) @ q2.T
    m = m + 1e-4 * torch.randn(300, 400, generator=gen, dtype=torch.float64)
    ref = torch.linalg.svd(m, full_matrices=False)
    for mat in (m, m.T):
        u, s, vh = top_svd(mat, 10)
        torch.testing.assert_close(s, ref.S[:10], rtol=1e-9, atol=0)
        best = (ref.U[:, :10] * ref.S[:10]) @ ref.Vh[:10]
        torch.testing.assert_close((u * s) @ vh, best if mat is m else best.T)
