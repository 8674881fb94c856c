"""convert() splits nn.MultiheadAttention so its projections are converted like any Linear."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ndcompile
from ndcompile import NdLinear
from ndcompile.layers.attention import ProjectedAttention
from ndcompile.pipeline.attention import sharing_copy, split_attention, split_saved

D, HEADS, FF = 64, 4, 128


class EncoderWithCrossAttention(nn.Module):
    """A user model: nn.TransformerEncoder, then cross-attention with other key widths."""

    def __init__(self) -> None:
        super().__init__()
        block = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(block, 2, enable_nested_tensor=False)
        self.cross = nn.MultiheadAttention(D, HEADS, kdim=32, vdim=32, batch_first=True)
        self.head = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x, src_key_padding_mask=padding)
        h = h + self.cross(h, memory, memory, need_weights=False)[0]
        return self.head(h)


def _example(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, D, generator=gen, dtype=dtype)
    memory = torch.randn(2, 8, 32, generator=gen, dtype=dtype)
    padding = torch.zeros(2, 16, dtype=torch.bool)
    padding[1, 12:] = True
    return x, memory, padding


ATTENTION = ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn", "cross"]
PROJECTED = [f"{a}.{p}" for a in ATTENTION for p in ("q_proj", "k_proj", "v_proj", "out_proj")]


@pytest.mark.parametrize("mode", ["fresh", "factorize", "adapter"])
def test_every_projection_is_converted_and_the_model_is_untouched(mode: str) -> None:
    torch.manual_seed(0)
    model = EncoderWithCrossAttention().eval()
    state = copy.deepcopy(model.state_dict())
    example = _example()
    converted = ndcompile.convert(model, example, mode=mode, rank=2)
    converted_names = {e.name for e in converted.report.layers if e.status == "converted"}
    assert set(PROJECTED) <= converted_names
    for name in ATTENTION:
        assert isinstance(converted.get_submodule(name), ProjectedAttention)
        assert type(model.get_submodule(name)) is nn.MultiheadAttention
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert any("ProjectedAttention" in note for note in converted.report.notes)
    out = converted(*example)
    out.sum().backward()
    trained = [n for n, p in converted.named_parameters() if p.grad is not None]
    assert any(".q_proj." in n for n in trained)


def test_adapter_mode_is_exact_in_float64() -> None:
    """Zero-initialised adapters: the converted model is the original, forward and backward."""
    torch.manual_seed(0)
    model = EncoderWithCrossAttention().eval().double()
    example = _example(torch.float64)
    converted = ndcompile.convert(model, example, mode="adapter")
    x = example[0].clone().requires_grad_(True)
    x2 = example[0].clone().requires_grad_(True)
    want = model(x, *example[1:])
    got = converted(x2, *example[1:])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    want.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-12, rtol=1e-12)
    assert converted.report.output_rel_error < 1e-12


def test_factorized_attention_exports_compiles_and_reloads(tmp_path) -> None:
    torch.manual_seed(0)
    model = EncoderWithCrossAttention().eval()
    example = _example()
    converted = ndcompile.convert(model, example, mode="factorize", rank=2)
    assert isinstance(converted.cross.k_proj, NdLinear)
    with torch.no_grad():
        want = converted(*example)
        exported = torch.export.export(converted, example).module()
        torch.testing.assert_close(exported(*example), want, atol=1e-5, rtol=1e-5)
        compiled = torch.compile(converted, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(*example), want, atol=1e-5, rtol=1e-5)
    path = ndcompile.save(converted, tmp_path / "model.safetensors", example_input=example)
    loaded = ndcompile.load(path, EncoderWithCrossAttention().eval(), example)
    assert isinstance(loaded.cross, ProjectedAttention)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*example), want, atol=0, rtol=0)


def test_excluded_attention_keeps_nn_multihead_attention() -> None:
    torch.manual_seed(0)
    model = EncoderWithCrossAttention().eval()
    converted = ndcompile.convert(
        model, _example(), mode="factorize", rank=1, exclude=["encoder.*"]
    )
    assert type(converted.encoder.layers[0].self_attn) is nn.MultiheadAttention
    assert isinstance(converted.cross, ProjectedAttention)
    names = {e.name: e for e in converted.report.layers}
    assert names["cross.v_proj"].status == "converted"
    assert "F.linear" in (names["encoder.layers.0.self_attn.in_proj_weight"].reason or "")


def test_hooks_move_to_the_projected_attention() -> None:
    torch.manual_seed(0)
    model = EncoderWithCrossAttention().eval()
    seen: list[tuple[int, ...]] = []
    model.cross.register_forward_hook(lambda m, args, out: seen.append(tuple(out[0].shape)))
    converted = ndcompile.convert(model, _example(), mode="fresh")
    seen.clear()
    converted(*_example())
    assert seen == [(2, 16, D)]


def test_sharing_copy_shares_tensors_and_split_edits_only_the_copy() -> None:
    model = EncoderWithCrossAttention()
    work = sharing_copy(model)
    assert work.head.weight is model.head.weight
    names = split_attention(work, lambda name: name == "cross")
    assert names == ["cross"]
    assert isinstance(work.cross, ProjectedAttention)
    assert type(model.cross) is nn.MultiheadAttention
    assert work.cross.k_proj.weight.data_ptr() != model.cross.k_proj_weight.data_ptr()


def test_split_saved_splits_the_layers_a_state_names() -> None:
    model = EncoderWithCrossAttention()
    assert split_saved(model, ["cross.q_proj.weight", "head.weight"]) == ["cross"]
    assert type(model.encoder.layers[0].self_attn) is nn.MultiheadAttention


def test_a_root_attention_is_left_with_its_reason() -> None:
    mha = nn.MultiheadAttention(D, HEADS, batch_first=True).eval()
    x = torch.randn(2, 8, D)
    converted = ndcompile.convert(mha, (x, x, x), mode="fresh")
    assert type(converted) is nn.MultiheadAttention
    reason = converted.report.layer("in_proj_weight").reason or ""
    assert "not split" in reason and "the model itself" in reason


class OwnAttention(nn.MultiheadAttention):
    """A subclass: its forward may differ, so it is not split."""


def test_a_subclass_is_left_with_its_reason() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = OwnAttention(D, HEADS, batch_first=True)
            self.fc = nn.Linear(D, D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.attn(x, x, x)[0])

    converted = ndcompile.convert(Model().eval(), torch.randn(2, 8, D), mode="fresh")
    assert type(converted.attn) is OwnAttention
    assert "subclass of nn.MultiheadAttention" in (
        converted.report.layer("attn.in_proj_weight").reason or ""
    )
    assert converted.report.layer("fc").status == "converted"


def test_siglip_attention_pooling_head_is_converted() -> None:
    """A real model: SigLIP's vision tower pools with an nn.MultiheadAttention head."""
    transformers = pytest.importorskip("transformers")
    config = transformers.SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    model = transformers.SiglipVisionModel(config).eval()
    example = {"pixel_values": torch.randn(2, 3, 32, 32)}
    converted = ndcompile.convert(model, example, mode="adapter", rank=2)
    assert type(converted) is type(model)
    status = {e.name: e.status for e in converted.report.layers}
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert status[f"head.attention.{p}"] == "converted"
    assert converted.report.output_rel_error < 1e-6
    with torch.no_grad():
        want = model(**example).pooler_output
        torch.testing.assert_close(converted(**example).pooler_output, want, atol=1e-5, rtol=1e-5)


