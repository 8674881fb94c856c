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
(``common.time_interleaved``), so load from other processes hits them alike. A
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

try:
    from benchmarks.bench_models import _phases, _rel_err, static_measures, time_models
    from benchmarks.common import (
        Timing,
        format_table,
        machine_info,
        pick_device,
        setup_torch,
        time_interleaved,
        write_json,
    )
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from bench_models import (  # type: ignore[no-redef]
        _phases,
        _rel_err,
        static_measures,
        time_models,
    )
    from common import (  # type: ignore[no-redef]
        Timing,
        format_table,
        machine_info,
        pick_device,
        setup_torch,
        time_interleaved,
        write_json,
    )

import ndcompile
from ndcompile.report import ConversionReport, format_count, report_of

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

#: Conversion keyword arguments per variant (``None``: the dense model itself).
VARIANTS: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "fresh r1": {"mode": "fresh", "rank": 1},
    "fresh r4": {"mode": "fresh", "rank": 4},
    "factorize r4": {"mode": "factorize", "rank": 4},
}

#: Timed phases: (record key prefix, ``_phases`` index, compiled).
PHASES = (
    ("eager_fwd", 0, False),
    ("eager_train", 1, False),
    ("compiled_fwd", 0, True),
    ("compiled_train", 1, True),
)


@dataclass(frozen=True)
class Sizes:
    """Transformer sizes of one benchmark model.

    Attributes:
        hidden: Hidden size.
        intermediate: MLP hidden size.
        heads: Attention (query) heads.
        kv_heads: Key-value heads (decoders; encoders use ``heads``).
        layers: Transformer layers.
        vocab: Vocabulary size (small, so embeddings do not dominate the parameters).
        batch: Sequences per batch.
        seq: Tokens per sequence.
    """

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    batch: int
    seq: int


def _bert(s: Sizes) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_attention_heads=s.heads,
        num_hidden_layers=s.layers,
        vocab_size=s.vocab,
        max_position_embeddings=max(512, s.seq),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config, add_pooling_layer=False)


def _llama(s: Sizes) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        num_hidden_layers=s.layers,
        vocab_size=s.vocab,
        max_position_embeddings=max(512, s.seq),
        attention_dropout=0.0,
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


@dataclass(frozen=True)
class HFModelSpec:
    """A benchmark model: its builder, the output field timed, full and quick sizes."""

    name: str
    build: Callable[[Sizes], nn.Module]
    output: str
    full: Sizes
    quick: Sizes

    def describe(self, s: Sizes) -> str:
        """One line of the model's sizes."""
        heads = f"{s.heads} heads" if s.kv_heads == s.heads else f"{s.heads}/{s.kv_heads} heads"
        return (
            f"{self.name}: {s.layers} layers, hidden {s.hidden}, intermediate {s.intermediate}, "
            f"{heads}, vocab {s.vocab}, batch {s.batch} x seq {s.seq}, output {self.output}"
        )


MODELS: dict[str, HFModelSpec] = {
    "bert": HFModelSpec(
        "bert",
        _bert,
        "last_hidden_state",
        full=Sizes(768, 3072, 12, 12, layers=2, vocab=1024, batch=8, seq=128),
        quick=Sizes(64, 128, 2, 2, layers=1, vocab=96, batch=2, seq=16),
    ),
    "llama": HFModelSpec(
        "llama",
        _llama,
        "logits",
        full=Sizes(768, 2048, 12, 4, layers=2, vocab=1024, batch=4, seq=128),
        quick=Sizes(64, 128, 4, 2, layers=1, vocab=96, batch=2, seq=16),
    ),
}


class TensorOutput(nn.Module):
    """A Hugging Face model called on ``input_ids``, returning one tensor of its output.

    This gives the models the ``model(x) -> Tensor`` form that ``bench_models``'
    helpers (FLOPs, phases, memory, timing) expect.
    """

    def __init__(self, model: nn.Module, field: str) -> None:
        super().__init__()
        self.model = model
        self.field = field

    def forward(self, input_ids: Tensor) -> Tensor:
        return getattr(self.model(input_ids=input_ids), self.field)


def _linear_params(model: nn.Module) -> dict[str, int]:
    """Parameters (weight and bias) of every ``nn.Linear`` of ``model``, by name."""
    return {
        name: sum(p.numel() for p in m.parameters(recurse=False))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }


