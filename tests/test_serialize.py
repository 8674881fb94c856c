"""Tests for ndcompile.serialize: safetensors save/load of converted models."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx as fx
from safetensors.torch import load_file, save_file
from torch import nn

import ndcompile
from ndcompile.backends.saved_metadata import FORMAT_VERSION, METADATA_KEY, read_metadata
from ndcompile.backends.serialize import load, save
from ndcompile.errors import NdCompileError
from ndcompile.layers.ndlinear import NdLinear

from reliability_models import SmallUntraceable


class ImageMLP(nn.Module):
    """fc1 gets graph modes (4, 6, 2); fc2 is factored; head is too small to convert."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4 * 6 * 2, hidden)
        self.fc2 = nn.Linear(hidden, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.head(torch.relu(self.fc2(h)))


class NdModel(nn.Module):
    """NdLinear layers of each bias kind, one with a low-rank residual (exact mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = NdLinear((4, 6), (5, 3), rank=2, lowrank=2)
        nn.init.normal_(self.a.lowrank_u, std=0.3)  # starts at zero; make it count
        self.b = NdLinear((5, 3), (4, 4), bias="modes")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class Tied(nn.Module):
    """Two Linears sharing one weight (kept dense) and one converted Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(32, 32)
        self.dec = nn.Linear(32, 32)
        self.dec.weight = self.enc.weight
        self.mid = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.relu(self.mid(self.enc(x))))


def _make(kind: str) -> nn.Module:
    return {"mlp": ImageMLP, "nd": NdModel, "tied": Tied}[kind]()


EXAMPLES = {
    "mlp": lambda: torch.randn(5, 4, 6, 2),
    "nd": lambda: torch.randn(5, 4, 6),
    "tied": lambda: torch.randn(5, 32),
}

#: Two modes keep the factorize fit a fast SVD (three modes need iterative CP-ALS).
FC1_TWO_MODES = {"fc1": ((8, 6), (4, 8))}

ROUND_TRIPS = [
    ("mlp", {"mode": "fresh"}),
    ("mlp", {"mode": "fresh", "rank": 3}),
    ("mlp", {"mode": "factorize", "rank": 2, "shapes": FC1_TWO_MODES}),
    ("nd", {"mode": "exact"}),
    ("tied", {"mode": "fresh", "rank": 2}),
]


