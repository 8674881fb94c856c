"""ConvertOptions validation, the mode registry, the pass runner, and the regressions they fix."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import ndcompile
from ndcompile import ConvertOptions, NdCompileError
from ndcompile.cli.inspect import plan_model
from ndcompile.passes.runner import PassResult, run_passes
from ndcompile.pipeline import graph_rewrite
from ndcompile.pipeline.modes import MODE_REGISTRY, get_mode


class Untraceable(nn.Module):
    """Data-dependent control flow at the top: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) if x.sum() > -1e9 else x


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "nope"}, r"valid modes are: fresh, exact, factorize, adapter"),
        ({"output": "nope"}, r"valid outputs are"),
        ({"rank": 1.5}, r"rank must be a positive integer, got 1.5"),
        ({"rank": "2"}, r"rank must be a positive integer, got '2'"),
        ({"rank": True}, r"rank must be a positive integer, got True"),
        ({"rank": {"fc": 0}}, r"rank\['fc'\] must be >= 1"),
        ({"mode": "fresh", "tol": 0.1}, r"tol= only apply to mode='factorize'"),
        ({"mode": "adapter", "budget": 0.2}, r"budget= only apply to mode='factorize'"),
        ({"mode": "factorize"}, r"needs rank=R, tol=t or budget=b"),
        ({"mode": "factorize", "rank": 2, "tol": 0.1}, r"only one of"),
        ({"mode": "adapter", "alpha": math.nan}, r"alpha must be finite"),
        ({"mode": "factorize", "budget": 1.5}, r"budget must be in \(0, 1\]"),
    ],
)
def test_invalid_options_raise_once(kwargs: dict, match: str) -> None:
    with pytest.raises(NdCompileError, match=match):
        ConvertOptions(**kwargs)


def test_bare_string_patterns_are_one_pattern() -> None:
    opts = ConvertOptions(include="fc1", exclude="head")
    assert opts.include == ("fc1",) and opts.exclude == ("head",)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(64, 64))
    model.add_module("head", nn.Linear(64, 64))
    converted = ndcompile.convert(model, torch.randn(2, 64), exclude="head")
    assert converted.report.layer("head").status == "skipped"
    assert converted.report.layer("fc1").status == "converted"


def test_rank_mapping_naming_no_layer_lists_valid_names() -> None:
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(
        NdCompileError, match=r"(?s)not Linear-like layers.*\['fc9'\].*valid names: 0"
    ):
        ndcompile.convert(model, torch.randn(2, 64), mode="fresh", rank={"fc9": 2})


def test_registry_lists_valid_names() -> None:
    assert set(MODE_REGISTRY) == set(ndcompile.MODES)
    with pytest.raises(NdCompileError, match="valid modes are"):
        get_mode("dense")


def test_options_round_trip_through_json() -> None:
    opts = ConvertOptions(mode="factorize", rank={"a": 2}, shapes={"a": ((8, 8), (4, 16))})
    assert ConvertOptions.from_json(opts.to_json()) == opts
    with pytest.raises(NdCompileError, match="unknown keys"):
        ConvertOptions.from_json({"bogus": 1})


def test_p1_exact_pass_failure_is_an_ndcompile_error(monkeypatch) -> None:
    def broken_pass(gm):  # type: ignore[no-untyped-def]
        raise NdCompileError("region could not be planned")

    monkeypatch.setattr(graph_rewrite, "fuse_contractions", lambda gm, **kw: broken_pass(gm))
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with pytest.raises(NdCompileError, match="pass '<lambda>': region could not be planned"):
        ndcompile.convert(model, torch.randn(2, 64), mode="exact")


def test_run_passes_wraps_foreign_errors() -> None:
    def boom(gm):  # type: ignore[no-untyped-def]
        raise RuntimeError("kaput")

    gm = torch.fx.symbolic_trace(nn.Linear(4, 4))
    with pytest.raises(NdCompileError, match="pass 'boom' failed: RuntimeError: kaput"):
        run_passes(gm, [boom])
    out, results = run_passes(gm, [lambda g: PassResult(g, False)])
    assert out is gm and results[0].modified is False


def test_p2_inspect_and_convert_agree_on_budget_skips() -> None:
    model = nn.Sequential(nn.Linear(64, 64))
    rows = plan_model(model, (torch.randn(2, 64),), mode="factorize", budget=0.02)
    converted = ndcompile.convert(model, torch.randn(2, 64), mode="factorize", budget=0.02)
    assert rows[0]["action"] == "skip"
    assert rows[0]["reason"] == converted.report.layer("0").reason


def test_p3_untraceable_model_gets_calibrated_fits() -> None:
    torch.manual_seed(0)
    model = Untraceable()
    batches = [torch.randn(32, 64) for _ in range(3)]
    converted = ndcompile.convert(
        model, torch.randn(4, 64), mode="factorize", rank=2, calibration=batches
    )
    entry = converted.report.layer("body.0")
    assert entry.status == "converted"
    assert entry.extra["output_error_source"] == "calibration"
    with pytest.raises(NdCompileError, match="calibration data cannot be routed"):
        ndcompile.convert(
            model,
            torch.randn(4, 64),
            mode="factorize",
            rank=2,
            calibration=batches,
            output="graph",
        )


@pytest.mark.parametrize("output", ["module", "graph"])
def test_p4_per_layer_ranks_save_and_load(tmp_path, output: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(4, 64)
    converted = ndcompile.convert(model, x, mode="factorize", rank={"0": 1, "2": 3}, output=output)
    path = ndcompile.save(converted, tmp_path / "m.safetensors")
    restored = ndcompile.load(path, model)
    assert restored.get_submodule("2").rank == 3
    with torch.no_grad():
        assert torch.equal(restored(x), converted(x))


def test_replace_keeps_every_option() -> None:
    opts = ConvertOptions(mode="factorize", rank=2, calibration=[torch.zeros(1, 4)])
    sub = dataclasses.replace(opts, verify=False)
    assert sub.calibration is opts.calibration and sub.rank == 2 and not sub.verify
