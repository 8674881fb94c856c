"""Tests for subclasses of nn.Linear: converted when their forward is F.linear, else skipped.

Covers :func:`ndcompile.frontend.sites.forward_is_linear` and the capture of layers
whose forward export shows as a matmul (transformers' ``FalconLinear``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ndcompile
from ndcompile.frontend.sites import forward_is_linear, subclass_skip_reason
from ndcompile.layers.ndlinear import NdLinear


class MatmulLinear(nn.Linear):
    """The product written by hand, as transformers' FalconLinear does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class TaggedLinear(nn.Linear):
    """Adds an attribute, keeps nn.Linear's forward."""

    tag = "kept"


class TwoInputs(nn.Linear):
    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x) * scale


@pytest.mark.parametrize(
    ("cls", "bias", "expected"),
    [
        (MatmulLinear, True, True),
        (MatmulLinear, False, True),
        (TaggedLinear, True, True),
        (ScaledLinear, True, False),
        (TwoInputs, True, False),
    ],
)
def test_forward_is_linear(cls: type[nn.Linear], bias: bool, expected: bool) -> None:
    layer = cls(12, 6, bias=bias)
    assert forward_is_linear(layer, (4, 5, 12)) is expected
    assert (subclass_skip_reason(layer, (4, 12)) is None) is expected


def test_meta_weights_and_dropout_count_as_different() -> None:
    meta = MatmulLinear(12, 6, device="meta")
    assert not forward_is_linear(meta, (3, 12))
    reason = subclass_skip_reason(meta, (3, 12))
    assert reason is not None and "meta device" in reason

    class Dropped(nn.Linear):  # a forward that draws randomness
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.dropout(super().forward(x), 0.5, training=True)

    assert not forward_is_linear(Dropped(12, 6), (3, 12))


def _model() -> nn.Module:
    return nn.Sequential(
        MatmulLinear(64, 64), nn.ReLU(), ScaledLinear(64, 64), TaggedLinear(64, 32)
    )


@pytest.mark.parametrize("mode", ["fresh", "adapter"])
def test_convert_takes_equivalent_subclasses_and_names_the_others(mode: str) -> None:
    torch.manual_seed(0)
    model = _model().double()
    x = torch.randn(8, 64, dtype=torch.float64)
    converted = ndcompile.convert(model, x, mode=mode)
    reasons = {e.name: e.reason for e in converted.report.layers}
    assert reasons["0"] is None and reasons["3"] is None
    assert reasons["2"] == (
        "ScaledLinear subclasses nn.Linear and its forward differs from F.linear on a probe input"
    )
    assert type(converted[0]) is not MatmulLinear and isinstance(converted[2], ScaledLinear)
    assert mode == "adapter" or isinstance(converted[0], NdLinear)
    assert type(model[0]) is MatmulLinear  # the user's model is untouched
    if mode == "adapter":  # exact at step 0, forward and backward
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = model(xa), converted(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-10)
        ya.sum().backward()
        yb.sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-10, atol=1e-10)


def test_falcon_layers_are_converted() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.FalconConfig(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=100
    )
    model = transformers.FalconModel(config).eval()
    ids = torch.randint(0, 100, (2, 16))
    converted = ndcompile.convert(model, {"input_ids": ids}, mode="adapter")
    report = converted.report
    assert len(report.converted) == 8 and not report.skipped
    want = model(input_ids=ids).last_hidden_state
    got = converted(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
