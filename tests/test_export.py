"""Tests for ndcompile.export: ONNX export verified in onnxruntime."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.fx as fx
from torch import nn

import ndcompile
from ndcompile.backends import onnx as export_mod
from ndcompile.backends.onnx import ExportReport, export_onnx, run_onnxruntime, time_onnxruntime
from ndcompile.errors import NdCompileError
from ndcompile.layers.ndlinear import NdLinear

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


class ImageMLP(nn.Module):
    """fc1 sees flattened (8, 8, 4) inputs; fc2 gets factored modes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8 * 8 * 4, 128)
        self.fc2 = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class NdModel(nn.Module):
    """NdLinear layers with a full bias plus low-rank residual, and per-mode biases."""

    def __init__(self) -> None:
        super().__init__()
        self.a = NdLinear((4, 6), (6, 8), rank=2, lowrank=2)
        nn.init.normal_(self.a.lowrank_u, std=0.3)  # starts at zero; make it count
        self.b = NdLinear((6, 8), (4, 4), bias="modes")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class EinsumModel(nn.Module):
    """A contraction written as one einsum: exports as an Einsum node."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,ij->bj", x, self.w)


CONVERSIONS = {
    "fresh": (ImageMLP, (4, 8, 8, 4), {"mode": "fresh"}),
    # Two modes per layer keep the fit a fast SVD (three modes need iterative CP-ALS).
    "factorize": (
        ImageMLP,
        (4, 8, 8, 4),
        {"mode": "factorize", "rank": 2, "shapes": {"fc1": ((16, 16), (8, 16))}},
    ),
    "exact": (NdModel, (4, 4, 6), {"mode": "exact"}),
}


def _converted(name: str) -> tuple[fx.GraphModule, torch.Tensor]:
    make, shape, kwargs = CONVERSIONS[name]
    torch.manual_seed(0)
    x = torch.randn(*shape)
    return ndcompile.convert(make(), x, output="graph", **kwargs), torch.randn(*shape)


@pytest.fixture(scope="module", params=["fresh", "factorize"])
def exported(request: Any, tmp_path_factory: Any) -> tuple[fx.GraphModule, torch.Tensor, Any]:
    gm, x = _converted(request.param)
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    return gm, x, export_onnx(gm, x, path)


def _reference(gm: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return gm(x).numpy()


def test_exported_file_matches_pytorch_at_any_batch(exported: tuple) -> None:
    gm, x, report = exported
    assert isinstance(report, ExportReport)
    assert report.exporter == "dynamo"
    assert report.path.is_file()
    assert report.max_abs_error < 1e-4
    assert report.batch_sizes == [x.shape[0], x.shape[0] + 1]
    for batch in (1, 7):
        xb = torch.randn(batch, *x.shape[1:])
        (got,) = run_onnxruntime(report.path, xb)
        assert got.shape == (batch, *_reference(gm, xb).shape[1:])
        np.testing.assert_allclose(got, _reference(gm, xb), rtol=1e-4, atol=1e-4)


def _input_free_sizes(gm: fx.GraphModule, x: torch.Tensor) -> list[int]:
    """Sizes of the values ``gm`` computes from its weights alone (constant-foldable)."""
    dependent: set[fx.Node] = set()
    sizes: list[int] = []

    class Tracker(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.op == "placeholder" or any(a in dependent for a in n.all_input_nodes):
                dependent.add(n)
            elif isinstance(out, torch.Tensor):
                sizes.append(out.numel())
            return out

    with torch.no_grad():
        Tracker(gm).run(x)
    return sizes


def test_factorization_survives_export(exported: tuple) -> None:
    gm, x, report = exported
    proto = onnx.load(str(report.path))
    assert report.op_histogram == export_mod.onnx_op_histogram(proto)
    assert "Einsum" not in report.op_histogram
    assert report.op_histogram.get("MatMul", 0) >= 2
    layers = [m for m in gm.modules() if isinstance(m, NdLinear)]
    assert len(layers) == 2
    sizes = [math.prod(init.dims) for init in proto.graph.initializer]
    # Constant folding may only precompute what the graph computes from weights alone
    # (parameters, their reshapes, weight-only products the plan forms) ...
    assert max(sizes) <= max(_input_free_sizes(gm, x))
    # ... and no dense weight is materialised.
    dense = [layer.in_features * layer.out_features for layer in layers]
    assert max(sizes) < min(dense)
    assert sum(sizes) < sum(dense) / 8
    assert report.opset >= 18


def test_static_batch_export_of_exact_conversion(tmp_path: Path) -> None:
    gm, x = _converted("exact")
    report = export_onnx(gm, x, tmp_path / "static.onnx", dynamic_batch=False, opset=18)
    assert report.exporter == "dynamo"
    assert report.batch_sizes == [x.shape[0]]
    assert report.opset == 18
    assert "Einsum" not in report.op_histogram
    proto = onnx.load(str(report.path))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == list(x.shape)
    (got,) = run_onnxruntime(report.path, x)
    np.testing.assert_allclose(got, _reference(gm, x), rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        run_onnxruntime(report.path, torch.randn(1, *x.shape[1:]))


def _no_dynamo(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("dynamo export unavailable in this test")


def test_torchscript_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_mod, "_export_dynamo", _no_dynamo)
    gm, x = _converted("factorize")
    report = export_onnx(gm, x, tmp_path / "ts.onnx")
    assert report.exporter == "torchscript"
    assert any("dynamo exporter failed" in note and "RuntimeError" in note for note in report.notes)
    assert "Einsum" not in report.op_histogram
    for batch in (1, 7):
        xb = torch.randn(batch, *x.shape[1:])
        (got,) = run_onnxruntime(report.path, xb)
        np.testing.assert_allclose(got, _reference(gm, xb), rtol=1e-4, atol=1e-4)


def test_einsum_is_refused_unless_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_mod, "_export_dynamo", _no_dynamo)
    model, x = EinsumModel(), torch.randn(3, 6)
    path = tmp_path / "einsum.onnx"
    with pytest.raises(NdCompileError, match="Einsum"):
        export_onnx(model, x, path)
    assert not path.exists()
    report = export_onnx(model, x, path, allow_einsum=True)
    assert report.op_histogram["Einsum"] == 1
    assert any("Einsum" in note for note in report.notes)


def test_wrong_result_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_mod, "_export_dynamo", _no_dynamo)
    real = export_mod._outputs
    monkeypatch.setattr(export_mod, "_outputs", lambda m, i: [t + 1.0 for t in real(m, i)])
    gm, x = _converted("fresh")
    path = tmp_path / "wrong.onnx"
    with pytest.raises(NdCompileError, match="onnxruntime disagrees"):
        export_onnx(gm, x, path)
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    gm, x = _converted("fresh")
    with pytest.raises(NdCompileError, match=r'pip install -e "\.\[onnx\]"'):
        export_onnx(gm, x, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs(tmp_path: Path) -> None:
    gm, _ = _converted("fresh")
    with pytest.raises(NdCompileError, match="tensors"):
        export_onnx(gm, "not a tensor", tmp_path / "m.onnx")
    with pytest.raises(NdCompileError, match="directory"):
        export_onnx(gm, torch.randn(2, 8, 8, 4), tmp_path / "missing" / "m.onnx")


def test_export_leaves_the_model_in_training_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_mod, "_export_dynamo", _no_dynamo)
    gm, x = _converted("fresh")
    gm.train()
    export_onnx(gm, x, tmp_path / "m.onnx")
    assert gm.training


def test_time_onnxruntime(exported: tuple) -> None:
    _, x, report = exported
    ms = time_onnxruntime(report.path, x, iters=5)
    assert isinstance(ms, float) and ms > 0
