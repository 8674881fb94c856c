"""Time and peak memory of factorising one square layer, full SVD vs truncated fit.

Each case runs in its own subprocess (a clean heap and thread pool): it builds an
``n x n`` float32 weight, splits both sides with ``plan_mode_shapes(n, 2)`` and fits
a rank-R Kronecker sum, either

* ``full``: the full float64 SVD of the rearranged matrix (the method used before
  truncated fits; skipped above ``--full-max`` because it takes minutes), or
* ``truncated``: :func:`ndcompile.compress.kronecker.nearest_kronecker`, which takes
  the leading triplets (:mod:`ndcompile.compress.truncated`), or
* ``tol``: :func:`~ndcompile.compress.kronecker.rank_for_tolerance` with ``--tol``.

Peak memory is the growth of the process's resident set during the first fit
(``benchmarks.common.peak_memory_mb``), also given as a multiple of the weight's
bytes; time is the fastest of ``--repeats`` fits (wall clock, and the process's CPU
time, which other load on a shared machine disturbs less). Weights are Gaussian (a flat
spectrum, the slowest case for the iteration) or ``structured`` (a rank-16
Kronecker sum with decaying terms plus 1% noise, closer to trained layers)::

    python benchmarks/bench_convert.py --threads 2 --json benchmarks/results/cpu_convert.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ndcompile.compress.kronecker import nearest_kronecker, rank_for_tolerance
from ndcompile.compress.kronecker_dense import rearrange
from ndcompile.compress.kronecker_shapes import plan_mode_shapes

from common import format_table, machine_info, peak_memory_mb, write_json

__all__ = ["full_svd_fit", "main", "make_weight", "run_case"]

SIZES = (1024, 2048, 4096, 8192)
RANKS = (1, 8, 32)
QUICK_SIZES = (256, 512)
#: Full-SVD figures measured on 2 cores before truncated fits (seconds, peak GB),
#: for the sizes where the benchmark does not rerun it.
MEASURED_FULL_S = {1024: 5.0, 2048: 26.0, 4096: 129.0, 8192: 746.0}


def make_weight(n: int, kind: str, seed: int = 0) -> torch.Tensor:
    """An ``n x n`` float32 weight: ``"gauss"`` or ``"structured"``."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(n, n, generator=gen)
    modes = plan_mode_shapes(n, 2)
    assert modes is not None
    w = torch.randn(n, n, generator=gen).mul_(0.01 / math.sqrt(n))
    for r in range(16):
        scale = 0.8**r
        a = torch.randn(modes[0], modes[0], generator=gen) / modes[0]
        b = torch.randn(modes[1], modes[1], generator=gen) / modes[1]
        w.add_(torch.kron(a, b), alpha=scale)
    return w


def full_svd_fit(w: torch.Tensor, in_shape: tuple, out_shape: tuple, rank: int) -> float:
    """The full-SVD fit (float64 copy, rearrangement, LAPACK SVD); returns its error."""
    w64 = w.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(rearrange(w64, in_shape, out_shape), full_matrices=False)
    root = s[:rank].sqrt()
    f1 = (u[:, :rank] * root).T.reshape(rank, out_shape[0], in_shape[0])
    f2 = (vh[:rank] * root[:, None]).reshape(rank, out_shape[1], in_shape[1])
    del f1, f2
    return float(torch.linalg.vector_norm(s[rank:]) / torch.linalg.vector_norm(s))


