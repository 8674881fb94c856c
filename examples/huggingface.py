"""Hugging Face models: convert a Llama-style causal LM built from a config, keep its class.

Run with ``python examples/huggingface.py`` (needs ``transformers``; random weights,
nothing is downloaded). Shows: keyword example inputs, every Linear found through
``torch.export``, the result is still a ``LlamaForCausalLM`` (``generate``,
``config``, ``save_pretrained``), zero-init NdLinear-LoRA adapters leave the tokens
unchanged, and ``save_pretrained`` -> ``ndcompile.from_pretrained`` restores the
converted layers.
"""

from __future__ import annotations

import logging
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ndcompile

logging.getLogger("transformers").setLevel(logging.ERROR)


def build(hidden: int = 256, layers: int = 2) -> LlamaForCausalLM:
    """A small Llama from its config (random weights)."""
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1000,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def main(hidden: int = 256, layers: int = 2, verbose: bool = True) -> dict[str, object]:
    """Convert in three modes, generate, and round-trip through ``save_pretrained``."""
    torch.manual_seed(0)
    model = build(hidden, layers)
    ids = torch.randint(2, 1000, (2, 16))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    results: dict[str, object] = {}

    start = time.perf_counter()
    factorized = ndcompile.convert(model, example, mode="factorize", rank=4)
    results["factorize_s"] = time.perf_counter() - start
    results["factorized"] = factorized
    if verbose:
        print(f"{type(factorized).__name__}, converted in {results['factorize_s']:.1f} s")
        print(factorized.report)

    adapted = ndcompile.convert(model, example, mode="adapter", rank=2)
    prompt = ids[:1, :6]
    want = model.generate(prompt, max_new_tokens=8, do_sample=False)
    got = adapted.generate(prompt, max_new_tokens=8, do_sample=False)
    results["adapter_tokens_equal"] = bool(torch.equal(want, got))
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    results["adapter_trainable"] = trainable
    if verbose:
        print(f"\nadapter: {trainable:,} trainable parameters; generate() -> {got.tolist()[0]}")
        print(f"same tokens as the original model: {results['adapter_tokens_equal']}")

    with tempfile.TemporaryDirectory() as folder:
        factorized.save_pretrained(folder)
        restored = ndcompile.from_pretrained(LlamaForCausalLM, folder)
    with torch.no_grad():
        err = ndcompile.relative_error(factorized(**example).logits, restored(**example).logits)
    results["reload_error"] = err
    if verbose:
        print(
            f"save_pretrained -> ndcompile.from_pretrained: {type(restored).__name__}, "
            f"output difference {err:.1e}"
        )
    return results


if __name__ == "__main__":
    main()
