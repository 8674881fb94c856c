"""Training cost of NdLinear vs the dense layer: saved activations, peak memory, fwd and fwd+bwd.

For each layer case the same input is run through the dense ``nn.Linear`` and
through ``NdLinear`` in four settings: ``recompute`` (the default: only the input
and the factors are saved, intermediates are recomputed in backward, and batches of
more than two tiles run tile by tile), ``untiled`` (``tile=0``: the whole batch
through each step), ``save`` (``recompute=False``: autograd keeps every
intermediate, the behaviour before recomputation) and, for rank > 1, ``chains``
(the rank-R sum forced to R separate rank-1 chains instead of the stacked-factor
plan). A BERT-base-like encoder (transformers ``BertConfig``: hidden 768,
intermediate 3072, seq 128) is compared dense vs converted the same way.

Columns: ``saved MB`` (bytes autograd saves for backward, parameters excluded,
``ndcompile.layers.memory``), ``peak MB`` (growth of the process's peak memory
during one fwd+bwd, see ``common.peak_memory_mb``), ``live MB`` (the peak of live
tensors during one fwd+bwd, gradients included, ``ndcompile.layers.memory``),
``fwd ms`` and ``fwd+bwd ms`` (medians of interleaved rounds). Run::

    python benchmarks/bench_training.py --threads 2 --json benchmarks/results/cpu_training.json
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ndcompile.layers.memory import peak_live_bytes, saved_activation_bytes
from ndcompile.layers.ndlinear import NdLinear

from common import (
    add_machine_options,
    format_table,
    machine_info,
    peak_memory_mb,
    pick_device,
    setup_torch,
    time_interleaved,
    write_json,
)

__all__ = ["LAYER_CASES", "bench_bert", "bench_layer", "main"]

#: name -> (in_shape, out_shape, rank, rows)
LAYER_CASES: dict[str, tuple[tuple[int, ...], tuple[int, ...], int, int]] = {
    "mlp768_r1": ((24, 32), (48, 64), 1, 2048),
    "mlp768_r4": ((24, 32), (48, 64), 4, 2048),
    "down3072_r1": ((48, 64), (24, 32), 1, 2048),
    "image32_r2": ((32, 32, 3), (32, 32, 3), 2, 64),
}


def _chains(layer: NdLinear) -> NdLinear | None:
    """A copy of ``layer`` running its best separate-chains candidate, or None."""
    choice = layer.plan_choice()
    if choice is None:
        return None
    cand = next((c for c in choice.candidates if c.chains), None)
    if cand is None:
        return None
    new = copy.deepcopy(layer)
    new._plan = cand.plan  # force this candidate
    return new


def _measure(
    models: dict[str, nn.Module], x: Tensor, device: torch.device, budget: float
) -> list[dict[str, Any]]:
    def fwd(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(x)

        return run

    def train(model: nn.Module) -> Callable[[], None]:
        xg = x.detach().requires_grad_(x.is_floating_point())

        def run() -> None:
            out = model(xg)
            out = out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", out)
            out.float().sum().backward()

        return run

    rows = []
    fns: dict[str, Callable[[], None]] = {}
    for name, model in models.items():
        xg = x.detach().requires_grad_(x.is_floating_point())
        saved = saved_activation_bytes(lambda m=model, v=xg: m(v), model.parameters())
        del saved.output
        peak, method = peak_memory_mb(train(model), device)
        existing = [*model.parameters(), *model.buffers(), x]
        live = peak_live_bytes(train(model), existing).peak_bytes / 2**20
        rows.append(
            {
                "variant": name,
                "params": sum(p.numel() for p in model.parameters()),
                "saved_mb": saved.activation_bytes / 2**20,
                "peak_mb": peak,
                "peak_method": method,
                "live_mb": live,
            }
        )
        fns[f"{name} fwd"] = fwd(model)
        fns[f"{name} fwd+bwd"] = train(model)
    timings = time_interleaved(fns, device, warmup=3, min_iters=5, budget_s=budget)
    for row in rows:
        row["fwd_ms"] = timings[f"{row['variant']} fwd"].median_ms
        row["fwd_bwd_ms"] = timings[f"{row['variant']} fwd+bwd"].median_ms
    return rows


def bench_layer(name: str, device: torch.device, budget: float) -> dict[str, Any]:
    """Dense vs NdLinear (recompute, save, chains) on one layer case."""
    in_shape, out_shape, rank, rows = LAYER_CASES[name]
    nd = NdLinear(in_shape, out_shape, rank, flat=True, plan_batch=rows, device=device)
    save = copy.deepcopy(nd)
    save.recompute = False
    untiled = copy.deepcopy(nd)
    untiled.tile = 0
    models: dict[str, nn.Module] = {
        "dense": nn.Linear(nd.in_features, nd.out_features, device=device),
        "ndlinear recompute": nd,
        "ndlinear untiled": untiled,
        "ndlinear save": save,
    }
    chains = _chains(nd) if rank > 1 else None
    if chains is not None:
        models["ndlinear chains"] = chains
    x = torch.randn(rows, nd.in_features, device=device)
    choice = nd.plan_choice()
    return {
        "case": name,
        "in_shape": in_shape,
        "out_shape": out_shape,
        "rank": rank,
        "rows": rows,
        "plan": choice.chosen.label if choice else None,
        "variants": _measure(models, x, device, budget),
    }


def _replace_linears(model: nn.Module, rank: int) -> int:
    """Replace every ``nn.Linear`` of 768/3072 features by ``NdLinear(flat=True)``."""
    from ndcompile.compress.kronecker_shapes import plan_mode_shapes

    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            ins = plan_mode_shapes(child.in_features, 2)
            outs = plan_mode_shapes(child.out_features, 2)
            if ins is None or outs is None:
                continue
            layer = NdLinear(ins, outs, rank, bias=child.bias is not None, flat=True)
            setattr(parent, child_name, layer.to(child.weight.device))
            count += 1
    return count


def bench_bert(device: torch.device, budget: float, layers: int, rank: int) -> dict[str, Any]:
    """A BERT-base-like encoder, dense vs every Linear as a rank-``rank`` NdLinear."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=layers,
        vocab_size=1024,
        max_position_embeddings=128,
    )
    dense = BertModel(config, add_pooling_layer=False).to(device)
    ids = torch.randint(0, config.vocab_size, (2, 128), device=device)
    converted = copy.deepcopy(dense)
    how = "setattr"
    try:
        import ndcompile

        converted = ndcompile.convert(dense, {"input_ids": ids}, mode="fresh", rank=rank)
        how = "ndcompile.convert"
    except Exception as exc:  # the front end may not handle this model yet
        how = f"setattr (convert failed: {type(exc).__name__})"
        converted = copy.deepcopy(dense)
    replaced = sum(isinstance(m, NdLinear) for m in converted.modules())
    if replaced == 0:
        replaced = _replace_linears(converted, rank)
    embeds = dense.embeddings(ids).detach()

    class Encoder(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.encoder = model.encoder

        def forward(self, h: Tensor) -> Tensor:
            return self.encoder(h).last_hidden_state

    models = {"dense": Encoder(dense), f"ndlinear r{rank}": Encoder(converted)}
    return {
        "case": f"bert_base_{layers}layer_r{rank}",
        "converted_by": how,
        "ndlinear_layers": replaced,
        "input": [2, 128, 768],
        "variants": _measure(models, embeds, device, budget),
    }


def table(record: dict[str, Any]) -> str:
    header = ["variant", "params", "saved MB", "peak MB", "live MB", "fwd ms", "fwd+bwd ms"]
    rows = [
        [
            v["variant"],
            f"{v['params']:,}",
            f"{v['saved_mb']:.2f}",
            f"{v['peak_mb']:.1f}",
            f"{v['live_mb']:.1f}",
            f"{v['fwd_ms']:.2f}",
            f"{v['fwd_bwd_ms']:.2f}",
        ]
        for v in record["variants"]
    ]
    return format_table(header, rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_machine_options(p)
    p.add_argument("--cases", default=",".join(LAYER_CASES), help=f"of {list(LAYER_CASES)}")
    p.add_argument("--bert-layers", type=int, default=1, help="0 skips the BERT encoder")
    p.add_argument("--bert-rank", type=int, default=4)
    p.add_argument("--budget", type=float, default=1.0, help="seconds per measurement")
    p.add_argument("--quick", action="store_true", help="small budget, one small case, no BERT")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print one table per case."""
    args = parse_args(argv)
    device = pick_device(args.device)
    threads = setup_torch(args.threads, args.seed)
    cases = ["image32_r2"] if args.quick else [c for c in args.cases.split(",") if c]
    budget = 0.05 if args.quick else args.budget
    records = []
    for name in cases:
        record = bench_layer(name, device, budget)
        print(f"\n### {name}: {record['in_shape']}->{record['out_shape']} rank {record['rank']}")
        print(f"rows {record['rows']}, plan {record['plan']}\n")
        print(table(record))
        records.append(record)
    if args.bert_layers and not args.quick:
        record = bench_bert(device, budget, args.bert_layers, args.bert_rank)
        print(f"\n### {record['case']} ({record['converted_by']}, {record['ndlinear_layers']})\n")
        print(table(record))
        records.append(record)
    result = {"machine": machine_info(device, threads), "cases": records}
    if args.json is not None:
        print(f"\nwrote {write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
