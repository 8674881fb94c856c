"""Tests of truncated (leading-triplet) fits: ndcompile.compress.truncated and its users."""

from __future__ import annotations

import math

import pytest
import torch

from ndcompile.compress.calibrated import (
    accumulate_gram,
    nearest_kronecker_calibrated,
    output_rel_error,
)
from ndcompile.compress.kronecker import nearest_kronecker, rank_for_tolerance
from ndcompile.compress.kronecker_dense import kron_dense, rearrange, unrearrange
from ndcompile.compress.truncated import (
    residual_sq_norm,
    sq_norm,
    truncated_svd,
    use_truncated,
)

# (16, 16) -> (16, 16): the rearranged matrix is 256 x 256, large enough for the
# truncated path at the ranks used here and small enough for a reference SVD.
IN, OUT = (16, 16), (16, 16)


def matrix(m: int, n: int, kind: str, seed: int = 0) -> torch.Tensor:
    """A float64 test matrix: Gaussian (flat spectrum) or with a decaying spectrum."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if kind == "gauss":
        return a
    u = torch.linalg.qr(torch.randn(m, 40, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, 40, generator=gen, dtype=torch.float64)).Q
    s = 10.0 * 0.8 ** torch.arange(40, dtype=torch.float64)
    return (u * s) @ v.T + 1e-3 * a


def weight(kind: str, seed: int = 0) -> torch.Tensor:
    """A dense (256, 256) weight whose rearranged matrix is ``matrix(256, 256, kind)``."""
    return unrearrange(matrix(256, 256, kind, seed), IN, OUT)


def full_errors(w: torch.Tensor) -> torch.Tensor:
    """Reference: error of the best rank-r fit, index r, from a full float64 SVD."""
    s = torch.linalg.svdvals(rearrange(w.double(), IN, OUT))
    tail = s.pow(2).flip(0).cumsum(0).flip(0).sqrt()
    return torch.cat([tail, tail.new_zeros(1)]) / s.norm()


def kron_weight(rank: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    factors = [
        torch.randn(rank, h, d, generator=gen, dtype=torch.float64)
        for d, h in zip(IN, OUT, strict=True)
    ]
    return kron_dense(factors).to(dtype)


# --------------------------------------------------------------------------- truncated_svd


@pytest.mark.parametrize("kind", ["gauss", "decay"])
@pytest.mark.parametrize(("shape", "k"), [((200, 300), 1), ((200, 300), 7), ((300, 160), 12)])
def test_randomized_matches_full_svd(kind: str, shape: tuple[int, int], k: int) -> None:
    a = matrix(*shape, kind, seed=k)
    res = truncated_svd(a, k, method="randomized")
    ref = torch.linalg.svd(a, full_matrices=False)
    assert res.method == "randomized" and res.converged and res.passes > 0
    assert res.u.shape == (shape[0], k) and res.vh.shape == (k, shape[1]) and len(res.s) == k
    assert res.total == pytest.approx(float(a.pow(2).sum()), rel=1e-12)
    best = float(ref.S[k:].norm() / ref.S.norm())
    assert res.rel_errors()[-1] == pytest.approx(best, rel=1e-8)
    direct = math.sqrt(residual_sq_norm(a, res.u, res.s, res.vh) / res.total)
    assert direct == pytest.approx(best, rel=1e-8)
    torch.testing.assert_close(res.u.T @ res.u, torch.eye(k, dtype=torch.float64))
    if kind == "decay":  # well separated: the triplets themselves match
        torch.testing.assert_close(res.s, ref.S[:k], rtol=1e-9, atol=0)


def test_float32_work_has_float64_results() -> None:
    a = matrix(256, 320, "decay", seed=3)
    res = truncated_svd(a.float(), 6, method="randomized")
    assert res.s.dtype == res.u.dtype == torch.float64
    ref = torch.linalg.svdvals(a.float().double())
    torch.testing.assert_close(res.s, ref[:6], rtol=1e-6, atol=0)
    assert sq_norm(a.float()) == pytest.approx(float(a.float().double().pow(2).sum()), rel=1e-12)


def test_auto_method_and_pass_cap() -> None:
    assert not use_truncated((64, 500), 2)  # small: the full SVD is cheap
    assert not use_truncated((256, 256), 60)  # rank too close to the dimension
    assert use_truncated((256, 256), 4)
    a = matrix(200, 200, "gauss", seed=4)
    assert truncated_svd(a, 3).method == "randomized"
    full = truncated_svd(a[:100], 3)
    assert full.method == "full" and len(full.s) == 100 and full.u.shape == (100, 3)
    capped = truncated_svd(a, 3, method="randomized", max_passes=4)
    assert not capped.converged and capped.passes <= 4
    with pytest.raises(ValueError, match="randomized"):
        truncated_svd(a, 3, method="lanczos")


def test_warm_start_from_earlier_vectors() -> None:
    a = matrix(256, 300, "decay", seed=5)
    cold = truncated_svd(a, 16, method="randomized")
    first = truncated_svd(a, 8, method="randomized")
    warm = truncated_svd(a, 16, method="randomized", init=first.u)
    assert warm.passes <= cold.passes
    assert warm.rel_errors()[-1] == pytest.approx(cold.rel_errors()[-1], rel=1e-8)
    tall = truncated_svd(a.T, 16, method="randomized", init=first.vh.T)
    assert tall.rel_errors()[-1] == pytest.approx(cold.rel_errors()[-1], rel=1e-8)


# --------------------------------------------------------------------------- Kronecker fits


@pytest.mark.parametrize("kind", ["gauss", "decay"])
@pytest.mark.parametrize("rank", [1, 4, 12])
def test_truncated_fit_error_equals_full_svd(kind: str, rank: int) -> None:
    w = weight(kind, seed=rank)
    fit = nearest_kronecker(w, IN, OUT, rank)
    ref = full_errors(w)
    assert fit.method == "truncated_svd" and fit.rank == rank
    assert fit.rel_error == pytest.approx(float(ref[rank]), rel=1e-8)
    real = float((w - kron_dense(fit.factors)).norm() / w.norm())
    assert real == pytest.approx(fit.rel_error, rel=1e-8)
    assert fit.spectrum is not None and len(fit.spectrum) == rank
    assert fit.errors is not None
    errors = torch.tensor(fit.errors, dtype=torch.float64)
    torch.testing.assert_close(errors, ref[1 : rank + 1], rtol=1e-8, atol=0)


@pytest.mark.parametrize(
    ("dtype", "bound"), [(torch.float32, 1e-6), (torch.float64, 1e-12)], ids=["f32", "f64"]
)
@pytest.mark.parametrize(("rank", "seed"), [(1, 0), (3, 1), (6, 2)])
def test_exact_kronecker_sum_is_recovered(rank: int, seed: int, dtype, bound: float) -> None:
    w = kron_weight(rank, seed, dtype)
    fit = nearest_kronecker(w, IN, OUT, rank)
    assert fit.method == "truncated_svd"
    assert fit.rel_error < bound
    real = float((w.double() - kron_dense(fit.factors).double()).norm() / w.double().norm())
    assert real < bound
    assert all(f.dtype == dtype for f in fit.factors)


@pytest.mark.parametrize(
    ("true_rank", "noise", "tol"), [(3, 1e-6, 1e-3), (12, 1e-5, 1e-3), (20, 1e-4, 1e-2)]
)
def test_tol_picks_the_same_rank_as_the_full_method(true_rank, noise, tol) -> None:
    gen = torch.Generator().manual_seed(true_rank)
    w = kron_weight(true_rank, seed=true_rank)
    w = w + noise * w.norm() / 256 * torch.randn(w.shape, generator=gen, dtype=torch.float64)
    ref = full_errors(w)
    expect = next(r for r in range(1, 257) if ref[r] <= tol)
    fit = rank_for_tolerance(w, IN, OUT, tol, max_rank=48)
    assert fit.method == "truncated_svd"
    assert fit.rank == expect and fit.tol_met is True
    assert fit.rel_error == pytest.approx(float(ref[expect]), rel=1e-8)
    assert fit.errors is not None and len(fit.errors) >= expect
    # unmet: the max_rank fit, flagged
    short = rank_for_tolerance(w, IN, OUT, tol, max_rank=expect - 1) if expect > 1 else None
    if short is not None:
        assert short.rank == expect - 1 and short.tol_met is False
        assert short.rel_error == pytest.approx(float(ref[expect - 1]), rel=1e-8)


def test_tol_on_a_flat_spectrum_grows_to_max_rank() -> None:
    w = weight("gauss", seed=7)
    fit = rank_for_tolerance(w, IN, OUT, 0.5, max_rank=20)
    ref = full_errors(w)
    assert fit.rank == 20 and fit.tol_met is False
    assert fit.rel_error == pytest.approx(float(ref[20]), rel=1e-8)


def test_calibrated_starts_from_the_truncated_fit() -> None:
    w = weight("decay", seed=8).float()
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(300, 12, generator=gen, dtype=torch.float64) @ torch.randn(
        12, 256, generator=gen, dtype=torch.float64
    )
    gram, _ = accumulate_gram([x], 256)
    plain = nearest_kronecker(w, IN, OUT, 4)
    cal = nearest_kronecker_calibrated(w, IN, OUT, 4, gram, n_iter=3, damping=0.01)
    plain_out = output_rel_error(w, kron_dense(plain.factors), gram)
    assert cal.out_rel_error is not None and cal.out_rel_error <= plain_out * (1 + 1e-6)
    assert all(f.dtype == torch.float32 for f in cal.factors)


def test_cp_als_starts_from_truncated_mode_svds() -> None:
    shape = (12, 12, 2)  # the first two unfoldings are 144 x 576: truncated init
    assert use_truncated((144, 576), 2)
    gen = torch.Generator().manual_seed(9)
    factors = [torch.randn(2, n, n, generator=gen, dtype=torch.float64) for n in shape]
    w = kron_dense(factors)
    fit = nearest_kronecker(w, shape, shape, 2, n_iter=30)
    assert fit.method == "cp_als" and fit.rel_error < 1e-8


def test_lowrank_reference_error_uses_leading_triplets() -> None:
    from ndcompile.compress.layer_fits import lowrank_output_error

    w = matrix(300, 400, "decay", seed=10).float()
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(64, 400, generator=gen)
    k = 6
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    w_hat = (u[:, :k] * s[:k]) @ vh[:k]
    ref = x.double() @ w.double().T
    expect = float((ref - x.double() @ w_hat.T).norm() / ref.norm())
    got = lowrank_output_error(w, x, None, params=k * 700 + 5)
    assert use_truncated((300, 400), k)
    assert got == pytest.approx(expect, rel=1e-6)
    gram = x.double().T @ x.double()
    assert lowrank_output_error(w, None, gram, k * 700) == pytest.approx(
        output_rel_error(w, w_hat, gram), rel=1e-6
    )
    assert lowrank_output_error(w, x, None, params=699) is None
