"""NdLinear layers in onnxruntime (CPU) vs PyTorch eager vs inductor, ratios in one run.

Each case's ndcompile layer (imported from the reference ``ndlinear.NdLinear`` with
the same weights as ``bench_layers.py``) is exported with ``ndcompile.export_onnx``
(verified against PyTorch in onnxruntime), then timed forward-only:

    python benchmarks/bench_onnx.py --threads 2 --json benchmarks/results/cpu_onnx.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ndcompile.backends.onnx import export_onnx, time_onnxruntime
from ndcompile.layers.ndlinear import NdLinear

from common import (
    format_table,
    machine_info,
    setup_torch,
    time_call,
    write_json,
)
from layer_cases import CASES, reference_layer, select_cases

__all__ = ["bench_onnx_case", "main"]


def bench_onnx_case(case: Any, threads: int, *, budget_s: float, iters: int) -> dict[str, Any]:
    """Median forward ms of the ndcompile layer: eager, inductor, onnxruntime."""
    device = torch.device("cpu")
    torch._dynamo.reset()
    layer = NdLinear.from_reference(reference_layer(case))
    layer.replan(plan_batch=case.batch)
    layer.eval()
    x = torch.randn(case.batch, *case.in_shape)
    compiled = torch.compile(layer, backend="inductor", dynamic=False)

    def eager() -> None:
        with torch.no_grad():
            layer(x)

    def inductor() -> None:
        with torch.no_grad():
            compiled(x)

    times = {
        "eager": time_call(eager, device, budget_s=budget_s).median_ms,
        "inductor": time_call(inductor, device, budget_s=budget_s).median_ms,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{case.name}.onnx"
        report = export_onnx(layer, x, path)
        times["onnxruntime"] = time_onnxruntime(path, x, iters=iters, threads=threads)
    return {
        "name": case.name,
        "description": case.describe(),
        "fwd_ms": times,
        "onnx_max_abs_error": report.max_abs_error,
        "onnx_ops": dict(report.ops) if hasattr(report, "ops") else None,
        "ratios_vs_eager": {k: times["eager"] / v for k, v in times.items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the cases, print a table, optionally write JSON; returns the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default=None, help=f"names or globs of {sorted(CASES)}")
    parser.add_argument("--quick", action="store_true", help="small cases, few iterations")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    threads = setup_torch(args.threads, args.seed)
    budget, iters = (0.2, 10) if args.quick else (2.0, 100)
    cases = select_cases(args.cases, args.quick)
    records = [bench_onnx_case(c, threads, budget_s=budget, iters=iters) for c in cases]
    rows = [
        (
            r["name"],
            f"{r['fwd_ms']['eager']:.3f}",
            f"{r['fwd_ms']['inductor']:.3f} ({r['ratios_vs_eager']['inductor']:.2f}x)",
            f"{r['fwd_ms']['onnxruntime']:.3f} ({r['ratios_vs_eager']['onnxruntime']:.2f}x)",
            f"{r['onnx_max_abs_error']:.1e}",
        )
        for r in records
    ]
    header = ("case", "eager ms", "inductor ms", "onnxruntime ms", "ORT max err")
    print(f"# ndcompile layers in onnxruntime, {threads} threads")
    print(format_table(header, rows))
    result = {"meta": machine_info(torch.device("cpu"), threads), "cases": records}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
