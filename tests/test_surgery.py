"""Module surgery: verification, the user's model left untouched, hooks, rebuilding layers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import ndcompile
from ndcompile import NdCompileError, NdLinear
from ndcompile.backends.rebuild import layer_specs, rebuild_layers
from ndcompile.frontend.inputs import example_inputs, tensor_leaves
from ndcompile.pipeline.surgery import stacked_weights_note

MODES = {"fresh": {}, "factorize": {"rank": 2}, "adapter": {}, "exact": {}}


@dataclass
class Output:
    logits: torch.Tensor
    hidden: list[torch.Tensor]


class DataclassModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> Output:
        h = torch.relu(self.fc1(x))
        return Output(self.fc2(h), [h])


class Stateful(nn.Module):
    """BatchNorm and spectral norm: both update buffers when run in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.utils.parametrizations.spectral_norm(nn.Linear(64, 64))
        self.bn = nn.BatchNorm1d(64)
        self.out = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.bn(self.fc(x)))


def test_dataclass_outputs_are_compared_tensor_by_tensor() -> None:
    torch.manual_seed(0)
    model = DataclassModel().eval()
    x = torch.randn(8, 64)
    converted = ndcompile.convert(model, x, mode="factorize", rank=1)
    err = converted.report.output_rel_error
    with torch.no_grad():
        want, got = model(x), converted(x)
    assert err == pytest.approx(ndcompile.relative_error(want, got))
    assert err > 0.05  # a rank-1 fit of random weights is far from exact
    assert len(tensor_leaves(want)) == 2


def test_output_without_tensors_is_said() -> None:
    class Silent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> str:
            self.fc(x)
            return "done"

    converted = ndcompile.convert(Silent(), torch.randn(2, 64), mode="factorize", rank=1)
    assert any("holds no tensors" in n for n in converted.report.notes)
    with pytest.raises(NdCompileError, match="cannot verify"):
        ndcompile.convert(Silent(), torch.randn(2, 64), mode="adapter")


@pytest.mark.parametrize("mode", list(MODES))
def test_train_mode_model_is_not_mutated(mode: str) -> None:
    torch.manual_seed(0)
    model = Stateful().train()
    with torch.no_grad():
        model(torch.randn(16, 64))  # non-trivial running stats
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    ndcompile.convert(model, torch.randn(16, 64), mode=mode, **MODES[mode])
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert [m.training for m in model.modules()] == flags


def test_nan_example_is_reported_and_nan_conversion_refused() -> None:
    model = nn.Sequential(nn.Linear(64, 64))
    x = torch.full((2, 64), float("nan"))
    converted = ndcompile.convert(model, x, mode="adapter")
    assert any("NaN or inf" in n for n in converted.report.notes)
    huge = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(NdCompileError, match="NaN or inf"):
        ndcompile.convert(
            huge, torch.randn(2, 64) * 1e6, mode="adapter", zero_init=False, alpha=1e38
        )


def test_root_and_layer_hooks_survive() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    calls: list[str] = []
    model.register_forward_hook(lambda m, i, o: calls.append("root"))
    model[0].register_forward_pre_hook(lambda m, i: calls.append("fc0"))
    converted = ndcompile.convert(model, torch.randn(2, 64), mode="fresh")
    assert isinstance(converted[0], NdLinear)
    calls.clear()
    converted(torch.randn(3, 64))
    assert calls == ["fc0", "root"]
    assert any("kept 1 forward pre hooks" in n for n in converted.report.notes)


def test_flattened_image_modes_come_from_the_graph() -> None:
    class ImageMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8 * 8 * 3, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(x, 1))

    converted = ndcompile.convert(ImageMLP(), torch.randn(2, 8, 8, 3), mode="fresh")
    entry = converted.report.layer("fc")
    assert entry.in_shape == (8, 8, 3) and entry.mode_source == "graph"


def test_rebuild_installs_the_recorded_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    x = torch.randn(4, 64)
    converted = ndcompile.convert(model, x, mode="factorize", rank={"0": 2, "2": 1})
    specs = layer_specs(converted)
    assert [s["name"] for s in specs] == ["0", "2"] and specs[0]["rank"] == 2
    rebuilt = rebuild_layers(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)), specs)
    rebuilt.load_state_dict(converted.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), converted(x))
    bad = [{**specs[0], "in_shape": [8, 9]}]
    with pytest.raises(NdCompileError, match=r"\[0\] recorded modes"):
        rebuild_layers(nn.Sequential(nn.Linear(64, 64)), bad)


