"""Tests of ndcompile.compress.hybrid_layers: the NdLinear at a budget and its report entry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ndcompile.compress.hybrid_layers import budget_layer
from ndcompile.frontend.sites import LinearSite
from ndcompile.report import LayerReport


def test_budget_layer_fills_the_report_entry() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    site = LinearSite(name="fc", module=linear, in_shape=(8, 8), out_shape=(6, 8))
    x = torch.randn(32, 64)
    entry = LayerReport(name="fc")
    layer = budget_layer(site, entry, budget=0.25, optimizer="auto", x=x)
    extra = entry.extra
    assert extra["chosen_form"] in ("kronecker", "hybrid")
    assert extra["lowrank"] == layer.lowrank
    assert extra["kronecker_error"] >= entry.weight_rel_error
    assert extra["lowrank_error_equal_params"] > 0
    assert extra["hybrid_errors"] and all(k.startswith("hybrid") for k in extra["hybrid_errors"])
    ref = linear(x)
    got = layer(x.reshape(32, 8, 8)).reshape(32, 48)
    w_hat = layer.dense_weight().detach()
    torch.testing.assert_close(got, x @ w_hat.T + linear.bias, rtol=1e-4, atol=1e-5)
    wd = linear.weight.detach()
    manual = float((x @ (wd - w_hat).T).norm() / (x @ wd.T).norm())
    assert entry.output_rel_error == pytest.approx(manual, rel=1e-4)
    assert entry.extra["output_error_source"] == "example"
    assert not torch.equal(ref, got)
    # with a Gram matrix the output error is the choice's own metric
    entry2 = LayerReport(name="fc")
    gram = x.double().T @ x.double() + torch.eye(64, dtype=torch.float64)
    budget_layer(site, entry2, budget=0.25, optimizer="auto", gram=gram)
    assert entry2.extra["error_metric"] == "output"
    assert entry2.extra["output_error_source"] == "calibration"
    assert math.isfinite(entry2.output_rel_error or math.inf)
