"""distill on models converted from tiny Hugging Face configs, on their own random tokens."""

from __future__ import annotations

import pytest
import torch

import ndcompile
from ndcompile.compress.distill import distill
from ndcompile.layers.ndlinear import NdLinear

hf_models = pytest.importorskip("hf_models")


@pytest.mark.parametrize(("name", "loss"), [("bert", "mse"), ("gpt2", "kl")])
def test_held_out_output_error_drops(name: str, loss: str) -> None:
    model, example = hf_models.build(name)
    converted = ndcompile.convert(model, example, mode="factorize", rank=1)
    assert any(isinstance(m, NdLinear) for m in converted.modules())
    data = [
        {"input_ids": hf_models.tokens(4, 12, seed=s), "labels": torch.zeros(4, dtype=torch.long)}
        for s in range(10)
    ]  # labels are taken out as targets (ignored), not passed to the model
    report = distill(converted, model, data, steps=50, whole_model_steps=40, progress=False)
    assert "dict (targets taken out)" in report.data
    fitted = [e for e in report.layers if e.status == "fitted"]
    assert fitted and all(e.error_after < e.error_before for e in fitted)
    whole = report.whole_model
    assert whole is not None and whole.loss == loss and whole.error_source == "heldout"
    assert whole.loss_after < whole.loss_before
    assert whole.error_after < whole.error_before  # relative error of every output tensor
