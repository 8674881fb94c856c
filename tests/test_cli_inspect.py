"""Tests of ``ndcompile inspect``: a model's plan, and ``.pt2`` files that would run code."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import ndcompile
from ndcompile.cli.loading import build_model
from ndcompile.cli.main import EXIT_USAGE, main

from cli_helpers import SHAPE, SHAPE_ARG, TINY


def test_inspect_plan_matches_convert(capsys: pytest.CaptureFixture) -> None:
    args = ["--example-shape", SHAPE_ARG, "--mode", "factorize", "--rank", "2", "--json"]
    assert main(["inspect", TINY, *args]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["layers"]}
    model = build_model(TINY)
    report = ndcompile.convert(model, torch.randn(SHAPE), mode="factorize", rank=2).report
    for entry in report.layers:
        row = rows[entry.name]
        assert row["action"] == ("convert" if entry.status == "converted" else "skip")
        if entry.status == "converted":
            assert tuple(row["in_shape"]) == entry.in_shape
            assert tuple(row["out_shape"]) == entry.out_shape
            assert row["params_after"] == entry.params_after
            assert row["flops_after"] == entry.flops_after
        assert row["flops_before"] == entry.flops_before
        assert row["params_before"] == entry.params_before
    assert "too small" in rows["fc2"]["reason"]


# --------------------------------------------------- .pt2 files that would run code
class CreatesFile:
    """Unpickling this object creates ``path``: proof that a payload ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def pickled_payload(canary: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(CreatesFile(canary), buffer)
    return buffer.getvalue()


def rewrite_archive(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None]) -> None:
    """Copy a zip archive, passing each record (name without the root folder) through ``edit``.

    ``edit`` returns the new content, or ``None`` to drop the record; it is also asked
    for the records ``"<extra>"`` (native code) and ``"<constant>"`` (an opaque constant)
    to add.
    """
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            data = edit(info.filename.split("/", 1)[1], zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
        extra = edit("<extra>", b"")
        if extra:
            zout.writestr(f"{root}/data/aotinductor/model/model.so", extra)
        constant = edit("<constant>", b"")
        if constant:
            zout.writestr(f"{root}/data/constants/opaque_obj_0", constant)


@pytest.fixture(scope="module")
def good_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small exported program with a dynamic batch dim (so it has shape expressions)."""
    path = tmp_path_factory.mktemp("pt2") / "good.pt2"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def _pickled_weight(canary: Path) -> Callable[[str, bytes], bytes | None]:
    def edit(name: str, data: bytes) -> bytes | None:
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        if name == "data/weights/weight_0":
            return pickled_payload(canary)
        return data

    return edit


def _pickled_sample_inputs(canary: Path) -> Callable[[str, bytes], bytes | None]:
    return lambda name, data: pickled_payload(canary) if name.startswith("data/sample_") else data


def _eval_in_shape_expression(canary: Path) -> Callable[[str, bytes], bytes | None]:
    def edit(name: str, data: bytes) -> bytes | None:
        if name == "models/model.json":
            marker = b'"expr_str": "Symbol('
            assert marker in data
            return data.replace(
                marker, f"\"expr_str\": \"open('{canary}', 'w') and Symbol(".encode()
            )
        return data

    return edit


def _pickled_constant(canary: Path) -> Callable[[str, bytes], bytes | None]:
    def edit(name: str, data: bytes) -> bytes | None:
        if name.endswith("_constants_config.json"):
            meta = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                    "tensor_meta": None}  # fmt: skip
            return json.dumps({"config": {"lut": meta}}).encode()
        return data

    def add(name: str, data: bytes) -> bytes | None:
        if name == "<constant>":
            return pickle.dumps(CreatesFile(canary))
        return None if name == "<extra>" else edit(name, data)

    return add


def _native_code(canary: Path) -> Callable[[str, bytes], bytes | None]:
    return lambda name, data: b"\x7fELF" if name == "<extra>" else data


def _legacy_format(canary: Path) -> Callable[[str, bytes], bytes | None]:
    return lambda name, data: None if name == "archive_version" else data


CRAFTED = {
    "pickled weight": (_pickled_weight, "weight '0.weight' is pickled"),
    "pickled sample inputs": (_pickled_sample_inputs, "sample inputs need arbitrary unpickling"),
    "eval in a shape expression": (_eval_in_shape_expression, "not plain arithmetic"),
    "pickled constant": (_pickled_constant, "constant 'lut' is pickled"),
    "native code": (_native_code, "contains native code"),
    "legacy format": (_legacy_format, "not in the current .pt2 format"),
}


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_inspect_refuses_pt2_that_would_run_code(
    good_pt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture, kind: str
) -> None:
    make_edit, reason = CRAFTED[kind]
    canary = tmp_path / "payload-ran"
    crafted = tmp_path / "crafted.pt2"
    rewrite_archive(good_pt2, crafted, make_edit(canary))
    code = main(["inspect", str(crafted)])
    err = capsys.readouterr().err
    assert not canary.exists(), "the payload ran"
    assert code == EXIT_USAGE, err
    assert err.startswith("ndcompile: error: ") and err.count("\n") == 1, err
    assert "refused for safety" in err and reason in err, err


def test_safe_pt2_still_loads(good_pt2: Path, capsys: pytest.CaptureFixture) -> None:
    from ndcompile.cli.archive import load_exported_program, unsafe_reasons

    with open(good_pt2, "rb") as handle:
        assert unsafe_reasons(handle) == []
    program = load_exported_program(good_pt2)
    torch.testing.assert_close(program.module()(torch.ones(5, 4)).shape, torch.Size([5, 3]))
    assert main(["inspect", str(good_pt2)]) == 0
    assert "aten.linear.default" in capsys.readouterr().out


def test_not_an_archive_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "junk.pt2"
    path.write_bytes(b"not a zip file")
    assert main(["inspect", str(path)]) == EXIT_USAGE
    assert "not a .pt2 archive" in capsys.readouterr().err
