"""Whole-model conversion: wall time and peak memory of ``convert`` on a Llama-style model.

Each case runs in a fresh subprocess (``ru_maxrss`` is per process). The model is built
from a ``transformers.LlamaConfig`` with random weights; ``factorize`` at the given
rank fits every Linear with truncated SVDs. "copy" is the conversion as it was before
streaming (a full deep copy of the model, then each layer replaced); "streaming" skips
copying the dense weights of the layers being replaced; "disk" builds the model under
``ndcompile.empty_weights()`` (parameters on the meta device) and converts it with
``weights=`` a safetensors file of the same weights, written first by another process
(the peak is then relative to the model's size, which is never in memory).

    python benchmarks/bench_convert_model.py --hidden 2048 --layers 8 --json out.json
    python benchmarks/bench_convert_model.py --hidden 2048 --layers 20 --methods streaming,disk
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import copy, json, logging, resource, sys, time
import torch
logging.disable(logging.WARNING)
from transformers import LlamaConfig, LlamaForCausalLM
import ndcompile
from ndcompile.pipeline import surgery

hidden, layers, rank, threads, method, weights = sys.argv[1:7]
hidden, layers, rank = int(hidden), int(layers), int(rank)
torch.set_num_threads(int(threads))
torch.manual_seed(0)
config = LlamaConfig(
    hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 64 * 64,
    num_hidden_layers=layers, num_attention_heads=max(hidden // 128, 1),
    num_key_value_heads=max(hidden // 512, 1), vocab_size=32000, tie_word_embeddings=False,
)
if method == "save":  # write the weights file the "disk" method reads
    from safetensors.torch import save_file
    save_file(LlamaForCausalLM(config).state_dict(), weights)
    print(json.dumps({}))
    sys.exit(0)
if method == "disk":
    with ndcompile.empty_weights():
        model = LlamaForCausalLM(config).eval()
else:
    model = LlamaForCausalLM(config).eval()
params = sum(p.numel() for p in model.parameters())
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if method == "copy":
    surgery._copy_without = lambda m, replaced: copy.deepcopy(m)
ids = torch.randint(0, 32000, (1, 16))
start = time.perf_counter()
converted = ndcompile.convert(
    model, {"input_ids": ids}, mode="factorize", rank=rank, verify=False,
    weights=weights if method == "disk" else None,
)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({
    "method": method, "hidden": hidden, "layers": layers, "rank": rank, "params": params,
    "model_mb": params * 4 / 2**20, "seconds": round(seconds, 1),
    "rss_before_mb": base / 2**20, "peak_mb": peak / 2**20,
    "peak_over_model": peak / (params * 4), "converted": len(converted.report.converted),
    "params_after": converted.report.params_after,
}))
"""


def run(
    hidden: int, layers: int, rank: int, threads: int, method: str, weights: str = "-"
) -> dict[str, object]:
    """One conversion (or, ``method="save"``, the weights file) in a fresh process."""
    args = [str(hidden), str(layers), str(rank), str(threads), method, weights]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    """Run streaming and copy conversions; print a table; optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--methods", default="streaming,copy", help="of streaming, copy, disk (comma-separated)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "model.safetensors")
        for method in args.methods.split(","):
            if method == "disk" and not Path(weights).exists():
                run(args.hidden, args.layers, args.rank, args.threads, "save", weights)
            start = time.perf_counter()
            rows.append(run(args.hidden, args.layers, args.rank, args.threads, method, weights))
            rows[-1]["process_s"] = round(time.perf_counter() - start, 1)
    print("| method | params | model MB | convert s | peak RSS MB | peak / model | layers |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['params']:,} | {r['model_mb']:.0f} | {r['seconds']} | "
            f"{r['peak_mb']:.0f} | {r['peak_over_model']:.2f} | {r['converted']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
