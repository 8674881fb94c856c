"""Tests for :mod:`ndcompile.fileio`: a reader sees the old file or the new one, never a part."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from ndcompile.fileio import atomic_write, default_file_mode, publish, temp_path_for


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x00\x01bytes", b"\x00\x01bytes"),
        ("text é", "text é".encode()),
        (bytearray(b"ab"), b"ab"),
    ],
)
def test_atomic_write_bytes_and_text(tmp_path: Path, content: object, expected: bytes) -> None:
    dest = tmp_path / "out.json"
    dest.write_bytes(b"old")
    assert atomic_write(dest, content) is None  # type: ignore[arg-type]
    assert dest.read_bytes() == expected
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    assert dest.stat().st_mode & 0o777 == default_file_mode()


def test_atomic_write_function_gets_a_temp_path_and_returns_its_result(tmp_path: Path) -> None:
    dest = tmp_path / "model.pt2"
    seen: list[Path] = []

    def write(path: Path) -> str:
        seen.append(path)
        assert path.parent == tmp_path and path.name.startswith(".model.")
        assert path.suffix == ".pt2" and not dest.exists()
        path.write_text("done")
        return "result"

    assert atomic_write(dest, write) == "result"
    assert dest.read_text() == "done" and not seen[0].exists()


@pytest.mark.parametrize("error", [RuntimeError("writer failed"), KeyboardInterrupt()])
def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path: Path, error: BaseException) -> None:
    dest = tmp_path / "w.bin"
    dest.write_bytes(b"old")

    def write(path: Path) -> None:
        path.write_bytes(b"partial")
        raise error

    with pytest.raises(type(error)):
        atomic_write(dest, write)
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["w.bin"]


def test_missing_folder_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "absent" / "x.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_temp_files_are_unique_and_publish_moves_them(tmp_path: Path) -> None:
    dest = tmp_path / "cache.json"
    temps = {temp_path_for(dest) for _ in range(20)}
    assert len(temps) == 20 and all(t.exists() and t.name.startswith(".cache.") for t in temps)
    first = sorted(temps)[0]
    first.write_text("x")
    publish(first, dest, mode=0o600)
    assert dest.read_text() == "x" and dest.stat().st_mode & 0o777 == 0o600


def test_concurrent_writers_never_expose_a_partial_file(tmp_path: Path) -> None:
    dest = tmp_path / "shared.txt"
    payloads = [bytes([65 + k]) * 200_000 for k in range(4)]
    atomic_write(dest, payloads[0])
    bad: list[int] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            data = dest.read_bytes()
            if data not in payloads:
                bad.append(len(data))

    reader = threading.Thread(target=read)
    reader.start()
    writers = [
        threading.Thread(target=lambda p=p: [atomic_write(dest, p) for _ in range(10)])
        for p in payloads
    ]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    reader.join()
    assert bad == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.txt"]
    assert os.path.getsize(dest) == 200_000