def _conversion_summary(
    dense: nn.Module, report: ConversionReport, seconds: float
) -> dict[str, Any]:
    """Layers converted, their share of the Linear parameters, and the report."""
    linear = _linear_params(dense)
    done = sum(linear.get(e.name, e.params_before) for e in report.converted)
    return {
        "convert_s": seconds,
        "layers_converted": len(report.converted),
        "layers_found": len(report.layers),
        "linear_layers": len(linear),
        "linear_param_share": done / max(sum(linear.values()), 1),
        "report_output_rel_error": report.output_rel_error,
        "report": report.to_dict(),
    }


def convert_variants(
    dense: nn.Module, ids: Tensor, names: Sequence[str], seed: int
) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """The model of every variant, and what each conversion did.

    Args:
        dense: The dense model.
        ids: Example ``input_ids`` (the benchmark's input).
        names: Variants (keys of :data:`VARIANTS`).
        seed: Seed set before every conversion (fresh layers are random).

    Returns:
        ``(models, summaries)`` by variant name.
    """
    models: dict[str, nn.Module] = {}
    info: dict[str, dict[str, Any]] = {}
    for name in names:
        kwargs = VARIANTS[name]
        if kwargs is None:
            models[name], info[name] = dense, {}
            continue
        torch.manual_seed(seed)
        start = time.perf_counter()
        models[name] = ndcompile.convert(dense, {"input_ids": ids}, **kwargs).eval()
        seconds = time.perf_counter() - start
        info[name] = _conversion_summary(dense, report_of(models[name]), seconds)
        print(f"  {name}: {_conversion_line(info[name])}", flush=True)
    return models, info


def _conversion_line(info: Mapping[str, Any]) -> str:
    report = info["report"]
    return (
        f"{info['layers_converted']}/{info['linear_layers']} Linear layers converted "
        f"({info['linear_param_share']:.0%} of Linear params), params "
        f"{report['params_before']:,} -> {report['params_after']:,}, "
        f"convert {info['convert_s']:.1f} s"
    )


def _error_text(exc: BaseException, limit: int = 2000) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _store(side: dict[str, Any], label: str, t: Timing) -> None:
    side[f"{label}_ms"] = t.median_ms
    side[f"{label}_iqr_ms"] = t.iqr_ms
    side[f"{label}_min_ms"] = t.min_ms


def _recompile_room(n_models: int) -> Any:
    """A dynamo config patch with room for every variant's forward and training graph.

    The recompile limit counts graphs per code object, and every variant runs the
    same ``forward`` code (default limit 8: exactly four variants).
    """
    config = torch._dynamo.config
    key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch({key: max(getattr(config, key), 4 * n_models + 8)})


def _compile_all(
    models: Mapping[str, nn.Module], x: Tensor, out: dict[str, dict[str, Any]]
) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """Compile every model (first call: forward); failures go to ``out[name]["compile_error"]``."""
    runs = {}
    for name, model in models.items():
        try:
            compiled = torch.compile(model, backend="inductor", dynamic=False)
            with torch.no_grad():
                ref, start = model(x), time.perf_counter()
                got = compiled(x)
                out[name]["compile_fwd_s"] = time.perf_counter() - start
                out[name]["compiled_rel_err"] = _rel_err(ref, got)
        except Exception as exc:  # a compile failure is a result, not a crash
            out[name]["compile_error"] = f"compiled_fwd: {_error_text(exc)}"
            continue
        runs[name] = _phases(compiled, x)  # type: ignore[arg-type]
    return runs


def _time_phase(
    fns: Mapping[str, Callable[[], None]],
    label: str,
    out: dict[str, dict[str, Any]],
    device: torch.device,
    time_kw: Mapping[str, Any],
) -> None:
    def on_error(name: str, exc: BaseException) -> None:
        out[name]["compile_error"] = f"{label}: {_error_text(exc)}"

    for name, t in time_interleaved(fns, device, on_error=on_error, **time_kw).items():
        _store(out[name], label, t)


def time_compiled(
    models: Mapping[str, nn.Module],
    x: Tensor,
    device: torch.device,
    time_kw: Mapping[str, Any],
) -> dict[str, dict[str, Any]]:
    """Compiled forward and training-step latencies, interleaved across the models.

    Like ``bench_models.time_models`` with ``compile_=True``, except that a model
    ``torch.compile`` fails on (while compiling or running either phase) is dropped
    from the later phases and its error text stored as ``compile_error``.

    Args:
        models: Models by variant name (``model(x) -> Tensor``).
        x: Their input.
        device: Device to synchronise on.
        time_kw: Keyword arguments of ``common.time_interleaved``.

    Returns:
        Per model: ``compiled_{fwd,train}_{ms,iqr_ms,min_ms}``, ``compiled_rel_err``
        (compiled vs eager output), ``compile_fwd_s`` (the first, compiling, forward
        call) and, on failure, ``compile_error``.
    """
    torch._dynamo.reset()
    out: dict[str, dict[str, Any]] = {name: {} for name in models}
    with _recompile_room(len(models)):
        runs = _compile_all(models, x, out)
        for label, index, compiled in PHASES:
            if compiled:
                fns = {n: r[index] for n, r in runs.items() if "compile_error" not in out[n]}
                _time_phase(fns, label, out, device, time_kw)
    return out


