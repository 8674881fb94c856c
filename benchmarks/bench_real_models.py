"""Conversion coverage on Hugging Face models built from small configs (random weights).

For each model and mode: Linear-like layers converted / total, share of Linear-like
parameters converted (weights tied to an embedding excluded), the output error
(exact and zero-init adapter must be ~0), and the wall time of ``convert``.

    python benchmarks/bench_real_models.py [--json benchmarks/results/cpu_real_models.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hf_models import MODELS, build, linear_like_params

import ndcompile

MODES = {"fresh": {}, "factorize": {"rank": 4}, "adapter": {}, "exact": {}}


def measure(name: str, mode: str) -> dict[str, object]:
    """One conversion's figures."""
    model, example = build(name)
    start = time.perf_counter()
    converted = ndcompile.convert(model, example, mode=mode, **MODES[mode])
    seconds = time.perf_counter() - start
    report = converted.report
    own = linear_like_params(model)
    done = sum(own.get(e.name, 0) for e in report.layers if e.status == "converted")
    return {
        "model": name,
        "mode": mode,
        "class": type(converted).__name__,
        "converted": len([e for e in report.layers if e.status == "converted"]),
        "layers": len(report.layers),
        "param_share": done / sum(own.values()),
        "output_rel_error": report.output_rel_error,
        "seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    """Run every model x mode, print a markdown table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(name, mode) for name in MODELS for mode in MODES]
    print("| model | mode | class | layers converted | Linear-like params | output error | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        err = "-" if r["output_rel_error"] is None else f"{r['output_rel_error']:.1e}"
        print(
            f"| {r['model']} | {r['mode']} | {r['class']} | {r['converted']}/{r['layers']} | "
            f"{r['param_share']:.0%} | {err} | {r['seconds']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
