"""Planner check: does the cost model rank the candidates the way the machine does?

For every layer case of ``bench_layers.py`` (and ranks 1 and 4), plans the layer,
then times *every* candidate on the real shapes (eager, forward, median of
interleaved rounds) and reports

* the Spearman rank correlation between estimated and measured times;
* the regret of the cost model's choice: its measured time over the fastest
  candidate's (1.00 = the estimate picked the winner);
* the reference schedule's (modes applied first to last) and the dense block's
  measured times over the fastest, the baselines ``autotune=True`` always times.

The cost model's constants are measured on the machine that runs it
(:func:`ndcompile.planner.machine.machine_model`), so the same script on another
machine checks the same claim there.

Usage::

    python benchmarks/bench_planner.py --threads 2 --json benchmarks/results/cpu_planner.json
    python benchmarks/bench_planner.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ndcompile.ir.network import TensorNetwork
from ndcompile.planner.machine import machine_model
from ndcompile.planner.plan import (
    Candidate,
    is_dense_block,
    plan_ndlinear,
    reference_schedule,
)

from common import (
    format_table,
    machine_info,
    setup_torch,
    write_json,
)
from layer_cases import CASES, DEFAULT_CASES, QUICK_CASES, Case

__all__ = ["check_case", "main", "spearman"]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equal-length sequences (ties get mean ranks)."""

    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def _operands(case: Case, rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ops = [torch.randn(case.batch, *case.in_shape, generator=gen)]
    for d, h in zip(case.in_shape, case.out_shape, strict=True):
        ops.append(torch.randn(*((h, d) if rank == 1 else (rank, h, d)), generator=gen))
    return ops


def _time_all(cands: list[Candidate], ops: list[torch.Tensor], rounds: int) -> list[float]:
    """Median µs per candidate over ``rounds`` interleaved rounds (one call each)."""
    samples: list[list[float]] = [[] for _ in cands]
    with torch.no_grad():
        for _ in range(3):  # warm-up (allocator, caches)
            for cand in cands:
                cand.plan.program.run(*ops)
        for _ in range(rounds):
            for k, cand in enumerate(cands):
                t0 = time.perf_counter()
                cand.plan.program.run(*ops)
                samples[k].append((time.perf_counter() - t0) * 1e6)
    return [statistics.median(s) for s in samples]


def check_case(case: Case, rank: int, rounds: int) -> dict[str, Any]:
    """Time every candidate of one case; the ranking and regret figures."""
    choice = plan_ndlinear(case.in_shape, case.out_shape, rank, batch=case.batch)
    cands = choice.candidates
    measured = _time_all(cands, _operands(case, rank), rounds)
    best = min(measured)
    n = len(case.in_shape)
    tn = TensorNetwork.from_ndlinear(case.in_shape, case.out_shape, rank)
    reference = reference_schedule(tn, n, case.batch).program.instructions

    def over_best(pred: Any) -> float | None:
        hits = [m for c, m in zip(cands, measured, strict=True) if pred(c)]
        return min(hits) / best if hits else None

    return {
        "case": case.name,
        "description": case.describe(),
        "rank": rank,
        "candidates": len(cands),
        "spearman": spearman([c.est_us for c in cands], measured),
        "chosen": choice.chosen.label,
        "fastest": cands[measured.index(best)].label,
        "regret": measured[cands.index(choice.chosen)] / best,
        "reference_over_best": over_best(
            lambda c: not c.chains and c.plan.program.instructions == reference
        ),
        "dense_over_best": over_best(lambda c: is_dense_block(c, n)),
        "best_us": best,
        "estimates_us": [c.est_us for c in cands],
        "measured_us": measured,
        "labels": [c.label for c in cands],
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Check the cost model on every case; print a table; optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all)")
    p.add_argument("--cases", default=None, help=f"comma-separated of {list(CASES)}")
    p.add_argument("--ranks", default="1,4", help="Kronecker ranks (default 1,4)")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds per candidate")
    p.add_argument("--quick", action="store_true", help="small cases, 3 rounds")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    args = p.parse_args(argv)
    threads = setup_torch(args.threads, 0)
    names = args.cases.split(",") if args.cases else (QUICK_CASES if args.quick else DEFAULT_CASES)
    rounds = 3 if args.quick else args.rounds
    machine = machine_model("cpu")
    rows = [
        check_case(CASES[name], int(r), rounds) for name in names for r in args.ranks.split(",")
    ]
    header = ("case", "R", "cands", "spearman", "regret", "ref / best", "dense / best", "chosen")
    print(
        format_table(
            header,
            [
                (
                    f"{r['case']} {r['description']}",
                    r["rank"],
                    r["candidates"],
                    f"{r['spearman']:.2f}",
                    f"{r['regret']:.2f}",
                    _fmt(r["reference_over_best"]),
                    _fmt(r["dense_over_best"]),
                    f"{r['chosen']} (fastest: {r['fastest']})",
                )
                for r in rows
            ],
        )
    )
    result = {
        "meta": {**machine_info(torch.device("cpu"), threads), "machine_model": vars(machine)},
        "cases": rows,
    }
    if args.json is not None:
        print(f"wrote {write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