def test_inspect_plans_the_projections_convert_converts() -> None:
    from ndcompile.cli.inspect import plan_model

    torch.manual_seed(0)
    model = EncoderWithCrossAttention().eval()
    notes: list[str] = []
    rows = plan_model(model, _example(), mode="factorize", rank=2, notes=notes)
    planned = {r["name"] for r in rows if r["action"] == "convert"}
    converted = ndcompile.convert(model, _example(), mode="factorize", rank=2)
    done = {e.name for e in converted.report.layers if e.status == "converted"}
    assert set(PROJECTED) <= planned
    assert planned == done
    assert any("ProjectedAttention" in n for n in notes)
    assert type(model.cross) is nn.MultiheadAttention


def test_backend_names_fused_attention_and_compiles_the_converted_model() -> None:
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(block, 1, enable_nested_tensor=False).eval()
    x = torch.randn(2, 16, D)
    reports: list = []
    options = {"factorize": {"rank": 2}, "report": reports.append, "inductor": False}
    with torch.no_grad():
        torch.compile(model, backend="ndcompile", options=options)(x)
    notes = " ".join(n for r in reports for n in r.notes)
    assert "_transformer_encoder_layer_fwd" in notes and "ndcompile.convert" in notes
    converted = ndcompile.convert(model, x, mode="fresh")
    torch._dynamo.reset()
    with torch.no_grad():
        want = converted(x)
        got = torch.compile(converted, backend="ndcompile", options={"inductor": False})(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
