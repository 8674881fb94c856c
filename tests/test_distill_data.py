"""ndcompile.distill at its defaults, on the data users have, on both kinds of converted model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import ndcompile
from ndcompile.compress.distill import distill
from ndcompile.errors import NdCompileError
from ndcompile.layers.ndlinear import NdLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits_ndlinear import DigitsMLP, accuracy, digits_split, train

sys.path.pop(0)


@pytest.fixture(scope="module")
def digits() -> dict:
    """The README's digits MLP (64 -> 256 -> 256 -> 10), trained 40 epochs, seed 0."""
    x_tr, y_tr, x_te, y_te = digits_split(0)
    torch.manual_seed(0)
    model = DigitsMLP(256)
    train(model, x_tr, y_tr, epochs=40, seed=0)
    return {"model": model, "x_tr": x_tr, "y_tr": y_tr, "x_te": x_te, "y_te": y_te}


def test_defaults_recover_rank_one(digits: dict) -> None:
    """Rank 1 costs ~88 points; distill(converted, model, rows) at its defaults gives them back."""
    dense, x_tr, x_te, y_te = digits["model"], digits["x_tr"], digits["x_te"], digits["y_te"]
    converted = ndcompile.convert(dense, x_tr[:8], mode="factorize", rank=1)
    assert isinstance(converted, DigitsMLP) and isinstance(converted.fc2, NdLinear)
    dense_acc, converted_acc = accuracy(dense, x_te, y_te), accuracy(converted, x_te, y_te)
    report = distill(converted, dense, x_tr, progress=False)  # a raw tensor of rows
    final = accuracy(converted, x_te, y_te)
    assert converted_acc < dense_acc - 0.5
    assert final >= dense_acc - 0.02, (dense_acc, final, str(report))
    whole = report.whole_model
    assert whole is not None and whole.loss == "kl" and "head" in whole.loss_reason
    assert "head" in whole.trained  # the layer left dense was trained too
    assert whole.trained_params == sum(p.numel() for p in converted.parameters())
    assert whole.agreement_after is not None and whole.agreement_after > 0.95
    assert whole.stop_reason and whole.budget and whole.steps > 0
    assert [e.status for e in report.layers] == ["fitted", "fitted"]
    assert report.data.startswith("tensor (1347, 8, 8)") and "11 batches" in report.data


def _small(digits: dict, output: str = "module") -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dense = DigitsMLP(32)
    train(dense, digits["x_tr"], digits["y_tr"], epochs=3)
    return dense, ndcompile.convert(
        dense, digits["x_tr"][:8], mode="factorize", rank=1, output=output
    )


def _data(kind: str, x: Tensor, y: Tensor) -> object:
    if kind == "tensor":
        return x
    if kind == "list":
        return list(x.split(100))
    if kind == "generator":
        return (b for b in x.split(100))
    if kind == "loader (inputs, targets)":
        return DataLoader(TensorDataset(x, y), batch_size=100)
    if kind == "loader inputs":
        return DataLoader(TensorDataset(x), batch_size=100)
    if kind == "dict batches":
        return [{"x": b} for b in x.split(100)]
    return [((b,), {}) for b in x.split(100)]  # (args, kwargs)


FORMATS = {
    "tensor": "tensor",
    "list": "tensor",
    "generator": "tensor",
    "loader (inputs, targets)": "(inputs, targets)",
    "loader inputs": "positional inputs",
    "dict batches": "dict",
    "(args, kwargs)": "(args, kwargs)",
}


@pytest.mark.parametrize("kind", list(FORMATS))
def test_data_forms(digits: dict, kind: str) -> None:
    dense, converted = _small(digits)
    data = _data(kind, digits["x_tr"], digits["y_tr"])
    report = distill(converted, dense, data, steps=20, whole_model_steps=20, progress=False)
    assert FORMATS[kind] in report.data
    assert all(e.rows_seen == len(digits["x_tr"]) for e in report.layers)
    whole = report.whole_model
    assert whole is not None and whole.steps == 20 and whole.loss_after < whole.loss_before


@pytest.mark.parametrize("output", ["module", "graph"])
def test_module_surgery_and_graph_outputs(digits: dict, output: str) -> None:
    dense, converted = _small(digits, output)
    assert isinstance(converted, nn.Module) and isinstance(converted.get_submodule("fc1"), NdLinear)
    x_te, y_te = digits["x_te"], digits["y_te"]
    before = accuracy(converted, x_te, y_te)
    report = distill(converted, dense, digits["x_tr"], whole_model_steps=300, progress=False)
    assert [e.name for e in report.layers] == ["fc1", "fc2"]
    assert accuracy(converted, x_te, y_te) > before + 0.3


def test_targets_give_an_optional_task_loss(digits: dict) -> None:
    dense, converted = _small(digits)
    loader = DataLoader(TensorDataset(digits["x_tr"], digits["y_tr"]), batch_size=100)
    report = distill(
        converted, dense, loader, whole_model_steps=20, task_weight=0.5, progress=False
    )
    assert report.whole_model is not None and report.whole_model.steps == 20
    floats = [(b, torch.randn(len(b))) for b in digits["x_tr"].split(100)]
    with pytest.raises(NdCompileError, match="task_weight needs class labels"):
        distill(converted, dense, floats, layerwise=False, task_weight=1.0, progress=False)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (3, "holds no input batches"),
        ("rows", "holds no input batches"),
        ([], "no batches"),
        ([torch.zeros(4, 8, 8)] * 3 + [3], "cannot read the batch"),
        ([(torch.zeros(4, 8, 8), torch.zeros(4), torch.zeros(4))] * 3, "cannot be called"),
        ([torch.zeros(4, 5)] * 3, "cannot be called"),
        ({"x": torch.zeros(4, 8, 8), "y": torch.zeros(3)}, "do not share"),
        (torch.tensor(1.0), "no rows"),
    ],
)
def test_bad_data_is_one_clear_error(digits: dict, data: object, match: str) -> None:
    dense, converted = _small(digits)
    with pytest.raises(NdCompileError, match=match):
        distill(converted, dense, data, progress=False)


def test_too_few_rows_keep_the_layer(digits: dict) -> None:
    """A reservoir of 16 rows for 64 inputs (or 8 held-out rows) cannot support a fit."""
    dense, converted = _small(digits)
    state = {k: v.clone() for k, v in converted.state_dict().items()}
    for rows, why in ((16, "16 training rows for 64 inputs"), (64, "8 held-out rows")):
        report = distill(
            converted, dense, digits["x_tr"], accumulate="reservoir", reservoir_rows=rows,
            whole_model=False, progress=False,
        )  # fmt: skip
        entry = report.layer("fc1")
        assert entry.status.startswith("kept: ") and why in entry.status
        assert entry.error_after == entry.error_before and entry.method == "none"
        assert all(torch.equal(v, converted.state_dict()[k]) for k, v in state.items())
    report = distill(
        converted, dense, digits["x_tr"], accumulate="reservoir", reservoir_rows=512,
        whole_model=False, progress=False,
    )  # fmt: skip
    assert report.layer("fc1").status == "fitted"
    assert report.layer("fc1").error_after < report.layer("fc1").error_before
