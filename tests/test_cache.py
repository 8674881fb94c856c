"""Tests for the on-disk caches: concurrent writers merge; corrupt files are ignored, rewritten."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from ndcompile.planner import machine
from ndcompile.planner.cache import CacheWarning, JsonCache, autotune_cache, cache_dir
from ndcompile.planner.machine import MachineModel, machine_cache, machine_model
from ndcompile.planner.plan import plan_ndlinear

MEASURED = MachineModel(80.0, 9.0, 4.0, "cpu")

#: Contents that must never reach the cost model: (id, file content or "<folder>").
CORRUPT = [
    ("list", "[1, 2]"),
    ("zeros", "\x00" * 64),
    ("truncated", '{"matmul_gflops": 1'),
    ("null", "null"),
    ("zero-gflops", json.dumps({"matmul_gflops": 0, "bandwidth_gbs": 9, "op_overhead_us": 4})),
    ("string", json.dumps({"matmul_gflops": "fast", "bandwidth_gbs": 9, "op_overhead_us": 4})),
    ("nan", '{"matmul_gflops": NaN, "bandwidth_gbs": 9, "op_overhead_us": 4}'),
    ("missing", json.dumps({"matmul_gflops": 5})),
    ("bad-device", json.dumps({"matmul_gflops": 5, "bandwidth_gbs": 9, "op_overhead_us": 4,
                               "device": 3})),
    ("unknown-device", json.dumps({"matmul_gflops": 5, "bandwidth_gbs": 9, "op_overhead_us": 4,
                                   "device": "xla0", "bias_in_gemm": True})),
    ("folder", "<folder>"),
]  # fmt: skip


def write_corrupt(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if content == "<folder>":
        path.mkdir()
    else:
        path.write_bytes(content.encode())


@pytest.fixture
def fresh_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A private cache folder, no override, a fake (instant) measurement; returns the calls."""
    calls: list[str] = []
    monkeypatch.setenv("NDCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NDCOMPILE_MACHINE", raising=False)
    monkeypatch.setattr(machine, "_MEMO", {})
    monkeypatch.setattr(machine, "measure", lambda device="cpu": calls.append(device) or MEASURED)
    monkeypatch.setattr(machine, "_matmul_gflops", lambda dev, reps: 1.0)  # never stale
    return calls


# ------------------------------------------------------------------ JsonCache
def test_set_get_and_merge_with_what_is_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.json"
    a, b = JsonCache(path), JsonCache(path)
    assert a.load() == {} and a.get("x", 7) == 7
    assert a.set("x", 1)
    assert b.set("y", 2)  # b never read x: the update merges it from disk
    assert a.load() == {"x": 1, "y": 2}
    assert a.update({"x": 3})
    assert json.loads(path.read_text()) == {"x": 3, "y": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == [".c.json.lock", "c.json"]


#: Files that are not a JSON object at all.
BROKEN = [c for c in CORRUPT if c[0] in ("list", "zeros", "truncated", "null", "folder")]


@pytest.mark.parametrize(("kind", "content"), BROKEN, ids=[c[0] for c in BROKEN])
def test_corrupt_file_is_ignored_with_a_warning_and_rewritten(
    tmp_path: Path, kind: str, content: str
) -> None:
    path = tmp_path / f"{kind}.json"
    write_corrupt(path, content)
    cache = JsonCache(path, validate=lambda k, v: isinstance(v, int | str))
    with pytest.warns(CacheWarning, match=re.escape(str(path))):
        data = cache.load()
    assert all(isinstance(v, int | str) for v in data.values())
    assert cache.set("key", "value")
    assert path.is_file() and json.loads(path.read_text())["key"] == "value"


def test_entries_failing_validation_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"good": "a", "bad": 5, "worse": None}))
    cache = JsonCache(path, validate=lambda k, v: isinstance(v, str))
    with pytest.warns(CacheWarning, match="2 invalid entries"):
        assert cache.load() == {"good": "a"}
    cache.set("new", "b")
    assert json.loads(path.read_text()) == {"good": "a", "new": "b"}