def test_example_input_forms() -> None:
    x = torch.zeros(2, 3)
    assert example_inputs(x).args == (x,)
    assert example_inputs((x, x)).args == (x, x)
    assert example_inputs({"a": x}).kwargs == {"a": x}
    both = example_inputs(((x,), {"a": x}))
    assert both.args == (x,) and both.kwargs == {"a": x}
    assert example_inputs({"ids": x.long()}).describe() == "{'ids': (2, 3) int64}"
    with pytest.raises(NdCompileError, match="string keys"):
        example_inputs({1: x})


def test_torchscript_model_is_refused() -> None:
    scripted = torch.jit.script(nn.Sequential(nn.Linear(64, 64)))
    with pytest.raises(NdCompileError, match="TorchScript module"):
        ndcompile.convert(scripted, torch.randn(2, 64))


@pytest.mark.parametrize("kind", ["legacy", "parametrization"])
def test_reparametrized_weights_are_skipped_with_the_reason(kind: str) -> None:
    norm = nn.utils.weight_norm if kind == "legacy" else nn.utils.parametrizations.weight_norm
    model = nn.Sequential(norm(nn.Linear(64, 64)), nn.ReLU(), nn.Linear(64, 64))
    converted = ndcompile.convert(model, torch.randn(2, 64), mode="fresh")
    entry = converted.report.layer("0")
    assert entry.status == "skipped" and "weight is computed by" in entry.reason
    assert converted.report.layer("2").status == "converted"


def test_save_to_a_missing_folder_is_a_clear_error(tmp_path) -> None:
    converted = ndcompile.convert(nn.Sequential(nn.Linear(64, 64)), torch.randn(2, 64))
    with pytest.raises(NdCompileError, match="does not exist"):
        ndcompile.save(converted, tmp_path / "missing" / "m.safetensors")


def test_dropout_in_train_mode_does_not_fail_exact_verification() -> None:
    ndlinear = pytest.importorskip("ndlinear")
    model = nn.Sequential(
        nn.Dropout(0.5), ndlinear.NdLinear((8, 8), (4, 4)), nn.Flatten(), nn.Linear(16, 16)
    ).train()
    x = torch.randn(3, 8, 8)
    for output in ("graph", "module"):
        converted = ndcompile.convert(model, x, mode="exact", output=output)
        assert converted.report.output_rel_error <= 1e-5


def test_untraceable_model_saves_and_loads(tmp_path) -> None:
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.fc1(x)) if x.sum().item() > -1e9 else x

    x = torch.randn(4, 64)
    converted = ndcompile.convert(Gate(), x, mode="factorize", rank=2)
    assert {e.name for e in converted.report.converted} == {"fc1", "fc2"}
    restored = ndcompile.load(ndcompile.save(converted, tmp_path / "g.safetensors"), Gate())
    with torch.no_grad():
        assert torch.equal(restored(x), converted(x))


def test_progress_bar_counts_the_fitted_layers(capsys) -> None:
    pytest.importorskip("tqdm")
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    ndcompile.convert(model, torch.randn(2, 64), mode="factorize", rank=1, progress=True)
    err = capsys.readouterr().err
    assert "factorize layers" in err and "/2 [" in err  # total: the 2 layers fitted
    ndcompile.convert(model, torch.randn(2, 64), mode="factorize", rank=1)
    assert "factorize layers" not in capsys.readouterr().err


class _Experts(nn.Module):
    """Fused expert weights (E, out, in), applied with einsum: not a Linear-like layer."""

    def __init__(self, experts: int, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, features, features) / features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,eoi->bo", x, self.weight)


def test_stacked_weights_are_named_in_the_report() -> None:
    model = nn.Sequential(nn.Linear(16, 16), _Experts(8, 16))
    converted = ndcompile.convert(model, torch.randn(4, 16), mode="fresh")
    notes = [n for n in converted.report.notes if "3-D weights" in n]
    assert len(notes) == 1 and notes[0].startswith("88% of the parameters")  # 2,048 of 2,320
    assert "1.weight" in notes[0]
    assert stacked_weights_note(nn.Sequential(nn.Linear(16, 16), nn.Conv1d(4, 4, 3))) is None
    assert stacked_weights_note(nn.Sequential(nn.Linear(64, 64), _Experts(1, 8))) is None
    shared = _Experts(8, 16)
    twice = stacked_weights_note(nn.Sequential(nn.Linear(16, 16), shared, shared))
    assert twice is not None and twice.startswith("88% of the parameters")  # counted once


def test_mixtral_experts_are_named_in_the_report() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=1,
        vocab_size=100,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = transformers.MixtralModel(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    converted = ndcompile.convert(model, {"input_ids": ids}, mode="fresh", rank=1)
    assert any("layers.0.mlp.experts.gate_up_proj" in n for n in converted.report.notes)
    assert {e.name for e in converted.report.converted} >= {"layers.0.self_attn.q_proj"}
