"""On-disk JSON caches shared by concurrent processes (machine model, autotune decisions).

A :class:`JsonCache` is one JSON object in one file. Updates take an exclusive lock
on a sibling ``.lock`` file, re-read what is on disk, merge the new entries in and
write the result atomically (:func:`ndcompile.fileio.atomic_write`), so two processes
filling the same cache at once keep each other's entries. A cache file that is not a
JSON object (truncated, zeroed, a list, a folder in its place) or holds entries that
fail validation is ignored with a :class:`CacheWarning` naming the file and rewritten
on the next update. A cache is only ever an optimisation: failures to read or write
it never stop the caller.

``NDCOMPILE_CACHE_DIR`` moves the caches (default ``$XDG_CACHE_HOME/ndcompile`` or
``~/.cache/ndcompile``).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ndcompile.fileio import atomic_write

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: merge without a lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["CacheWarning", "JsonCache", "autotune_cache", "cache_dir"]

#: ``validate(key, value)``: whether a cached entry may be used.
Validator = Callable[[str, Any], bool]


class CacheWarning(UserWarning):
    """A cache file was unreadable or corrupt and is being ignored."""


#: (file, problem) pairs already warned about in this process.
_WARNED: set[tuple[Path, str]] = set()


def cache_dir() -> Path:
    """The directory holding ndcompile's caches (created when first written)."""
    env = os.environ.get("NDCOMPILE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ndcompile"


class JsonCache:
    """A string-keyed JSON object in ``path``, safe to share between processes.

    Args:
        path: The cache file.
        validate: ``validate(key, value)`` says whether an entry read from disk is
            usable; entries that fail are dropped (with a warning) and overwritten
            by the next update.

    Example::

        cache = JsonCache(cache_dir() / "autotune.json", validate=lambda k, v: isinstance(v, str))
        label = cache.get(key)
        cache.set(key, "order=greedy")
    """

    def __init__(self, path: str | os.PathLike[str], *, validate: Validator | None = None) -> None:
        self.path = Path(path)
        self.validate = validate

    def warn(self, problem: str) -> None:
        """Warn once per process: the file ``problem`` (a predicate, e.g. "is a folder")."""
        if (self.path, problem) in _WARNED:
            return
        _WARNED.add((self.path, problem))
        warnings.warn(
            f"ndcompile cache file {str(self.path)!r} {problem}; ignoring it (it is rewritten "
            "on the next update)",
            CacheWarning,
            stacklevel=4,
        )

    def _read(self) -> dict[str, Any]:
        """The usable entries on disk."""
        if not os.path.lexists(self.path):
            return {}
        if self.path.is_dir():
            self.warn("is a folder, not a file")
            return {}
        try:
            data = json.loads(self.path.read_bytes().decode("utf-8"))
        except OSError as exc:
            self.warn(f"cannot be read ({type(exc).__name__}: {exc.strerror or exc})")
            return {}
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            self.warn(f"is not valid JSON ({type(exc).__name__})")
            return {}
        if not isinstance(data, dict):
            self.warn(f"holds a JSON {type(data).__name__}, not an object")
            return {}
        good = {k: v for k, v in data.items() if self.validate is None or self._valid(k, v)}
        if len(good) < len(data):
            bad = sorted(set(data) - set(good))
            self.warn(f"has {len(bad)} invalid entr{'y' if len(bad) == 1 else 'ies'} ({bad[0]!r})")
        return good

    def _valid(self, key: str, value: Any) -> bool:
        assert self.validate is not None
        try:
            return bool(self.validate(key, value))
        except Exception:
            return False

    def load(self) -> dict[str, Any]:
        """Every usable entry on disk (an empty dict when there is no usable file)."""
        return self._read()

    def get(self, key: str, default: Any = None) -> Any:
        """The entry ``key`` on disk, or ``default``."""
        return self.load().get(key, default)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock on ``<path>.lock`` (no lock where that is impossible)."""
        lock = self.path.with_name(f".{self.path.name}.lock")
        handle = None
        with contextlib.suppress(OSError):
            handle = open(lock, "a+b")  # noqa: SIM115 - held across the yield
        try:
            if handle is not None and fcntl is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield
        finally:
            if handle is not None:
                handle.close()  # closing releases the lock

    def update(self, entries: Mapping[str, Any]) -> bool:
        """Merge ``entries`` into the file (under the lock); return whether it was written.

        Entries already on disk (written by this or another process) are kept unless
        ``entries`` replaces them; a corrupt file is replaced by ``entries`` alone.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        with self._locked():
            current = self._read()
            merged = {**current, **entries}
            if self.path.is_dir():
                try:
                    self.path.rmdir()  # only an empty folder: never delete anyone's files
                except OSError:
                    return False
            try:
                atomic_write(self.path, json.dumps(merged, indent=1, sort_keys=True) + "\n")
            except OSError:
                return False  # a read-only cache only costs recomputing next time
        return True

    def set(self, key: str, value: Any) -> bool:
        """Store one entry (see :meth:`update`)."""
        return self.update({key: value})


def _is_label(key: str, value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def autotune_cache() -> JsonCache:
    """The planner's autotune decisions: ``autotune.json``, plan key -> candidate label."""
    return JsonCache(cache_dir() / "autotune.json", validate=_is_label)