def test_a_folder_with_files_is_never_deleted(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.mkdir()
    (path / "keep.txt").write_text("mine")
    cache = JsonCache(path)
    with pytest.warns(CacheWarning, match="is a folder"):
        assert cache.set("k", 1) is False
    assert (path / "keep.txt").read_text() == "mine"


def test_unwritable_cache_folder_is_not_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert JsonCache(blocker / "c.json").set("k", 1) is False


WRITER = """
import sys
from ndcompile.planner.cache import JsonCache
cache = JsonCache(sys.argv[1])
for k in range(int(sys.argv[3])):
    cache.set(f"{sys.argv[2]}-{k}", k)
"""


def test_two_processes_filling_one_cache_keep_every_entry(tmp_path: Path) -> None:
    path = tmp_path / "autotune.json"
    n = 40
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, str(n)], env=env)
        for name in ("a", "b")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    data = json.loads(path.read_text())
    assert sorted(data) == sorted(f"{name}-{k}" for name in "ab" for k in range(n))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".autotune.json.lock", "autotune.json"]


def test_autotune_cache_location_and_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NDCOMPILE_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    cache = autotune_cache()
    assert cache.path == tmp_path / "autotune.json"
    (tmp_path / "autotune.json").write_text(json.dumps({"a": "order=greedy", "b": 3}))
    with pytest.warns(CacheWarning):
        assert cache.load() == {"a": "order=greedy"}


# --------------------------------------------------------------- machine model
def test_machine_model_measures_once_and_caches(fresh_machine: list[str]) -> None:
    assert machine_model() == MEASURED
    path = machine_cache().path
    assert json.loads(path.read_text()) == {
        "bandwidth_gbs": 9.0, "device": "cpu", "matmul_gflops": 80.0, "op_overhead_us": 4.0,
        "bias_in_gemm": True,
    }  # fmt: skip
    machine._MEMO.clear()
    assert machine_model() == MEASURED
    assert fresh_machine == ["cpu"]


@pytest.mark.parametrize(("kind", "content"), CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_machine_cache_is_remeasured_and_rewritten(
    fresh_machine: list[str], kind: str, content: str
) -> None:
    path = machine_cache().path
    write_corrupt(path, content)
    with pytest.warns(CacheWarning, match=re.escape(path.name)):
        assert machine_model() == MEASURED
    assert fresh_machine == ["cpu"]
    assert MachineModel(**json.loads(path.read_text())) == MEASURED
    machine._MEMO.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert machine_model() == MEASURED  # the rewritten file is used as is
    assert fresh_machine == ["cpu"]


@pytest.mark.parametrize("kind", ["zero-gflops", "string", "folder"])
def test_planning_works_with_a_corrupt_machine_cache(fresh_machine: list[str], kind: str) -> None:
    write_corrupt(machine_cache().path, dict(CORRUPT)[kind])
    with pytest.warns(CacheWarning):
        choice = plan_ndlinear((8, 8), (4, 4), rank=2, batch=16)
    assert choice.chosen.est_us > 0


@pytest.mark.parametrize(
    "override",
    [
        '{"matmul_gflops": 0, "bandwidth_gbs": 1, "op_overhead_us": 1}',
        '{"matmul_gflops": "x", "bandwidth_gbs": 1, "op_overhead_us": 1}',
        "[1, 2, 3]",
    ],
)
def test_unusable_override_is_an_error(monkeypatch: pytest.MonkeyPatch, override: str) -> None:
    from ndcompile.errors import NdCompileError

    monkeypatch.setenv("NDCOMPILE_MACHINE", override)
    with pytest.raises(NdCompileError, match="positive numbers"):
        machine_model()


def write_machine_cache(entries: dict[str, object]) -> Path:
    """Write ``entries`` as the machine cache file (JSON); return its path."""
    path = machine_cache().path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries))
    return path


