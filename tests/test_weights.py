"""Models on the meta device convert from their weights on disk (ndcompile.pipeline.weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_models import MODELS, build
from torch import nn

import ndcompile
from ndcompile.errors import NdCompileError
from ndcompile.pipeline.weights import Checkpoint, empty_weights, on_meta

safetensors = pytest.importorskip("safetensors.torch")


def _save(model: nn.Module, path: Path) -> Path:
    """The state_dict on disk, one name per storage (safetensors refuses shared tensors)."""
    seen: set[int] = set()
    unique = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            unique[name] = t.contiguous()
    if path.suffix == ".safetensors":
        safetensors.save_file(unique, str(path))
    else:
        torch.save(unique, path)
    return path


def _on_meta(name: str) -> nn.Module:
    with empty_weights():
        model = MODELS[name][0]()
    return model.eval()


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_meta_model_converts_from_disk_like_the_loaded_one(
    name: str, suffix: str, tmp_path: Path
) -> None:
    dense, example = build(name)
    path = _save(dense, tmp_path / f"model{suffix}")
    meta = _on_meta(name)
    assert on_meta(meta) and not any(b.is_meta for b in meta.buffers())
    in_memory = ndcompile.convert(dense, example, mode="factorize", rank=2)
    from_disk = ndcompile.convert(meta, example, mode="factorize", rank=2, weights=path)
    assert not on_meta(from_disk)
    assert [e.status for e in from_disk.report.layers] == [
        e.status for e in in_memory.report.layers
    ]
    with torch.no_grad():
        want, got = in_memory(**example), from_disk(**example)
    for key in ("last_hidden_state", "logits"):
        if key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    notes = " ".join(from_disk.report.notes)
    assert "weights read from" in notes and "not compared with the original" in notes
    assert on_meta(meta), "the user's model stays on the meta device"


def test_tied_weights_stay_tied(tmp_path: Path) -> None:
    dense, example = build("gpt2")
    path = _save(dense, tmp_path / "gpt2.safetensors")  # lm_head.weight is not stored
    converted = ndcompile.convert(_on_meta("gpt2"), example, mode="fresh", weights=path)
    assert converted.lm_head.weight is converted.transformer.wte.weight
    torch.testing.assert_close(converted.transformer.wte.weight, dense.transformer.wte.weight)


def test_adapter_mode_keeps_the_base_weights_from_disk(tmp_path: Path) -> None:
    dense, example = build("llama")
    path = _save(dense, tmp_path / "llama.safetensors")
    converted = ndcompile.convert(_on_meta("llama"), example, mode="adapter", weights=path)
    with torch.no_grad():
        torch.testing.assert_close(converted(**example).logits, dense(**example).logits)


@pytest.mark.parametrize("mode", ["factorize", "adapter"])
def test_meta_model_without_weights_is_refused(mode: str) -> None:
    _, example = build("llama")
    kwargs = {"rank": 1} if mode == "factorize" else {}
    with pytest.raises(NdCompileError, match=r"(?s)meta device.*weights='model\.safetensors'"):
        ndcompile.convert(_on_meta("llama"), example, mode=mode, **kwargs)


def test_fresh_meta_model_without_weights_stays_on_meta() -> None:
    _, example = build("llama")
    converted = ndcompile.convert(_on_meta("llama"), example, mode="fresh", verify=False)
    assert converted.model.embed_tokens.weight.is_meta


def test_weights_for_a_loaded_model_are_refused(tmp_path: Path) -> None:
    dense, example = build("llama")
    path = _save(dense, tmp_path / "llama.safetensors")
    with pytest.raises(NdCompileError, match="already holds its weights"):
        ndcompile.convert(dense, example, mode="fresh", weights=path)


def test_missing_and_misshaped_tensors_are_named(tmp_path: Path) -> None:
    dense, example = build("llama")
    state = dense.state_dict()
    missing = tmp_path / "missing.safetensors"
    safetensors.save_file(
        {k: v for k, v in state.items() if k != "model.norm.weight"}, str(missing)
    )
    with pytest.raises(NdCompileError, match=r"no tensor 'model\.norm\.weight'"):
        ndcompile.convert(_on_meta("llama"), example, mode="fresh", weights=missing)
    wrong = tmp_path / "wrong.safetensors"
    bad = dict(state, **{"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)})
    safetensors.save_file(bad, str(wrong))
    with pytest.raises(NdCompileError, match=r"up_proj.weight.*\(3, 3\).*\(128, 64\)"):
        ndcompile.convert(_on_meta("llama"), example, mode="factorize", rank=1, weights=wrong)


def test_buffers_on_meta_not_in_the_checkpoint_are_named(tmp_path: Path) -> None:
    dense, example = build("llama")
    path = _save(dense, tmp_path / "llama.safetensors")
    with torch.device("meta"):  # buffers too: the rotary frequencies are not in the file
        meta = MODELS["llama"][0]().eval()
    with pytest.raises(NdCompileError, match="inv_freq"):
        ndcompile.convert(meta, example, mode="fresh", weights=path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"output": "graph"}, "needs output='module'"),
        ({"mode": "factorize", "rank": 1, "calibration": [torch.zeros(1)]}, "calibration="),
    ],
)
def test_options_weights_cannot_serve_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(NdCompileError, match=match):
        ndcompile.ConvertOptions(**{"mode": "fresh", **kwargs, "weights": "m.safetensors"})


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("absent.safetensors", None, "does not exist"),
        ("model.txt", b"x", "is not .safetensors"),
        ("list.pt", [torch.zeros(1)], "does not hold a state_dict"),
    ],
)
def test_bad_weights_files(tmp_path: Path, name: str, content: object, match: str) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(NdCompileError, match=match):
        Checkpoint(path)


def test_safetensors_reader_matches_the_library(tmp_path: Path) -> None:
    from ndcompile.pipeline.weights import SafetensorsFile

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 4, generator=gen),
        "bf16": torch.randn(5, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(2, 2, generator=gen).half(),
        "f64": torch.randn(1, 3, 2, generator=gen, dtype=torch.float64),
        "i64": torch.arange(6).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "t.safetensors"
    safetensors.save_file(tensors, str(path), metadata={"format": "pt"})
    reader = SafetensorsFile(path)
    assert set(reader.header) == set(tensors)
    for name, want in tensors.items():
        got = reader.get_tensor(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name
    not_one = tmp_path / "fake.safetensors"
    not_one.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    with pytest.raises(NdCompileError, match="not a safetensors file"):
        Checkpoint(not_one)
