"""Whole-model benchmark on Hugging Face architectures: dense vs NdLinear variants.

Two models with random weights, built from configs (no downloads), dropout 0, eval mode:

* ``bert``: a BERT-base-like encoder, ``transformers.BertModel`` without the pooler
  (hidden 768, intermediate 3072, 12 heads, vocab 1024, ``--layers`` layers, default 2),
  batch 8, sequence 128. Timed output: ``last_hidden_state``.
* ``llama``: a Llama-like decoder, ``transformers.LlamaForCausalLM`` (hidden 768,
  intermediate 2048, 12 query / 4 key-value heads, vocab 1024, untied ``lm_head``,
  ``use_cache=False``, default 2 layers), batch 4 (half of BERT's: its untied
  ``lm_head`` and gated MLP make a token dearer), sequence 128: one dense training
  step takes 0.35 s (1 thread) to 1-1.6 s (2 threads on a loaded machine) on a
  2-core Xeon. Timed output: ``logits``.

Variants of each: ``dense``; ``fresh r1`` and ``fresh r4``
(``ndcompile.convert(model, {"input_ids": ids}, mode="fresh", rank=R)``, new random
NdLinear layers); ``factorize r4`` (``mode="factorize", rank=4``: nearest rank-4
Kronecker sum of the dense weights; 10-25 s of conversion per model on 2 cores). Every
Linear layer the converter takes by default is converted; the table gives how many
and their share of the model's ``nn.Linear`` parameters.

Per variant: parameters, whole-model forward FLOPs (``torch.utils.flop_counter``),
forward latency (``torch.no_grad``) and training-step latency -- forward and backward
of ``output.square().mean()`` with fresh gradients every step, no optimizer -- eager
and under ``torch.compile`` (inductor, default mode, ``dynamic=False``); peak memory
of one forward and one training step (growth of the peak RSS on CPU, each phase
after a warm-up call and with the heap trimmed first, as ``bench_models.py`` does;
``max_memory_allocated`` on CUDA) and the peak of live tensors (``live train MB``:
what the tensors need, whatever the allocator keeps); the relative output error against dense
(``factorize`` only: ``fresh`` layers are new random weights); and speedups vs dense.
The variants of a model are timed together, interleaved phase by phase
(``timing.time_interleaved``), so load from other processes hits them alike. A
variant ``torch.compile`` fails on keeps its eager numbers and records the error.

With ``--threads`` above the cores that are actually idle, eager latencies are
dominated by the synchronisation of every small elementwise op across threads
(seen here: 2 threads on 2 busy cores made a ``(4, 128, 768)`` multiply 40x
slower than 1 thread); compare with a ``--threads 1`` run before reading speedups.

Usage::

    python benchmarks/bench_hf_models.py --threads 2 --json benchmarks/results/cpu_hf_models.json
    python benchmarks/bench_hf_models.py --quick           # tiny sizes, no compile
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench_models import static_measures, time_models
from common import (
    add_machine_options,
    machine_info,
    pick_device,
    setup_torch,
    write_json,
)
from hf_conversion import (
    VARIANTS,
    convert_variants,
    output_errors,
)
from hf_model_specs import (
    MODELS,
    HFModelSpec,
    Sizes,
    TensorOutput,
)
from hf_tables import compile_errors, results_table
from hf_timing import speedups, time_compiled

__all__ = [
    "MODELS",
    "VARIANTS",
    "HFModelSpec",
    "Sizes",
    "TensorOutput",
    "bench_hf_model",
    "convert_variants",
    "main",
    "parse_args",
    "results_table",
    "speedups",
    "time_compiled",
]


def bench_hf_model(
    spec: HFModelSpec,
    sizes: Sizes,
    device: torch.device,
    *,
    variants: Sequence[str],
    compile_: bool,
    time_kw: Mapping[str, Any],
    seed: int = 0,
) -> dict[str, Any]:
    """Build one model, convert it into every variant and measure them side by side.

    Args:
        spec: The model.
        sizes: Its sizes (batch and sequence included).
        device: Where to run.
        variants: Variant names (``"dense"`` is added first when missing).
        compile_: Also time under ``torch.compile``.
        time_kw: Keyword arguments of ``common.time_interleaved``.
        seed: Seed of the weights, the input and the fresh layers.

    Returns:
        The model's record: sizes, per-variant measures and ratios vs dense.
    """
    names = ["dense", *(v for v in variants if v != "dense")]
    torch.manual_seed(seed)
    dense = spec.build(sizes).to(device).eval()
    ids = torch.randint(0, sizes.vocab, (sizes.batch, sizes.seq), device=device)
    models, info = convert_variants(dense, ids, names, seed)
    wrapped: dict[str, nn.Module] = {n: TensorOutput(m, spec.output) for n, m in models.items()}
    sides = {n: {**info[n], **static_measures(w, ids, device)} for n, w in wrapped.items()}
    for name, err in output_errors(wrapped, ids).items():
        sides[name]["output_rel_error"] = err
    timings = [time_models(wrapped, ids, device, compile_=False, time_kw=dict(time_kw))]
    if compile_:
        timings.append(time_compiled(wrapped, ids, device, time_kw))
    for timing in timings:
        for name, measures in timing.items():
            sides[name].update(measures)
    return {
        "name": spec.name,
        "description": spec.describe(sizes),
        "class": type(dense).__name__,
        "sizes": asdict(sizes),
        "input_shape": list(ids.shape),
        "output": spec.output,
        "variants": sides,
        "ratios": speedups(sides),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated of {list(MODELS)}")
    p.add_argument(
        "--variants",
        default=",".join(v.replace(" ", "_") for v in VARIANTS),
        help="comma-separated of dense,fresh_r1,fresh_r4,factorize_r4 (dense always runs)",
    )
    add_machine_options(p)
    p.add_argument("--layers", type=int, default=None, help="transformer layers (default 2)")
    p.add_argument("--batch", type=int, default=None, help="batch (default: bert 8, llama 4)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 128)")
    p.add_argument("--quick", action="store_true", help="tiny models and iteration counts")
    p.add_argument("--compile", action="store_true", help="with --quick: keep torch.compile")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--budget", type=float, default=None, help="seconds per measurement")
    p.add_argument("--min-iters", type=int, default=None, help="fewest timed rounds")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    return p.parse_args(argv)


def _names(text: str, known: Sequence[str], flag: str) -> list[str]:
    names = [n.strip().replace("_", " ") for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        choices = ", ".join(k.replace(" ", "_") for k in known)
        raise SystemExit(f"{flag}: unknown {unknown}; choose from: {choices}")
    return names


def _sizes(spec: HFModelSpec, args: argparse.Namespace) -> Sizes:
    base = spec.quick if args.quick else spec.full
    overrides = {k: getattr(args, k) for k in ("layers", "batch", "seq")}
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _time_kw(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "warmup": 2,
        "budget_s": args.budget if args.budget is not None else (0.01 if quick else 1.0),
        "min_iters": args.min_iters or (2 if quick else 5),
        "max_iters": 4 if quick else 100,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table; returns the JSON-able results."""
    args = parse_args(argv)
    models = _names(args.models, list(MODELS), "--models")
    variants = _names(args.variants, list(VARIANTS), "--variants")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    device = pick_device(args.device)
    threads = setup_torch(args.threads, args.seed)
    compile_ = not args.no_compile and (args.compile or not args.quick)
    start = time.perf_counter()
    meta = {
        **machine_info(device, threads),
        "compile": compile_,
        "quick": args.quick,
        "timing": _time_kw(args),
        "train_step": "forward + backward of output.square().mean(); grads reset, no optimizer",
    }
    print(f"# ndcompile HF model benchmark: {meta['cpu']}, {threads} threads, device {device}")
    records = []
    for name in models:
        spec = MODELS[name]
        sizes = _sizes(spec, args)
        print(f"\n## {spec.describe(sizes)}", flush=True)
        records.append(
            bench_hf_model(
                spec,
                sizes,
                device,
                variants=variants,
                compile_=compile_,
                time_kw=meta["timing"],
                seed=args.seed,
            )
        )
    meta["elapsed_s"] = round(time.perf_counter() - start, 1)
    print()
    print(results_table(records))
    for line in compile_errors(records):
        print(f"compile error: {line}")
    print(f"\ntotal {meta['elapsed_s']} s")
    result = {"meta": meta, "models": records}
    if args.json is not None:
        print(f"wrote {write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
