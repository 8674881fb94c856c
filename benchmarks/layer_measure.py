"""Measuring one layer case: every variant timed side by side, ratios, profiler tables.

:func:`bench_case` times the forward pass and a forward+backward step of every
variant, interleaved so that load from other processes hits them alike, and puts
FLOPs, achieved GFLOP/s, the share of the roofline and the error against the
reference into the case's JSON record; :func:`ratios` turns it into speedups.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from layer_cases import Case, reference_flops
from layer_variants import (
    VARIANTS,
    build_variants,
    first_line,
    phase_callables,
)
from timing import time_interleaved, timing_fields

__all__ = ["PHASES", "bench_case", "profile_case", "ratios"]

PHASES = ("fwd", "fwdbwd", "fwd_min", "fwdbwd_min")


def _rel_err(ref: Tensor, out: Tensor) -> float:
    ref64, out64 = ref.double(), out.reshape(ref.shape).double()
    return float((ref64 - out64).norm() / ref64.norm().clamp_min(1e-30))


def bench_case(
    case: Case,
    device: torch.device,
    roofline: float,
    *,
    bandwidth: float = 0.0,
    compile_: bool,
    warmup: int,
    budget_s: float,
    min_iters: int,
    max_iters: int,
    max_dense_params: float,
    autotune: bool | str = False,
) -> dict[str, Any]:
    """Run every variant of one case; returns its JSON record."""
    torch._dynamo.reset()
    mods, skipped, nd = build_variants(
        case, device, compile_=compile_, max_dense_params=max_dense_params, autotune=autotune
    )
    plan_flops = int(nd.plan().flops)
    ref_flops = reference_flops(case)
    dense_flops = 2 * case.batch * nd.in_features * nd.out_features
    x = torch.randn(case.batch, *case.in_shape, device=device)
    record: dict[str, Any] = {
        "name": case.name,
        "description": case.describe(),
        "note": case.note,
        "in_shape": list(case.in_shape),
        "out_shape": list(case.out_shape),
        "batch": case.batch,
        "plan_flops": plan_flops,
        "reference_flops": ref_flops,
        "naive_flops": int(nd.plan().naive_flops),
        "dense_flops": dense_flops,
        "plan": (choice := nd.plan_choice()) and choice.chosen.label,
        "plan_ops": {op: nd.plan().program.count(op) for op in ("matmul", "permute", "reshape")},
        "tile": nd.tile if case.batch > 2 * nd.tile else 0,
        "variants": {},
    }
    # The roofline time: the larger of the planned FLOPs at the matmul roof and the
    # compulsory traffic (input, factors and output, each moved once) at the copy roof.
    traffic = 4 * (case.batch * (nd.in_features + nd.out_features) + nd.num_parameters())
    flop_ms = plan_flops / (roofline * 1e9) * 1e3 if roofline > 0 else 0.0
    traffic_ms = traffic / (bandwidth * 1e9) * 1e3 if bandwidth > 0 else 0.0
    record["roofline_ms"] = {"flops": flop_ms, "traffic": traffic_ms, "bytes": traffic}
    with torch.no_grad():
        reference_out = mods["ref_eager"](x)
    failed: dict[str, str] = {}

    def fail(name: str, exc: BaseException) -> None:
        variant = name.split(":")[0]
        if variant in ("ref_eager", "nd_eager", "dense"):
            raise exc
        failed.setdefault(variant, f"failed: {first_line(exc)}")

    fwd_fns: dict[str, Callable[[], None]] = {}
    step_fns: dict[str, Callable[[], None]] = {}
    outputs: dict[str, Tensor] = {}
    for name in VARIANTS:
        if name not in mods:
            continue
        try:
            fwd_fns[name], step_fns[name], outputs[name] = phase_callables(mods[name], x)
        except Exception as exc:  # a broken optional variant must not stop the run
            fail(name, exc)
    kw: dict[str, Any] = {
        "warmup": warmup,
        "budget_s": budget_s,
        "min_iters": min_iters,
        "max_iters": max_iters,
        "on_error": fail,
    }
    fwd_t = time_interleaved(fwd_fns, device, **kw)
    step_t = time_interleaved({n: f for n, f in step_fns.items() if n in fwd_t}, device, **kw)
    for name in VARIANTS:
        if name in skipped or name in failed:
            record["variants"][name] = {"skipped": skipped.get(name) or failed[name]}
            continue
        if name not in step_t:
            continue
        fwd, fwdbwd = fwd_t[name], step_t[name]
        flops = {"dense": dense_flops, "ref_eager": ref_flops, "ref_inductor": ref_flops}.get(
            name, plan_flops
        )
        gflops = flops / (fwd.median_ms * 1e-3) / 1e9
        record["variants"][name] = {
            **timing_fields("fwd", fwd),
            "fwd_samples": fwd.samples,
            **timing_fields("fwdbwd", fwdbwd),
            "fwdbwd_samples": fwdbwd.samples,
            "flops": flops,
            "gflops": gflops,
            "fwdbwd_gflops": 3 * flops / (fwdbwd.median_ms * 1e-3) / 1e9,
            # Share of the roofline: the roofline time over the measured time (for
            # dense and the reference, their own FLOPs at the matmul roof).
            "roofline_frac": (
                max(flops / (roofline * 1e9) * 1e3, traffic_ms) / fwd.median_ms
                if roofline > 0
                else None
            ),
            # tltorch has its own (CP) weights: its output is not comparable.
            "rel_err_vs_ref": (
                None if name == "tltorch" else _rel_err(reference_out, outputs[name])
            ),
        }
    record["ratios"] = ratios(record)
    return record


def ratios(record: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Speedups (``baseline_time / variant_time``) vs ``ref_eager``, ``ref_inductor``, ``dense``.

    Keys are ``{phase}_vs_{baseline}`` for the phases of :data:`PHASES` (median
    forward, median forward+backward, and the same from the fastest sample).
    """
    ran = {n: v for n, v in record["variants"].items() if "fwd_ms" in v}
    out: dict[str, dict[str, float | None]] = {}
    for name, v in ran.items():
        entry: dict[str, float | None] = {}
        for base in ("ref_eager", "ref_inductor", "dense"):
            for phase in PHASES:
                b, key = ran.get(base), f"{phase}_ms"
                ok = b is not None and key in b and v.get(key)
                entry[f"{phase}_vs_{base}"] = b[key] / v[key] if ok else None
        out[name] = entry
    return out


def profile_case(case: Case, device: torch.device, *, compile_: bool) -> str:
    """torch.profiler op tables of the ndcompile and reference forward passes."""
    from torch.profiler import ProfilerActivity, profile

    mods, _, nd = build_variants(case, device, compile_=compile_, max_dense_params=0)
    x = torch.randn(case.batch, *case.in_shape, device=device)
    parts = [f"plan of {case.name}:\n{nd.plan()}\n{nd.plan().program}"]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in ("ref_eager", "nd_eager", "ref_inductor", "nd_inductor"):
        if name not in mods:
            continue
        with torch.no_grad():
            for _ in range(5):
                mods[name](x)
            with profile(activities=activities) as prof:
                for _ in range(20):
                    mods[name](x)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        parts.append(f"--- {name} (20 forward calls) ---\n{table}")
    return "\n".join(parts)
