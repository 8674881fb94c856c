"""Model benchmark: whole models before and after ``ndcompile.convert``.

Two models, each converted with ``mode="fresh"`` (newly initialised NdLinear
layers, the paper's train-from-scratch use):

* ``image_mlp``: the quickstart classifier (``examples/quickstart.py``); its first
  Linear sees a flattened ``(B, 32, 32, 3)`` image, so its modes are ``(32, 32, 3)``.
* ``encoder``: a small pre-norm transformer encoder (own block: attention with
  ``scaled_dot_product_attention`` + GELU MLP), 4 layers, d=256, MLP 1024, T=64.

For the original and the converted model it reports parameters, FLOPs (the
conversion report's Linear FLOPs and a whole-model count from
``torch.utils.flop_counter``), forward and training-step latency eager and under
``torch.compile`` (inductor), and peak memory of one forward / one training step
(``torch.cuda.max_memory_allocated`` on GPU, growth of the peak RSS on CPU), and
the peak of live tensors (:func:`ndcompile.layers.memory.peak_live_bytes`), which
does not depend on the allocator.

Usage::

    python benchmarks/bench_models.py --threads 2 --json benchmarks/results/cpu_models.json
    python benchmarks/bench_models.py --quick          # CI smoke: small sizes, no compile
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import ndcompile
from ndcompile.layers.memory import peak_live_bytes

from common import (
    add_machine_options,
    format_table,
    machine_info,
    peak_memory_mb,
    pick_device,
    setup_torch,
    time_interleaved,
    timing_fields,
    write_json,
)

__all__ = ["MODELS", "EncoderBlock", "ImageMLP", "TinyEncoder", "bench_model", "main"]


class ImageMLP(nn.Module):
    """The quickstart classifier: an MLP over ``(B, 32, 32, 3)`` images."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32 * 32 * 3, 1024)
        self.fc2 = nn.Linear(1024, 512)
        self.head = nn.Linear(512, 10)

    def forward(self, images: Tensor) -> Tensor:
        x = torch.flatten(images, 1)  # (B, 32, 32, 3) -> (B, 3072): modes (32, 32, 3)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.head(x)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: multi-head self-attention and a GELU MLP."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(self.ln1(x)).unflatten(-1, (3, self.heads, self.head_dim))
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, heads, T, head_dim)
        att = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.proj(att.transpose(1, 2).flatten(2))  # modes (heads, head_dim)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyEncoder(nn.Module):
    """A stack of :class:`EncoderBlock` over ``(B, T, dim)`` features, final LayerNorm."""

    def __init__(self, layers: int = 4, dim: int = 256, heads: int = 4, hidden: int = 1024):
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: a factory and its input shape (full and ``--quick``)."""

    name: str
    description: str
    factory: Callable[[bool], nn.Module]
    input_shape: Callable[[bool], tuple[int, ...]]


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            "image_mlp",
            "quickstart MLP, flattened (B,32,32,3) input, 3072-1024-512-10",
            lambda quick: ImageMLP(),
            lambda quick: (8 if quick else 64, 32, 32, 3),
        ),
        ModelSpec(
            "encoder",
            "transformer encoder, 4 layers, d=256, heads=4, MLP 1024, T=64",
            lambda quick: TinyEncoder(layers=1 if quick else 4),
            lambda quick: (2, 16, 256) if quick else (8, 64, 256),
        ),
    )
}


def count_flops(model: nn.Module, x: Tensor) -> int:
    """Whole-model forward FLOPs counted by ``torch.utils.flop_counter``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def _phases(model: nn.Module, x: Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """Forward (no grad) and training-step (forward + backward of a sum) callables."""
    params = [p for p in model.parameters() if p.requires_grad]

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def train_step() -> None:
        for p in params:
            p.grad = None
        model(x).square().mean().backward()

    return forward, train_step


def static_measures(model: nn.Module, x: Tensor, device: torch.device) -> dict[str, Any]:
    """Parameters, FLOPs and peak memory (forward and training step) of one model."""
    out: dict[str, Any] = {
        "params": sum(p.numel() for p in model.parameters()),
        "flops": count_flops(model, x),
    }
    forward, train_step = _phases(model, x)
    forward()  # allocator and caches settle before memory is read
    out["peak_fwd_mb"], out["memory_method"] = peak_memory_mb(forward, device)
    train_step()
    for p in model.parameters():
        p.grad = None  # gradients are part of the step's peak
    out["peak_train_mb"], _ = peak_memory_mb(train_step, device)
    # The peak of live tensors (allocator-independent; on CPU the RSS also counts
    # freed pages the allocator keeps): forward, and the training step with its grads
    # (train_step clears them first).
    existing = [*model.parameters(), *model.buffers(), x]
    out["live_fwd_mb"] = peak_live_bytes(forward, existing).peak_bytes / 2**20
    out["live_train_mb"] = peak_live_bytes(train_step, existing).peak_bytes / 2**20
    return out


def _rel_err(ref: Tensor, out: Tensor) -> float:
    return float((out - ref).double().norm() / ref.double().norm().clamp_min(1e-30))


def time_models(
    models: dict[str, nn.Module],
    x: Tensor,
    device: torch.device,
    *,
    compile_: bool,
    time_kw: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """Latencies of several models, interleaved per phase so load hits them alike.

    Phases: ``eager_fwd``, ``eager_train`` and, with ``compile_``, ``compiled_fwd``
    and ``compiled_train`` (``torch.compile``, inductor, ``dynamic=False``).
    """
    out: dict[str, dict[str, Any]] = {name: {} for name in models}
    runs = {name: _phases(m, x) for name, m in models.items()}
    if compile_:
        torch._dynamo.reset()
        for name, m in models.items():
            compiled = torch.compile(m, backend="inductor", dynamic=False)
            with torch.no_grad():
                out[name]["compiled_rel_err"] = _rel_err(m(x), compiled(x))
            runs[f"{name}+compiled"] = _phases(compiled, x)  # type: ignore[arg-type]
    for label, suffix, index in (
        ("eager_fwd", "", 0),
        ("eager_train", "", 1),
        ("compiled_fwd", "+compiled", 0),
        ("compiled_train", "+compiled", 1),
    ):
        fns = {n: runs[n + suffix][index] for n in models if n + suffix in runs}
        for name, t in time_interleaved(fns, device, **time_kw).items():
            out[name].update(timing_fields(label, t))
    return out


def bench_model(
    spec: ModelSpec,
    device: torch.device,
    *,
    quick: bool,
    compile_: bool,
    time_kw: dict[str, Any],
) -> dict[str, Any]:
    """Convert one model and measure original and converted side by side."""
    model = spec.factory(quick).to(device)
    x = torch.randn(*spec.input_shape(quick), device=device)
    converted = ndcompile.convert(model, x, mode="fresh")
    report = converted.report
    linear_before = sum(e.flops_before for e in report.layers)
    linear_after = sum(
        e.flops_after if e.status != "skipped" else e.flops_before for e in report.layers
    )
    models = {"original": model, "converted": converted}
    sides = {name: static_measures(m, x, device) for name, m in models.items()}
    for name, times in time_models(models, x, device, compile_=compile_, time_kw=time_kw).items():
        sides[name].update(times)
    record: dict[str, Any] = {
        "name": spec.name,
        "description": spec.description,
        "input_shape": list(x.shape),
        "mode": "fresh",
        "report": report.to_dict(),
        "report_text": str(report),
        "linear_flops_before": linear_before,
        "linear_flops_after": linear_after,
        **sides,
    }
    orig, conv = record["original"], record["converted"]
    record["ratios"] = {
        key: (orig[key] / conv[key] if conv.get(key) else None)
        for key in orig
        if (key.endswith("_ms") and not key.endswith("iqr_ms")) or key in ("params", "flops")
    }
    return record


def model_table(record: dict[str, Any]) -> str:
    """Original vs converted, one row per metric; latencies as ``median (IQR)`` ms."""
    orig, conv, ratio = record["original"], record["converted"], record["ratios"]
    lin_before, lin_after = record["linear_flops_before"], record["linear_flops_after"]
    rows: list[tuple[str, ...]] = [
        ("params", f"{orig['params']:,}", f"{conv['params']:,}", f"{ratio['params']:.2f}x", ""),
        (
            "Linear FLOPs (report)",
            f"{lin_before / 1e6:.1f} M",
            f"{lin_after / 1e6:.1f} M",
            f"{lin_before / max(lin_after, 1):.2f}x",
            "",
        ),
        (
            "model FLOPs (flop_counter)",
            f"{orig['flops'] / 1e6:.1f} M",
            f"{conv['flops'] / 1e6:.1f} M",
            f"{ratio['flops']:.2f}x",
            "",
        ),
    ]
    for key, label in (
        ("eager_fwd", "forward ms, eager"),
        ("compiled_fwd", "forward ms, inductor"),
        ("eager_train", "train step ms, eager"),
        ("compiled_train", "train step ms, inductor"),
    ):
        if f"{key}_ms" not in orig or f"{key}_ms" not in conv:
            continue
        rows.append(
            (
                label,
                f"{orig[f'{key}_ms']:.3f} ({orig[f'{key}_iqr_ms']:.3f})",
                f"{conv[f'{key}_ms']:.3f} ({conv[f'{key}_iqr_ms']:.3f})",
                f"{ratio[f'{key}_ms']:.2f}x",
                f"{ratio[f'{key}_min_ms']:.2f}x",
            )
        )
    method = orig["memory_method"]
    memory = (
        ("peak_fwd_mb", f"peak memory, forward MB ({method})"),
        ("peak_train_mb", f"peak, train MB ({method})"),
        ("live_fwd_mb", "live tensors, forward MB"),
        ("live_train_mb", "live tensors, train MB"),
    )
    for key, label in memory:
        a, b = orig[key], conv[key]
        rows.append(
            (
                label,
                f"{a:.1f}",
                f"{b:.1f}",
                f"{a / b:.2f}x" if b > 0 else "-",
                "",
            )
        )
    header = ("metric", "original", "converted", "orig/conv", "orig/conv, fastest sample")
    return format_table(header, rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_machine_options(p)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated of {list(MODELS)}")
    p.add_argument("--quick", action="store_true", help="small models, tiny iteration counts")
    p.add_argument("--compile", action="store_true", help="with --quick: keep torch.compile")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--budget", type=float, default=None, help="seconds per measurement")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the model benchmark; returns the JSON-able results."""
    args = parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; models are: {', '.join(MODELS)}")
    device = pick_device(args.device)
    threads = setup_torch(args.threads, args.seed)
    compile_ = args.compile or not args.quick
    time_kw = {
        "warmup": 2 if args.quick else 5,
        "budget_s": args.budget if args.budget is not None else (0.02 if args.quick else 1.0),
        "min_iters": 3 if args.quick else 5,
        "max_iters": 10 if args.quick else 300,
    }
    result: dict[str, Any] = {
        "meta": {
            **machine_info(device, threads),
            "compile": compile_,
            "quick": args.quick,
            "timing": time_kw,
        },
        "models": [],
    }
    print(
        f"# ndcompile model benchmark: {result['meta']['cpu']}, {threads} threads, "
        f"torch {torch.__version__}, device {device}"
    )
    for name in names:
        spec = MODELS[name]
        rec = bench_model(spec, device, quick=args.quick, compile_=compile_, time_kw=time_kw)
        print(f"\n## {name}: {spec.description}, input {tuple(rec['input_shape'])}")
        print(rec["report_text"])
        print()
        print(model_table(rec))
        result["models"].append(rec)
    if args.json is not None:
        print(f"\nwrote {write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
