"""Small Hugging Face transformers models built from configs (random weights, no downloads)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

transformers = __import__("pytest").importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 96


def tokens(batch: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    """Random token ids."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return transformers.BertModel(cfg)


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        n_embd=64,
        n_layer=1,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def _decoder(config_cls: type, model_cls: type) -> Callable[[], nn.Module]:
    """A Llama-style causal LM builder (Llama, Qwen2 share the config fields)."""

    def build() -> nn.Module:
        cfg = config_cls(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        return model_cls(cfg)

    return build


_llama = _decoder(transformers.LlamaConfig, transformers.LlamaForCausalLM)
_qwen2 = _decoder(transformers.Qwen2Config, transformers.Qwen2ForCausalLM)


def _t5() -> nn.Module:
    cfg = transformers.T5Config(
        d_model=64,
        d_ff=128,
        num_layers=1,
        num_heads=2,
        d_kv=32,
        vocab_size=VOCAB,
        decoder_start_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(cfg)


def _vit() -> nn.Module:
    cfg = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
    )
    return transformers.ViTModel(cfg)


def _text(batch: int, length: int) -> dict[str, Any]:
    ids = tokens(batch, length)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _seq2seq(batch: int, length: int) -> dict[str, Any]:
    ids = tokens(batch, length)
    return {"input_ids": ids, "decoder_input_ids": tokens(batch, max(length - 3, 1), seed=1)}


def _image(batch: int, length: int) -> dict[str, Any]:
    return {
        "pixel_values": torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    }


#: name -> (builder, example(batch, length)).
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int, int], dict[str, Any]]]] = {
    "bert": (_bert, _text),
    "gpt2": (_gpt2, _text),
    "llama": (_llama, _text),
    "qwen2": (_qwen2, _text),
    "t5": (_t5, _seq2seq),
    "vit": (_vit, _image),
}

CAUSAL_LMS = ("gpt2", "llama", "qwen2")


def build(name: str) -> tuple[nn.Module, dict[str, Any]]:
    """Model ``name`` in eval mode (seeded) and its example inputs."""
    torch.manual_seed(0)
    builder, example = MODELS[name]
    return builder().eval(), example(2, 10)


def linear_like_params(model: nn.Module) -> dict[str, int]:
    """Weight elements of every Linear-like layer whose weight is its own (not tied)."""
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    return {
        name: m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | Conv1D) and owners[id(m.weight)] == 1
    }