def _convert(kind: str, **kwargs: Any) -> tuple[fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model, x = _make(kind), EXAMPLES[kind]()
    return ndcompile.convert(model, x, output="graph", **kwargs), x


@pytest.mark.parametrize(("kind", "kwargs"), ROUND_TRIPS)
def test_round_trip_equals(tmp_path: Path, kind: str, kwargs: dict[str, Any]) -> None:
    gm, x = _convert(kind, **kwargs)
    path = save(gm, tmp_path / "model.safetensors")
    torch.manual_seed(123)  # the architecture's own weights differ from the saved ones
    restored = load(path, _make(kind))
    with torch.no_grad():
        assert torch.allclose(restored(x), gm(x), rtol=1e-6, atol=1e-6)
        other = torch.cat([x, x[:2]])
        assert torch.allclose(restored(other), gm(other), rtol=1e-6, atol=1e-6)
    want, got = gm.state_dict(), restored.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert restored.report.mode == kwargs["mode"]
    assert [e.name for e in restored.report.converted] == [e.name for e in gm.report.converted]
    for name, layer in gm.named_modules():
        if isinstance(layer, NdLinear):
            twin = restored.get_submodule(name)
            assert (twin.in_shape, twin.out_shape, twin.rank, twin.bias_kind) == (
                layer.in_shape,
                layer.out_shape,
                layer.rank,
                layer.bias_kind,
            )


def test_metadata_describes_every_layer(tmp_path: Path) -> None:
    gm, x = _convert("mlp", mode="factorize", rank=2, optimizer="greedy", shapes=FC1_TWO_MODES)
    meta = read_metadata(save(gm, tmp_path / "m.safetensors"))
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["ndcompile_version"] == ndcompile.__version__
    assert meta["mode"] == "factorize"
    assert meta["example_inputs"] == [{"shape": list(x.shape), "dtype": "float32"}]
    layers = {entry["name"]: entry for entry in meta["layers"]}
    assert sorted(layers) == ["fc1", "fc2"]
    fc1 = gm.get_submodule("fc1")
    assert layers["fc1"] == {
        "name": "fc1",
        "in_shape": list(fc1.in_shape),
        "out_shape": list(fc1.out_shape),
        "rank": 2,
        "bias": "full",
        "lowrank": 0,
        "optimizer": "greedy",
        "converted": True,
    }
    assert layers["fc1"]["in_shape"] == [8, 6]


def test_save_refuses_modes_it_cannot_rebuild(tmp_path: Path) -> None:
    gm, _ = _convert("mlp", mode="fresh")
    gm.report.mode = "adapter"
    with pytest.raises(NdCompileError, match="adapter_state_dict"):
        save(gm, tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())


def test_save_refuses_a_plain_module(tmp_path: Path) -> None:
    with pytest.raises(NdCompileError, match=r"ndcompile\.convert"):
        save(fx.symbolic_trace(nn.Linear(4, 4)), tmp_path / "x.safetensors")


def _rewrite(path: Path, edit: Callable[[dict, dict], None]) -> Path:
    """Copy ``path`` with its tensors and metadata changed by ``edit(tensors, meta)``."""
    meta = read_metadata(path)
    tensors = load_file(str(path))
    edit(tensors, meta)
    out = path.with_name("edited.safetensors")
    save_file(tensors, str(out), metadata={METADATA_KEY: json.dumps(meta)})
    return out


def _layer(meta: dict, name: str) -> dict:
    return next(entry for entry in meta["layers"] if entry["name"] == name)


def _set_version(t: dict, m: dict) -> None:
    m["format_version"] = 99


def _swap_modes(t: dict, m: dict) -> None:
    _layer(m, "fc1")["in_shape"] = [6, 4, 2]


def _drop_bias(t: dict, m: dict) -> None:
    del t["fc1.bias"]


def _drop_other(t: dict, m: dict) -> None:
    del t["head.weight"]


def _mixed_ranks(t: dict, m: dict) -> None:
    t["fc2.factors.0"] = torch.cat([t["fc2.factors.0"]] * 2)
    t["fc2.factors.1"] = torch.cat([t["fc2.factors.1"]] * 2)
    _layer(m, "fc2")["rank"] = 2


def _add_lowrank(t: dict, m: dict) -> None:
    t["fc2.lowrank_u"], t["fc2.lowrank_v"] = torch.zeros(24, 1), torch.zeros(1, 32)
    _layer(m, "fc2")["lowrank"] = 1


def _bad_bias_kind(t: dict, m: dict) -> None:
    _layer(m, "fc2")["bias"] = "sometimes"


TAMPERED = [
    (_set_version, "format version 99"),
    (_swap_modes, r"fc1\.factors\.0.*has shape"),
    (_drop_bias, r"tensor 'fc1\.bias' is missing"),
    (_drop_other, r"missing tensors \['head\.weight'\]"),
    (_add_lowrank, "low-rank residual"),
    (_bad_bias_kind, "unknown bias kind"),
]


@pytest.mark.parametrize(("edit", "message"), TAMPERED, ids=[t[0].__name__ for t in TAMPERED])
def test_tampered_files_give_clear_errors(
    tmp_path: Path, edit: Callable[[dict, dict], None], message: str
) -> None:
    gm, _ = _convert("mlp", mode="fresh")
    path = _rewrite(save(gm, tmp_path / "m.safetensors"), edit)
    with pytest.raises(NdCompileError, match=message):
        load(path, ImageMLP())


def test_per_layer_ranks_load(tmp_path: Path) -> None:
    gm, _ = _convert("mlp", mode="fresh")
    path = _rewrite(save(gm, tmp_path / "m.safetensors"), _mixed_ranks)
    restored = load(path, ImageMLP())
    assert restored.get_submodule("fc2").rank == 2
    assert restored.get_submodule("fc1").rank == 1


def test_unedited_rewrite_loads(tmp_path: Path) -> None:
    gm, x = _convert("mlp", mode="fresh")
    path = _rewrite(save(gm, tmp_path / "m.safetensors"), lambda t, m: None)
    assert torch.allclose(load(path, ImageMLP())(x), gm(x))


def test_wrong_architecture(tmp_path: Path) -> None:
    gm, _ = _convert("mlp", mode="fresh")
    path = save(gm, tmp_path / "m.safetensors")
    with pytest.raises(NdCompileError, match="cannot rebuild the saved conversion"):
        load(path, ImageMLP(hidden=48))
    with pytest.raises(NdCompileError, match="same model architecture"):
        load(path, Tied(), example_input=torch.randn(2, 32))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (None, "not written by ndcompile.save"),
        ("{not json", "not valid JSON"),
        (json.dumps({"format": "other"}), "metadata format"),
    ],
)
def test_foreign_files(tmp_path: Path, payload: str | None, message: str) -> None:
    path = tmp_path / "foreign.safetensors"
    metadata = None if payload is None else {METADATA_KEY: payload}
    save_file({"w": torch.zeros(2)}, str(path), metadata=metadata)
    with pytest.raises(NdCompileError, match=message):
        load(path, ImageMLP())


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(NdCompileError, match="no such file"):
        load(tmp_path / "absent.safetensors", ImageMLP())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not safetensors")
    with pytest.raises(NdCompileError, match="not a readable safetensors file"):
        load(junk, ImageMLP())