def test_a_cache_from_before_the_bias_choice_gets_it_measured_once(
    fresh_machine: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    old = {"matmul_gflops": 80.0, "bandwidth_gbs": 9.0, "op_overhead_us": 4.0, "device": "cpu"}
    path = write_machine_cache(old)
    timed: list[str] = []
    monkeypatch.setattr(machine, "bias_in_gemm", lambda device: timed.append(device) or False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an older file is not corrupt
        model = machine_model()
    assert model == MachineModel(80.0, 9.0, 4.0, "cpu", bias_in_gemm=False)
    assert timed == ["cpu"] and fresh_machine == []  # the constants were not measured again
    assert json.loads(path.read_text()) == {**old, "bias_in_gemm": False}
    machine._MEMO.clear()
    assert machine_model() == model and timed == ["cpu"]


def test_a_cache_with_a_bad_bias_choice_is_warned_about_and_measured(
    fresh_machine: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    good = {"matmul_gflops": 80.0, "bandwidth_gbs": 9.0, "op_overhead_us": 4.0, "device": "cpu"}
    path = write_machine_cache({**good, "bias_in_gemm": "yes"})
    monkeypatch.setattr(machine, "bias_in_gemm", lambda device: True)
    with pytest.warns(CacheWarning, match="bias_in_gemm"):
        assert machine_model().bias_in_gemm is True
    assert json.loads(path.read_text()) == {**good, "bias_in_gemm": True}


@pytest.mark.parametrize(("value", "fold"), [("false", False), ("true", True), (None, True)])
def test_override_may_set_the_bias_choice(
    monkeypatch: pytest.MonkeyPatch, value: str | None, fold: bool
) -> None:
    extra = "" if value is None else f', "bias_in_gemm": {value}'
    override = '{"matmul_gflops": 1, "bandwidth_gbs": 1, "op_overhead_us": 1' + extra + "}"
    monkeypatch.setenv("NDCOMPILE_MACHINE", override)
    assert machine_model().bias_in_gemm is fold


def test_override_with_a_non_boolean_bias_choice_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ndcompile.errors import NdCompileError

    override = '{"matmul_gflops": 1, "bandwidth_gbs": 1, "op_overhead_us": 1, "bias_in_gemm": 0}'
    monkeypatch.setenv("NDCOMPILE_MACHINE", override)
    with pytest.raises(NdCompileError, match="bias_in_gemm"):
        machine_model()


@pytest.mark.parametrize(
    ("quick", "measured", "want"),
    [
        # A quick check within 1.25x of the cache: used as is.
        (99.0, None, MachineModel(80.0, 12.0, 2.0, "cpu")),
        # Measured again: each constant keeps its better value, the bias choice comes
        # from the measurement with the faster matmuls (the quieter machine) ...
        (101.0, (150.0, False), MachineModel(150.0, 12.0, 2.0, "cpu", bias_in_gemm=False)),
        # ... which may be the cached one, when the new measurement was loaded too;
        # the quick check's own rate counts among the matmul rates.
        (101.0, (60.0, False), MachineModel(101.0, 12.0, 2.0, "cpu", bias_in_gemm=True)),
    ],
)
def test_constants_measured_under_load_are_measured_again(
    fresh_machine: list[str],
    monkeypatch: pytest.MonkeyPatch,
    quick: float,
    measured: tuple[float, bool] | None,
    want: MachineModel,
) -> None:
    loaded = {"matmul_gflops": 80.0, "bandwidth_gbs": 12.0, "op_overhead_us": 2.0}
    path = write_machine_cache({**loaded, "device": "cpu", "bias_in_gemm": True})
    gflops, fold = measured or (0.0, True)
    fresh = MachineModel(gflops, 9.0, 4.0, "cpu", bias_in_gemm=fold)
    monkeypatch.setattr(
        machine, "measure", lambda device="cpu": fresh_machine.append(device) or fresh
    )
    monkeypatch.setattr(machine, "_matmul_gflops", lambda dev, reps: quick)
    assert machine_model() == want
    assert fresh_machine == ([] if measured is None else ["cpu"])
    assert MachineModel(**json.loads(path.read_text())) == want


def test_measuring_leaves_the_global_random_stream_alone() -> None:
    import torch

    state = torch.random.get_rng_state()
    machine._matmul_gflops(torch.device("cpu"), 2)  # the check every process makes
    model = machine.measure()
    assert model.matmul_gflops > 0 and isinstance(model.bias_in_gemm, bool)
    assert torch.equal(torch.random.get_rng_state(), state)
