"""Smoke tests of the benchmark scripts: they run with --quick and write the JSON they promise.

The scripts run in subprocesses (they fix the thread count and reset dynamo, which
must not leak into other tests). No timing is asserted, only structure and the
helpers' arithmetic.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("ndlinear")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_layers  # noqa: E402
import common  # noqa: E402

VARIANT_TIMING_KEYS = {"fwd_ms", "fwd_iqr_ms", "fwdbwd_ms", "fwdbwd_iqr_ms", "gflops"}


def run_script(name: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(BENCH / name), "--threads", "1", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bench_layers_quick_json(tmp_path: Path) -> None:
    out = tmp_path / "layers.json"
    proc = run_script("bench_layers.py", "--quick", "--cases", "tiny", "--json", str(out))
    data = json.loads(out.read_text())
    assert {"meta", "cases"} <= data.keys()
    assert data["meta"]["threads"] == 1 and data["meta"]["roofline_gflops"] > 0
    (case,) = data["cases"]
    assert case["name"] == "tiny" and case["batch"] == 16
    assert case["plan_flops"] < case["dense_flops"]
    assert set(case["variants"]) == set(bench_layers.VARIANTS)
    for name in ("dense", "ref_eager", "nd_eager"):
        assert case["variants"][name].keys() >= VARIANT_TIMING_KEYS, name
    # Every variant computes the reference's function (same weights).
    for name in ("dense", "nd_eager"):
        assert case["variants"][name]["rel_err_vs_ref"] < 1e-4
    # Without --compile, quick mode skips compiled variants with a reason.
    assert "skipped" in case["variants"]["nd_inductor"]
    assert case["ratios"]["ref_eager"]["fwd_vs_ref_eager"] == pytest.approx(1.0)
    assert "Summary: forward speedups" in proc.stdout


def test_bench_layers_scaling_plot(tmp_path: Path) -> None:
    out, plot = tmp_path / "scaling.json", tmp_path / "scaling.png"
    run_script("bench_layers.py", "--quick", "--scaling", "--plot", str(plot), "--json", str(out))
    sweeps = json.loads(out.read_text())["scaling"]["sweeps"]
    assert [p["value"] for p in sweeps["batch"]] == [16, 64]
    assert [p["value"] for p in sweeps["mode"]] == [8, 16]
    assert all(p["ref_eager_ms"] > 0 and p["nd_eager_ms"] > 0 for p in sweeps["mode"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_models_quick_json(tmp_path: Path) -> None:
    out = tmp_path / "models.json"
    run_script("bench_models.py", "--quick", "--json", str(out))
    data = json.loads(out.read_text())
    assert [m["name"] for m in data["models"]] == ["image_mlp", "encoder"]
    for model in data["models"]:
        orig, conv = model["original"], model["converted"]
        for side in (orig, conv):
            assert {
                "params",
                "flops",
                "eager_fwd_ms",
                "eager_train_ms",
                "peak_fwd_mb",
                "peak_train_mb",
                "memory_method",
            } <= side.keys()
        assert conv["params"] < orig["params"]
        assert model["linear_flops_after"] < model["linear_flops_before"]
        assert model["report"]["converted"] >= 1
        assert model["ratios"]["params"] == pytest.approx(orig["params"] / conv["params"])
    mlp = data["models"][0]["report"]
    assert [layer["status"] for layer in mlp["layers"]] == ["converted", "converted", "skipped"]


def test_unknown_case_is_a_clear_error() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_layers.py"), "--cases", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "no case matches 'nope'" in proc.stderr and "image32" in proc.stderr


@pytest.mark.parametrize(
    ("patterns", "quick", "expected"),
    [
        (None, True, list(bench_layers.QUICK_CASES)),
        (None, False, ["image32", "cube16_b256", "cube16_b512", "wide64", "mlp768", "4mode8"]),
        ("cube16*", False, ["cube16_b256", "cube16_b512"]),
        ("mlp768,image32,mlp768", True, ["mlp768", "image32"]),
    ],
)
def test_select_cases(patterns: str | None, quick: bool, expected: list[str]) -> None:
    assert [c.name for c in bench_layers.select_cases(patterns, quick)] == expected


def test_ratios_from_a_record() -> None:
    record = {
        "variants": {
            "dense": {"fwd_ms": 8.0, "fwdbwd_ms": 30.0},
            "ref_eager": {"fwd_ms": 2.0, "fwdbwd_ms": 6.0},
            "nd_eager": {"fwd_ms": 1.0, "fwdbwd_ms": 4.0},
            "ref_inductor": {"skipped": "no compile"},
        }
    }
    r = bench_layers.ratios(record)
    assert r["nd_eager"]["fwd_vs_ref_eager"] == 2.0
    assert r["nd_eager"]["fwdbwd_vs_dense"] == 7.5
    assert r["nd_eager"]["fwd_vs_ref_inductor"] is None
    assert "ref_inductor" not in r


def test_format_table_aligns_columns() -> None:
    text = common.format_table(("name", "ms"), [("a", "1.5"), ("longer", "10.25")])
    lines = text.splitlines()
    assert lines[0] == "| name   | ms    |"
    assert lines[1] == "|--------|-------|"
    assert lines[2] == "| a      |   1.5 |"
    assert len({len(line) for line in lines}) == 1


def test_time_call_counts_samples() -> None:
    calls = []
    import torch

    timing = common.time_call(
        lambda: calls.append(1),
        torch.device("cpu"),
        warmup=2,
        min_iters=5,
        max_iters=7,
        budget_s=0.0,
    )
    assert timing.samples == 5 and len(calls) == 7
    assert timing.median_ms >= 0 and timing.iqr_ms >= 0


def test_time_interleaved_rotates_and_drops_failures() -> None:
    import torch

    calls: list[str] = []
    errors: list[str] = []

    def broken() -> None:
        raise RuntimeError("no backend")

    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "bad": broken}
    timings = common.time_interleaved(
        fns,
        torch.device("cpu"),
        warmup=2,
        min_iters=3,
        max_iters=3,
        budget_s=0.0,
        burst_ms=0.0,
        on_error=lambda name, exc: errors.append(f"{name}: {exc}"),
    )
    assert set(timings) == {"a", "b"} and errors == ["bad: no backend"]
    assert timings["a"].samples == 3 and timings["b"].samples == 3
    # Two warm-up calls each, then three rounds whose order rotates.
    assert calls == ["a", "a", "b", "b", "a", "b", "b", "a", "a", "b"]
    with pytest.raises(RuntimeError, match="no backend"):
        common.time_interleaved({"bad": broken}, torch.device("cpu"))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # 2*B*(d1 h1 d2 d3 + h1 d2 h2 d3 + h1 h2 d3 h3): one Linear per mode, first to last.
        ("image32", 2 * 64 * (32 * 32 * 96 + 32 * 32 * 32 * 3 + 1024 * 3 * 3)),
        ("wide64", 2 * 32 * (64 * 32 * 512 + 32 * 64 * 32 * 8 + 32 * 32 * 8 * 8)),
        ("mlp768", 2 * 4096 * (24 * 48 * 32 + 48 * 32 * 64)),
    ],
)
def test_reference_flops(name: str, expected: int) -> None:
    assert bench_layers.reference_flops(bench_layers.CASES[name]) == expected


def test_bench_onnx_quick_json(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx.json"
    proc = run_script("bench_onnx.py", "--quick", "--json", str(out), timeout=240)
    assert "onnxruntime ms" in proc.stdout
    data = json.loads(out.read_text())
    for case in data["cases"]:
        assert set(case["fwd_ms"]) == {"eager", "inductor", "onnxruntime"}
        assert case["onnx_max_abs_error"] < 1e-4


def test_bench_planner_quick_json(tmp_path: Path) -> None:
    out = tmp_path / "planner.json"
    proc = run_script("bench_planner.py", "--quick", "--cases", "tiny", "--json", str(out))
    (r1, r4) = json.loads(out.read_text())["cases"]
    assert (r1["rank"], r4["rank"]) == (1, 4)
    for r in (r1, r4):
        assert len(r["measured_us"]) == len(r["estimates_us"]) == r["candidates"] > 1
        assert r["regret"] >= 1.0 and r["reference_over_best"] >= 1.0
        assert -1.0 <= r["spearman"] <= 1.0
    assert r1["dense_over_best"] >= 1.0  # (8,8,4) materialises as one block
    assert "spearman" in proc.stdout


def test_spearman() -> None:
    import bench_planner

    assert bench_planner.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert bench_planner.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert bench_planner.spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)


def test_bench_convert_quick_json(tmp_path: Path) -> None:
    out = tmp_path / "convert.json"
    run_script("bench_convert.py", "--quick", "--repeats", "1", "--json", str(out), timeout=300)
    cases = json.loads(out.read_text())["cases"]
    assert {c["method"] for c in cases} >= {"full", "truncated"}
    full = {(c["size"], c["rank"]): c["rel_error"] for c in cases if c["method"] == "full"}
    for c in cases:
        if c["method"] == "truncated" and (c["size"], c["rank"]) in full:
            assert c["rel_error"] == pytest.approx(full[c["size"], c["rank"]], rel=1e-6)


def test_bench_convert_model_streaming_and_disk(tmp_path: Path) -> None:
    out = tmp_path / "model.json"
    args = ["--hidden", "128", "--layers", "1", "--rank", "2", "--methods", "streaming,disk"]
    run_script("bench_convert_model.py", *args, "--json", str(out), timeout=300)
    streaming, disk = json.loads(out.read_text())
    assert (streaming["method"], disk["method"]) == ("streaming", "disk")
    assert streaming["converted"] == disk["converted"] == 8
    assert streaming["params_after"] == disk["params_after"] < streaming["params"]
    assert disk["peak_mb"] < streaming["peak_mb"]  # the dense model is never in memory


def test_bench_training_quick_json(tmp_path: Path) -> None:
    out = tmp_path / "training.json"
    run_script("bench_training.py", "--quick", "--json", str(out), timeout=300)
    (case,) = json.loads(out.read_text())["cases"]
    saved = {v["variant"]: v["saved_mb"] for v in case["variants"]}
    # recomputing the contraction saves only its input, as the dense layer does
    assert saved["ndlinear recompute"] <= saved["dense"] < saved["ndlinear save"]


def test_machine_info_records_the_allocator_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import machine

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4000000000")
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    info = machine.machine_info(torch.device("cpu"), 2)
    assert info["env"]["MALLOC_TRIM_THRESHOLD_"] == "4000000000"
    assert "THP_MEM_ALLOC_ENABLE" not in info["env"]
    json.dumps(info)