def test_load_does_not_touch_the_model(tmp_path: Path) -> None:
    gm, _ = _convert("mlp", mode="fresh")
    path = save(gm, tmp_path / "m.safetensors")
    model = ImageMLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load(path, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.fc1) is nn.Linear
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left


def test_partially_converted_save_needs_the_example(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 32)
    gm = ndcompile.convert(SmallUntraceable(), x, mode="fresh", rank=2, output="graph")
    assert not isinstance(gm, fx.GraphModule)
    with pytest.raises(NdCompileError, match="example_input"):
        save(gm, tmp_path / "p.safetensors")
    meta = read_metadata(save(gm, tmp_path / "p.safetensors", example_input=x))
    assert meta["example_inputs"] == [{"shape": [3, 32], "dtype": "float32"}]
    assert [entry["name"] for entry in meta["layers"]] == ["block.fc"]


def test_partially_converted_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 32)
    gm = ndcompile.convert(SmallUntraceable(), x, mode="fresh", rank=2, output="graph")
    path = save(gm, tmp_path / "p.safetensors", example_input=x)
    restored = load(path, SmallUntraceable())
    assert type(restored) is SmallUntraceable
    assert isinstance(restored.get_submodule("block.fc"), NdLinear)
    with torch.no_grad():
        assert torch.allclose(restored(x), gm(x), atol=1e-6)


def test_tied_weights_are_written_once_and_stay_tied(tmp_path: Path) -> None:
    gm, x = _convert("tied", mode="fresh", rank=2)
    path = save(gm, tmp_path / "m.safetensors")
    written = load_file(str(path))
    aliases = read_metadata(path)["aliases"]
    assert len(aliases) == 1
    ((alias, key),) = aliases.items()
    assert {alias, key} == {"enc.weight", "dec.weight"}
    assert alias not in written and key in written
    restored = load(path, Tied())
    assert restored.get_submodule("dec").weight is restored.get_submodule("enc").weight
    assert torch.equal(restored(x), gm(x))


def test_version_1_files_without_aliases_load(tmp_path: Path) -> None:
    """Files of format version 1 wrote every tied tensor itself and had no aliases."""
    gm, x = _convert("tied", mode="fresh", rank=2)

    def as_version_1(t: dict, m: dict) -> None:
        for alias, key in m.pop("aliases").items():
            t[alias] = t[key].clone()
        m["format_version"] = 1

    path = _rewrite(save(gm, tmp_path / "m.safetensors"), as_version_1)
    assert torch.equal(load(path, Tied())(x), gm(x))


def test_an_alias_to_nothing_is_a_clear_error(tmp_path: Path) -> None:
    gm, _ = _convert("tied", mode="fresh", rank=2)

    def broken(t: dict, m: dict) -> None:
        m["aliases"] = {"dec.weight": "no.such.tensor"}

    path = _rewrite(save(gm, tmp_path / "m.safetensors"), broken)
    with pytest.raises(NdCompileError, match="does not name a written tensor"):
        load(path, Tied())


def test_module_output_with_tied_embedding_round_trips(tmp_path: Path) -> None:
    """A module-surgery conversion whose head is tied to its embedding (GPT-2 style)."""

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            self.mix = nn.Linear(32, 64)
            self.back = nn.Linear(64, 32)
            self.head = nn.Linear(32, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.back(torch.relu(self.mix(self.emb(ids)))))

    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 7))
    converted = ndcompile.convert(TiedLM(), ids, mode="fresh")
    path = save(converted, tmp_path / "m.safetensors", example_input=ids)
    assert read_metadata(path)["aliases"] == {"head.weight": "emb.weight"}
    restored = load(path, TiedLM(), ids)
    assert restored.head.weight is restored.emb.weight
    assert torch.equal(restored(ids), converted(ids))
