"""The Hugging Face models of ``bench_hf_models``: sizes, builders from configs, a tensor output.

Both models are built from ``transformers`` configs with random weights (nothing
is downloaded) and dropout 0. :class:`TensorOutput` gives them the
``model(x) -> Tensor`` form that ``bench_models``' measuring helpers expect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["MODELS", "HFModelSpec", "Sizes", "TensorOutput"]


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
    """A ``transformers.BertModel`` of sizes ``s``, without the pooler."""
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
    """A ``transformers.LlamaForCausalLM`` of sizes ``s``: untied ``lm_head``, no KV cache."""
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