def run_case(n: int, rank: int, method: str, kind: str, repeats: int, tol: float) -> dict:
    """One case in this process: peak memory of the first fit, best time of all."""
    modes = plan_mode_shapes(n, 2)
    assert modes is not None
    w = make_weight(n, kind)
    nearest_kronecker(torch.randn(256, 256), (16, 16), (16, 16), 2)  # load LAPACK, threads
    result: dict[str, Any] = {}

    def fit() -> None:
        if method == "full":
            result.update(rank=rank, rel_error=full_svd_fit(w, modes, modes, rank))
            return
        if method == "tol":
            got = rank_for_tolerance(w, modes, modes, tol, max_rank=4 * rank)
        else:
            got = nearest_kronecker(w, modes, modes, rank)
        result.update(rank=got.rank, rel_error=got.rel_error, fit_method=got.method)

    times, cpu = [], []
    start, start_cpu = time.perf_counter(), time.process_time()
    peak_mb, how = peak_memory_mb(fit, torch.device("cpu"))
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
    for _ in range(repeats - 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        fit()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    weight_mb = w.numel() * w.element_size() / 2**20
    return {
        "size": n,
        "modes": list(modes),
        "requested_rank": rank,
        "method": method,
        "weights": kind,
        "seconds": min(times),
        "seconds_all": times,
        "cpu_seconds": min(cpu),
        "peak_mb": peak_mb,
        "peak_method": how,
        "weight_mb": weight_mb,
        "peak_over_weight": peak_mb / weight_mb,
        **result,
    }


def _spawn(args: argparse.Namespace, n: int, rank: int, method: str, kind: str) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        f"{n},{rank},{method},{kind}",
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats if method != "full" else 1),
        "--tol",
        str(args.tol),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"case {n} rank {rank} {method} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cases(args: argparse.Namespace) -> list[tuple[int, int, str, str]]:
    sizes = QUICK_SIZES if args.quick else SIZES
    cases = []
    for n in sizes:
        if n <= args.full_max:
            cases.append((n, 8, "full", "gauss"))
        for rank in RANKS:
            cases.append((n, rank, "truncated", "gauss"))
    if not args.quick:
        cases += [(4096, 4, "truncated", "gauss"), (8192, 8, "truncated", "structured")]
        cases += [(4096, 8, "tol", "structured"), (8192, 8, "tol", "structured")]
    return cases


def main(argv: list[str] | None = None) -> int:
    """Run every case in a subprocess, print a Markdown table and write JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="fits per case (best time kept)")
    p.add_argument("--full-max", type=int, default=2048, help="largest size for the full SVD")
    p.add_argument("--tol", type=float, default=0.05, help="tolerance of the tol cases")
    p.add_argument("--quick", action="store_true", help="sizes 256 and 512 only")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        n, rank, method, kind = args.worker.split(",")
        rec = run_case(int(n), int(rank), method, kind, args.repeats, args.tol)
        print(json.dumps(rec))
        return 0
    records = []
    for case in _cases(args):
        rec = _spawn(args, *case)
        records.append(rec)
        print(
            f"{rec['size']}² {rec['method']} {rec['weights']} rank {rec['rank']}: "
            f"{rec['seconds']:.2f} s, peak +{rec['peak_mb']:.0f} MB",
            flush=True,
        )
    rows = []
    for rec in records:
        full = next(
            (r for r in records if r["size"] == rec["size"] and r["method"] == "full"), None
        )
        before = f"{full['seconds']:.2f}" if full else f"({MEASURED_FULL_S.get(rec['size'], '-')})"
        rows.append(
            [
                f"{rec['size']}² {tuple(rec['modes'])}",
                rec["method"],
                rec["weights"],
                rec["rank"],
                f"{rec['seconds']:.2f}",
                f"{rec['cpu_seconds']:.2f}",
                f"{rec['peak_mb']:.0f}",
                f"{rec['peak_over_weight']:.2f}",
                f"{rec['rel_error']:.6f}",
                before if rec["method"] != "full" else "",
            ]
        )
    header = [
        "layer (modes)",
        "method",
        "weights",
        "rank",
        "seconds",
        "CPU s",
        "peak MB",
        "peak / weight",
        "rel error",
        "full SVD s",
    ]
    print()
    print(format_table(header, rows))
    print("\nfull SVD s in parentheses: measured before, not rerun (above --full-max).")
    if args.json:
        info = machine_info(torch.device("cpu"), args.threads)
        out = write_json(args.json, {"machine": info, "cases": records, "tol": args.tol})
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