def speedups(sides: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Dense over variant: parameters and the latency of every phase (None where missing)."""
    dense = sides["dense"]
    ratios: dict[str, dict[str, float | None]] = {}
    for name, side in sides.items():
        r: dict[str, float | None] = {"params": dense["params"] / side["params"]}
        for label, _, _ in PHASES:
            for key in (f"{label}_ms", f"{label}_min_ms"):
                a, b = dense.get(key), side.get(key)
                r[key] = a / b if a and b else None
        ratios[name] = r
    return ratios


def _output_errors(models: Mapping[str, nn.Module], x: Tensor) -> dict[str, float | None]:
    """Relative output error vs dense of the variants that approximate it (not ``fresh``)."""
    with torch.no_grad():
        ref = models["dense"](x)
        return {
            name: None
            if name == "dense" or (VARIANTS[name] or {}).get("mode") == "fresh"
            else _rel_err(ref, model(x))
            for name, model in models.items()
        }


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
    for name, err in _output_errors(wrapped, ids).items():
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


def _num(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _ms_cell(side: Mapping[str, Any], label: str) -> str:
    ms = side.get(f"{label}_ms")
    if ms is None:
        return "error" if label.startswith("compiled") and "compile_error" in side else "-"
    return f"{_num(ms)} ±{_num(side[f'{label}_iqr_ms'] / 2)}"


def _ratio_cell(ratios: Mapping[str, float | None], phase: str) -> str:
    cells = [ratios.get(f"{kind}_{phase}_ms") for kind in ("eager", "compiled")]
    return " / ".join("-" if r is None else f"{r:.2f}x" for r in cells)


def _row(model: str, variant: str, side: Mapping[str, Any], ratios: Mapping[str, Any]) -> list:
    converted = "layers_converted" in side
    layers = f"{side['layers_converted']}/{side['linear_layers']}" if converted else "-"
    share = f"{side['linear_param_share']:.0%}" if converted else "-"
    err = side.get("output_rel_error")
    return [
        model,
        variant,
        layers,
        share,
        format_count(side["params"]),
        f"{ratios['params']:.2f}x",
        format_count(side["flops"]),
        _ms_cell(side, "eager_fwd"),
        _ms_cell(side, "compiled_fwd"),
        _ms_cell(side, "eager_train"),
        _ms_cell(side, "compiled_train"),
        _ratio_cell(ratios, "fwd"),
        _ratio_cell(ratios, "train"),
        f"{side['peak_train_mb']:.1f}",
        f"{side['live_train_mb']:.1f}",
        "-" if err is None else f"{err:.2e}",
    ]


HEADER = (
    "model",
    "variant",
    "layers conv.",
    "Linear params conv.",
    "params",
    "params dense/var",
    "fwd FLOPs",
    "fwd ms eager",
    "fwd ms inductor",
    "train ms eager",
    "train ms inductor",
    "fwd speedup eager / inductor",
    "train speedup eager / inductor",
    "peak train MB (RSS)",
    "live train MB",
    "out err vs dense",
)


def results_table(records: Sequence[Mapping[str, Any]]) -> str:
    """All models and variants in one Markdown table (latency: median ± IQR/2, ms).

    Speedups are dense latency over variant latency (medians), eager and inductor.
    """
    rows = [
        _row(rec["name"], name, side, rec["ratios"][name])
        for rec in records
        for name, side in rec["variants"].items()
    ]
    return format_table(HEADER, rows)


def _compile_errors(records: Sequence[Mapping[str, Any]]) -> list[str]:
    return [
        f"{rec['name']} / {name}: {side['compile_error'][:300]}"
        for rec in records
        for name, side in rec["variants"].items()
        if "compile_error" in side
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated of {list(MODELS)}")
    p.add_argument(
        "--variants",
        default=",".join(v.replace(" ", "_") for v in VARIANTS),
        help="comma-separated of dense,fresh_r1,fresh_r4,factorize_r4 (dense always runs)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all)")
    p.add_argument("--seed", type=int, default=0)
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
    for line in _compile_errors(records):
        print(f"compile error: {line}")
    print(f"\ntotal {meta['elapsed_s']} s")
    result = {"meta": meta, "models": records}
    if args.json is not None:
        print(f"wrote {write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
