"""Atomic file writes: a unique temporary file next to the destination, then ``os.replace``.

A reader of the destination sees either the old file or the complete new one, never
a partial write; two writers never share a temporary file; a failed write leaves
nothing behind. :func:`atomic_write` does the whole thing; :func:`temp_path_for` and
:func:`publish` are its two halves, for callers that write several files and move them
into place together (see ``ndcompile.cli.output.StagedOutputs``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["atomic_write", "default_file_mode", "publish", "temp_path_for"]

T = TypeVar("T")


def default_file_mode() -> int:
    """The permission bits ``open()`` gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def temp_path_for(dest: str | os.PathLike[str]) -> Path:
    """Create an empty, uniquely named hidden file in ``dest``'s folder and return its path.

    The name starts with ``.<dest stem>.`` and keeps ``dest``'s suffix, so tools that
    look at the suffix treat it like the destination.
    """
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.stem}.", suffix=dest.suffix)
    os.close(fd)
    return Path(tmp)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (best effort: not every platform can open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(
    tmp: str | os.PathLike[str], dest: str | os.PathLike[str], *, mode: int | None = None
) -> None:
    """Flush ``tmp`` to disk, give it ``mode`` (default: as ``open()`` would), move it to ``dest``.

    Raises:
        OSError: If the file cannot be synced, chmod-ed or renamed.
    """
    tmp, dest = Path(tmp), Path(dest)
    _fsync_file(tmp)
    os.chmod(tmp, default_file_mode() if mode is None else mode)
    os.replace(tmp, dest)
    _fsync_folder(dest.parent)


def atomic_write(
    path: str | os.PathLike[str],
    content: bytes | str | Callable[[Path], T],
    *,
    encoding: str = "utf-8",
    mode: int | None = None,
) -> T | None:
    """Write ``path`` atomically.

    Args:
        path: Destination; its folder must exist.
        content: The bytes or text to write, or ``write_fn(tmp_path)``, a function
            that writes the whole file at ``tmp_path`` (any writer that takes a path:
            ``torch.save``, ``safetensors.torch.save_file``, an exporter).
        encoding: Encoding of text content.
        mode: Permission bits of the new file (default: what ``open()`` would give).

    Returns:
        What ``write_fn`` returned, or ``None`` for bytes or text.

    Raises:
        OSError: If the temporary file cannot be created, written or moved into
            place; whatever ``write_fn`` raises. The temporary file is removed and
            ``path`` is left as it was.
    """
    tmp = temp_path_for(path)
    try:
        result: Any = None
        if isinstance(content, bytes | bytearray | memoryview):
            tmp.write_bytes(bytes(content))
        elif isinstance(content, str):
            tmp.write_bytes(content.encode(encoding))
        else:
            result = content(tmp)
        publish(tmp, path, mode=mode)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return result
