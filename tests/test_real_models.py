"""Hugging Face transformers models (small configs) through ``convert``: every front-end path."""

from __future__ import annotations

import pytest
import torch
from hf_models import CAUSAL_LMS, MODELS, Conv1D, build, linear_like_params, tokens, transformers
from torch import nn

import ndcompile
from ndcompile import NdCompileError, NdLinear
from ndcompile.compress.adapter_linear import NdAdapterLinear
from ndcompile.frontend.capture import capture_linear_calls
from ndcompile.frontend.inputs import example_inputs

MODE_KWARGS = {"fresh": {}, "factorize": {"rank": 4}, "adapter": {}}


@pytest.mark.parametrize("mode", list(MODE_KWARGS))
@pytest.mark.parametrize("name", list(MODELS))
def test_converts_nearly_all_linear_like_params(name: str, mode: str) -> None:
    model, example = build(name)
    converted = ndcompile.convert(model, example, mode=mode, **MODE_KWARGS[mode])
    assert isinstance(converted, type(model))
    report = converted.report
    own = linear_like_params(model)
    listed = {entry.name for entry in report.layers}
    every = {n for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)}
    assert every <= listed  # every Linear-like layer is in the report
    for entry in report.skipped:
        assert entry.reason, entry.name
    done = sum(own[e.name] for e in report.converted if e.name in own)
    assert done / sum(own.values()) >= 0.95, str(report)
    replaced = NdAdapterLinear if mode == "adapter" else NdLinear
    for entry in report.converted:
        assert isinstance(converted.get_submodule(entry.name), replaced)


@pytest.mark.parametrize("name", list(MODELS))
def test_zero_init_adapter_keeps_outputs_at_other_shapes(name: str) -> None:
    model, example = build(name)
    converted = ndcompile.convert(model, example, mode="adapter")
    assert converted.report.output_rel_error is not None
    assert converted.report.output_rel_error <= 1e-6
    make = MODELS[name][1]
    for batch, length in [(1, 7), (3, 13)]:
        other = make(batch, length)
        with torch.no_grad():
            got, want = converted(**other), model(**other)
        assert ndcompile.relative_error(want, got) <= 1e-6


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_exact_mode_keeps_outputs(name: str) -> None:
    model, example = build(name)
    converted = ndcompile.convert(model, example, mode="exact")
    assert isinstance(converted, type(model))
    assert converted.report.output_rel_error <= 1e-6
    every = {n for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)}
    assert {e.name for e in converted.report.skipped} == every
    assert all(e.reason for e in converted.report.skipped)


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_generate_runs_and_zero_adapter_matches(name: str) -> None:
    model, example = build(name)
    prompt = tokens(1, 4)
    want = model.generate(prompt, max_new_tokens=4, do_sample=False)
    adapted = ndcompile.convert(model, example, mode="adapter")
    assert torch.equal(adapted.generate(prompt, max_new_tokens=4, do_sample=False), want)
    fresh = ndcompile.convert(model, example, mode="fresh")
    out = fresh.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(out[:, :4], prompt) and 4 < out.shape[1] <= 8


def test_gpt2_conv1d_is_found_with_its_transposed_weight() -> None:
    model, example = build("gpt2")
    calls = capture_linear_calls(model, example_inputs(example))
    kinds = {c.name: c.kind for c in calls.calls}
    assert kinds["transformer.h.0.mlp.c_fc"] == "Conv1D"
    assert kinds["lm_head"] == "Linear"
    # An exactly Kronecker-structured Conv1D weight is recovered by a rank-1 fit.
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D(nf=256, nx=64): weight (64, 256)
    a, b = torch.randn(32, 8), torch.randn(8, 8)
    with torch.no_grad():
        conv.weight.copy_(torch.kron(a, b).T)
    converted = ndcompile.convert(
        model,
        example,
        mode="factorize",
        rank=1,
        include="transformer.h.0.mlp.c_fc",
        shapes={"transformer.h.0.mlp.c_fc": ((8, 8), (32, 8))},
    )
    entry = converted.report.layer("transformer.h.0.mlp.c_fc")
    assert entry.kind == "Conv1D"
    assert entry.weight_rel_error < 1e-5
    assert converted.report.output_rel_error < 1e-5


def test_example_inputs_as_users_call_models() -> None:
    model, example = build("bert")
    ids, mask = example["input_ids"], example["attention_mask"]
    for form in [example, ((ids,), {"attention_mask": mask}), (ids, mask), ids]:
        converted = ndcompile.convert(model, form, mode="adapter")
        assert converted.report.output_rel_error <= 1e-6


def test_functional_linear_is_reported_with_a_reason() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(32, 64))
            self.fc = nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(self.fc(x), self.weight)

    converted = ndcompile.convert(Functional(), torch.randn(2, 64), mode="fresh")
    entry = converted.report.layer("weight")
    assert entry.status == "skipped" and "F.linear" in entry.kind
    assert "functional" in entry.reason
    assert converted.report.layer("fc").status == "converted"


def test_untraceable_by_export_falls_back_to_hooks() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum().item() > 0:  # data-dependent: export cannot capture it
                return self.fc(x)
            return -self.fc(x)

    converted = ndcompile.convert(DataDependent(), torch.ones(2, 64), mode="fresh")
    assert converted.report.layer("fc").status == "converted"
    assert any("forward hooks" in note for note in converted.report.notes)


def test_hooks_and_frozen_layers_survive() -> None:
    model, example = build("bert")
    seen: list[tuple[int, ...]] = []
    model.pooler.dense.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    model.encoder.layer[0].output.dense.weight.requires_grad_(False)
    converted = ndcompile.convert(model, example, mode="fresh")
    seen.clear()
    converted(**example)
    assert seen == [(2, 64)]
    frozen = converted.get_submodule("encoder.layer.0.output.dense")
    assert isinstance(frozen, NdLinear)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert any(p.requires_grad for p in converted.get_submodule("pooler.dense").parameters())


def test_save_load_and_save_pretrained_round_trip(tmp_path) -> None:
    model, example = build("gpt2")
    converted = ndcompile.convert(
        model, example, mode="factorize", rank={"transformer.h.0.mlp.c_fc": 2}, tol=None
    )
    with torch.no_grad():
        want = converted(**example).logits
    path = ndcompile.save(converted, tmp_path / "m.safetensors")
    restored = ndcompile.load(path, model)
    assert isinstance(restored, type(model))
    with torch.no_grad():
        assert torch.equal(restored(**example).logits, want)
    converted.save_pretrained(tmp_path / "hf")
    again = ndcompile.from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "hf")
    assert isinstance(again.get_submodule("transformer.h.0.mlp.c_fc"), NdLinear)
    with torch.no_grad():
        assert torch.equal(again(**example).logits, want)


def test_from_pretrained_refuses_a_dense_checkpoint(tmp_path) -> None:
    model, _ = build("bert")
    model.save_pretrained(tmp_path)
    with pytest.raises(NdCompileError, match="no ndcompile conversion"):
        ndcompile.from_pretrained(transformers.BertModel, tmp_path)


def test_user_model_is_unchanged() -> None:
    model, example = build("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ndcompile.convert(model, example, mode="factorize", rank=2)
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert not hasattr(model.config, "ndcompile")
