"""Tests for ndcompile.factorize (nearest Kronecker-sum fits) and its calibrated variant."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ndcompile.compress.calibrated import (
    accumulate_gram,
    nearest_kronecker_calibrated,
    output_rel_error,
)
from ndcompile.compress.kronecker import KroneckerFit, nearest_kronecker, rank_for_tolerance
from ndcompile.compress.kronecker_dense import kron_dense, rearrange, unrearrange
from ndcompile.errors import NdCompileError


def random_factors(
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    rank: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(rank, h, d, generator=gen, dtype=torch.float64).to(dtype)
        for d, h in zip(in_shape, out_shape, strict=True)
    ]


def random_weight(in_shape: tuple[int, ...], out_shape: tuple[int, ...], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(
        math.prod(out_shape), math.prod(in_shape), generator=gen, dtype=torch.float64
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(a))


# --------------------------------------------------------------------------- kron_dense / rearrange


@pytest.mark.parametrize(
    ("in_shape", "out_shape", "rank"),
    [((3,), (4,), 1), ((2, 3), (4, 5), 1), ((2, 3), (4, 5), 3), ((2, 3, 2), (3, 1, 2), 2)],
)
def test_kron_dense_matches_torch_kron(in_shape, out_shape, rank) -> None:
    factors = random_factors(in_shape, out_shape, rank)
    expected = torch.zeros(math.prod(out_shape), math.prod(in_shape), dtype=torch.float64)
    for r in range(rank):
        term = factors[-1][r]
        for f in reversed(factors[:-1]):
            term = torch.kron(f[r], term)
        expected += term
    torch.testing.assert_close(kron_dense(factors), expected)


@pytest.mark.parametrize(
    ("in_shape", "out_shape"), [((2, 3), (4, 5)), ((6, 2), (2, 7)), ((2, 3, 2), (3, 2, 2))]
)
def test_rearrange_rank1_and_roundtrip(in_shape, out_shape) -> None:
    w = kron_dense(random_factors(in_shape, out_shape, 1))
    t = rearrange(w, in_shape, out_shape)
    assert t.shape == tuple(h * d for h, d in zip(out_shape, in_shape, strict=True))
    assert torch.linalg.matrix_rank(t.reshape(t.shape[0], -1)).item() == 1
    torch.testing.assert_close(unrearrange(t, in_shape, out_shape), w)
    if len(in_shape) == 2:
        assert torch.linalg.matrix_rank(t).item() == 1


# --------------------------------------------------------------------------- exact recovery


@pytest.mark.parametrize(
    ("dtype", "bound"), [(torch.float32, 1e-6), (torch.float64, 1e-12)], ids=["f32", "f64"]
)
@pytest.mark.parametrize(
    ("in_shape", "out_shape", "rank"),
    [
        ((4, 6), (5, 3), 1),
        ((4, 6), (5, 3), 3),
        ((2, 3, 4), (3, 2, 2), 1),
        ((2, 3, 4), (3, 2, 2), 2),
        ((4, 4, 2), (2, 3, 4), 2),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_kronecker_sum_is_recovered(in_shape, out_shape, rank, dtype, bound, seed) -> None:
    w = kron_dense(random_factors(in_shape, out_shape, rank, seed=seed)).to(dtype)
    fit = nearest_kronecker(w, in_shape, out_shape, rank)
    assert isinstance(fit, KroneckerFit)
    assert fit.method == ("svd" if len(in_shape) == 2 else "cp_als")
    assert fit.rel_error < bound
    assert rel(w, kron_dense(fit.factors)) < bound
    assert [tuple(f.shape) for f in fit.factors] == [
        (rank, h, d) for h, d in zip(out_shape, in_shape, strict=True)
    ]
    assert all(f.dtype == dtype and f.device == w.device for f in fit.factors)
    assert fit.rank == rank and fit.tol_met is None


def test_single_mode_is_identity() -> None:
    w = random_weight((6,), (4,)).float()
    fit = nearest_kronecker(w, (6,), (4,), 1)
    assert fit.rel_error == 0.0 and fit.method == "identity"
    torch.testing.assert_close(kron_dense(fit.factors), w)


# --------------------------------------------------------------------------- error vs rank


@pytest.mark.parametrize(
    ("in_shape", "out_shape", "ranks"),
    [((4, 6), (5, 3), range(1, 19)), ((2, 3, 2), (2, 2, 3), range(1, 7))],
)
def test_error_non_increasing_with_rank(in_shape, out_shape, ranks) -> None:
    w = random_weight(in_shape, out_shape, seed=3)
    fits = [nearest_kronecker(w, in_shape, out_shape, r, n_iter=100) for r in ranks]
    errs = [f.rel_error for f in fits]
    for lo, hi in itertools.pairwise(errs):
        assert hi <= lo + 1e-9
    for fit in fits:  # the reported error is the reconstruction's
        assert abs(rel(w, kron_dense(fit.factors)) - fit.rel_error) < 1e-9


def test_full_rank_is_exact_and_spectrum_matches() -> None:
    in_shape, out_shape = (4, 6), (5, 3)
    w = random_weight(in_shape, out_shape, seed=4)
    full = min(5 * 4, 3 * 6)
    fit = nearest_kronecker(w, in_shape, out_shape, full)
    assert fit.rel_error < 1e-14 and rel(w, kron_dense(fit.factors)) < 1e-13
    s = torch.tensor(fit.spectrum, dtype=torch.float64)
    assert len(s) == full and torch.all(s[:-1] >= s[1:])
    for r in (1, 5, 10):
        tail = float(torch.linalg.norm(s[r:]) / torch.linalg.norm(s))
        assert abs(nearest_kronecker(w, in_shape, out_shape, r).rel_error - tail) < 1e-12


# --------------------------------------------------------------------------- rank_for_tolerance


@pytest.mark.parametrize(
    ("in_shape", "out_shape", "true_rank"), [((4, 6), (5, 3), 3), ((2, 3, 4), (3, 2, 2), 2)]
)
def test_rank_for_tolerance_picks_smallest_rank(in_shape, out_shape, true_rank) -> None:
    w = kron_dense(random_factors(in_shape, out_shape, true_rank, seed=5))
    w = w + 1e-6 * random_weight(in_shape, out_shape, seed=6)
    tol = 1e-3
    fit = rank_for_tolerance(w, in_shape, out_shape, tol, max_rank=8)
    assert fit.rank == true_rank and fit.tol_met is True and fit.rel_error <= tol
    below = nearest_kronecker(w, in_shape, out_shape, true_rank - 1) if true_rank > 1 else None
    assert below is None or below.rel_error > tol
    assert nearest_kronecker(w, in_shape, out_shape, 1).rel_error > tol


@pytest.mark.parametrize(("in_shape", "out_shape"), [((4, 6), (5, 3)), ((2, 3, 2), (2, 2, 3))])
def test_rank_for_tolerance_reports_unmet_tol(in_shape, out_shape) -> None:
    w = random_weight(in_shape, out_shape, seed=7)
    fit = rank_for_tolerance(w, in_shape, out_shape, 1e-6, max_rank=2)
    assert fit.rank == 2 and fit.tol_met is False and fit.rel_error > 1e-6


def test_rank_for_tolerance_clamps_max_rank_n2() -> None:
    w = random_weight((4, 6), (5, 3), seed=8)
    fit = rank_for_tolerance(w, (4, 6), (5, 3), 0.0, max_rank=10_000)
    assert fit.rank == 18 and fit.tol_met is True


# --------------------------------------------------------------------------- calibrated


def low_dim_inputs(d: int, n: int = 400, k: int = 4, seed: int = 9) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=gen, dtype=torch.float64)
    p = torch.randn(k, d, generator=gen, dtype=torch.float64)
    return z @ p


def test_accumulate_gram() -> None:
    x = low_dim_inputs(12, n=60)
    gram, rows = accumulate_gram([x[:24].reshape(2, 12, 12), x[24:].float()], 12)
    assert rows == 60 and gram.dtype == torch.float64
    torch.testing.assert_close(gram, x.T @ x, rtol=1e-6, atol=1e-4)
    empty, zero = accumulate_gram([], 5)
    assert zero == 0 and empty.shape == (5, 5) and not empty.any()
    with pytest.raises(NdCompileError, match="in_features=12"):
        accumulate_gram([torch.zeros(3, 11)], 12)


@pytest.mark.parametrize(
    ("in_shape", "out_shape", "rank"),
    [((4, 6), (5, 3), 2), ((4, 4), (3, 4), 1), ((2, 3, 4), (3, 2, 2), 2)],
)
def test_calibrated_beats_plain_in_output_space(in_shape, out_shape, rank) -> None:
    w = random_weight(in_shape, out_shape, seed=10)
    x = low_dim_inputs(w.shape[1])
    gram, _ = accumulate_gram([x[:150], x[150:]], w.shape[1])
    plain = nearest_kronecker(w, in_shape, out_shape, rank)
    plain_out = output_rel_error(w, kron_dense(plain.factors), gram)
    cal = nearest_kronecker_calibrated(w, in_shape, out_shape, rank, gram)
    assert cal.method == "calibrated_als" and cal.out_rel_error is not None
    assert cal.out_rel_error <= plain_out + 1e-12  # objective never exceeds the start
    assert cal.out_rel_error < 0.9 * plain_out  # and clearly improves it here
    w_hat = kron_dense(cal.factors)
    direct = float(torch.linalg.norm(x @ (w - w_hat).T) / torch.linalg.norm(x @ w.T))
    assert abs(direct - cal.out_rel_error) < 1e-9
    assert abs(rel(w, w_hat) - cal.rel_error) < 1e-9


@pytest.mark.parametrize(("in_shape", "out_shape"), [((4, 6), (5, 3)), ((2, 3, 2), (2, 2, 3))])
def test_calibrated_objective_monotone_in_iterations(in_shape, out_shape) -> None:
    w = random_weight(in_shape, out_shape, seed=11)
    gram, _ = accumulate_gram([low_dim_inputs(w.shape[1], k=5)], w.shape[1])
    errs = [
        nearest_kronecker_calibrated(w, in_shape, out_shape, 2, gram, n_iter=it).out_rel_error
        for it in (1, 2, 4, 8, 16)
    ]
    for lo, hi in itertools.pairwise(errs):
        assert hi <= lo + 1e-12


def test_calibrated_keeps_dtype_and_supports_damping() -> None:
    w = random_weight((4, 6), (5, 3), seed=12).float()
    gram, _ = accumulate_gram([low_dim_inputs(24)], 24)
    cal = nearest_kronecker_calibrated(w, (4, 6), (5, 3), 2, gram, damping=0.01)
    assert all(f.dtype == torch.float32 for f in cal.factors)
    free = nearest_kronecker_calibrated(w, (4, 6), (5, 3), 2, gram)
    assert cal.rel_error <= free.rel_error + 1e-6  # the ridge keeps the weights closer


# --------------------------------------------------------------------------- bad input


W_BAD = torch.zeros(15, 24)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: nearest_kronecker(W_BAD, (4, 5), (5, 3), 1), r"\(4, 5\)"),
        (lambda: nearest_kronecker(W_BAD, (4, 6), (3, 3), 1), r"\(15, 24\)"),
        (lambda: nearest_kronecker(W_BAD, (4, 6), (15,), 1), "equal length"),
        (lambda: nearest_kronecker(W_BAD, (4, 6), (5, 3), 0), "rank=0"),
        (lambda: nearest_kronecker(W_BAD, (4, 6), (5, 3), 19), "between 1 and 18"),
        (lambda: nearest_kronecker(W_BAD, (24,), (15,), 2), "between 1 and 1"),
        (lambda: nearest_kronecker(torch.zeros(24), (4, 6), (1, 1), 1), "2-D"),
        (lambda: rank_for_tolerance(W_BAD, (4, 6), (5, 3), 0.1, max_rank=0), "max_rank"),
        (lambda: rearrange(W_BAD, (6, 4), (3, 3)), "mode shapes do not match"),
        (lambda: unrearrange(torch.zeros(20, 18), (6, 4), (5, 3)), r"\(20, 18\)"),
        (lambda: kron_dense([]), "non-empty"),
        (lambda: kron_dense([torch.zeros(2, 3, 3), torch.zeros(1, 3, 3)]), "common R"),
        (
            lambda: nearest_kronecker_calibrated(W_BAD, (4, 6), (5, 3), 1, torch.eye(23)),
            r"\(24, 24\)",
        ),
        (lambda: output_rel_error(W_BAD, torch.zeros(15, 23), torch.eye(24)), "equal shapes"),
    ],
)
def test_bad_input_raises(call, match) -> None:
    with pytest.raises(NdCompileError, match=match) as info:
        call()
    assert info.value.hint


def test_error_names_layer() -> None:
    with pytest.raises(NdCompileError, match=r"\[blocks\.0\.fc1\]"):
        nearest_kronecker(W_BAD, (4, 5), (5, 3), 1, layer="blocks.0.fc1")


@pytest.mark.parametrize("chunk", [3, 4096])
def test_example_output_error_streams_the_weight(monkeypatch, chunk) -> None:  # type: ignore[no-untyped-def]
    import ndcompile.compress.layer_fits as layer_fits

    monkeypatch.setattr(layer_fits, "ERROR_CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(10, 6, generator=gen)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    estimate = x @ (w.double() + 0.1 * torch.randn(10, 6, generator=gen, dtype=torch.float64)).T
    ref = x @ w.double().T
    expected = float((ref - estimate).norm() / ref.norm())
    assert layer_fits.example_output_error(w, x, estimate) == pytest.approx(expected, rel=1e-12)
    assert layer_fits.example_output_error(w, x, ref) == pytest.approx(0.0, abs=1e-15)
    zero = torch.zeros(10, 6)
    assert layer_fits.example_output_error(zero, x, torch.zeros(5, 10)) == 0.0
    assert layer_fits.example_output_error(zero, x, estimate) == math.inf
