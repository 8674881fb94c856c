"""All-or-nothing output files, signal handling and progress display for the command line.

Every output is first written to a temporary file in its destination folder;
:meth:`StagedOutputs.commit` moves them all into place with ``os.replace`` once
every one of them has been written, so a failure never leaves a partial file.
SIGTERM and SIGHUP are turned into :class:`Terminated` (a ``KeyboardInterrupt``) so
they clean up like Ctrl-C, and signals are held while native code writes a file
(:func:`deferred_signals`): an exception raised inside torch's zip writer aborts
the process.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ndcompile.cli.loading import UsageError
from ndcompile.fileio import default_file_mode, publish, temp_path_for

__all__ = [
    "PROGRAM_SUFFIXES",
    "STATE_DICT_SUFFIXES",
    "Progress",
    "StagedOutputs",
    "Terminated",
    "check_output_path",
    "deferred_signals",
    "onnx_exporter",
    "save_state_dict",
    "terminate_on_signals",
]

#: ``-o`` suffixes: an exported program (torch.export) or an ONNX file.
PROGRAM_SUFFIXES = (".pt2", ".onnx")
#: ``--state-dict-out`` suffixes: torch.save or safetensors.
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def check_output_path(path: str, suffixes: tuple[str, ...], option: str) -> Path:
    """Check an output path before any work is done: known suffix, existing folder.

    Raises:
        UsageError: On an unknown suffix or a missing destination folder.
    """
    out = Path(path)
    if out.suffix not in suffixes:
        raise UsageError(
            f"{option} {path!r} must end in one of {', '.join(suffixes)}",
        )
    if not out.parent.is_dir():
        raise UsageError(f"{option} {path!r}: folder {str(out.parent)!r} does not exist")
    if out.is_dir():
        raise UsageError(f"{option} {path!r} is a folder")
    return out


#: Signals that end the command: Ctrl-C, ``kill``, a closed terminal.
_STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that outputs are cleaned up.

    Attributes:
        signum: The signal received.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _interrupt_for(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


@contextlib.contextmanager
def _handlers(handler: Callable[[int, Any], None], signums: tuple[int, ...]) -> Iterator[None]:
    """Install ``handler`` for ``signums`` (main thread only); restore the old ones after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Raise :class:`Terminated` on SIGTERM/SIGHUP in the block (as Ctrl-C raises)."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    with _handlers(handler, tuple(s for s in _STOP_SIGNALS if s != signal.SIGINT)):
        yield


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP until the block ends, then raise for the first one.

    For native code that calls back into Python (``torch.export.save`` writing to a
    file object): an exception raised inside such a callback aborts the process.
    """
    pending: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        pending.append(signum)

    with _handlers(handler, _STOP_SIGNALS):
        try:
            yield
        finally:
            if pending:
                raise _interrupt_for(pending[0])


class StagedOutputs:
    """Write files to temporaries next to their destinations; publish them together.

    Use as a context manager: temporaries left when the block exits (because of
    an error, an interrupt, or without :meth:`commit`) are deleted.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []
        self._mode = default_file_mode()

    def stage(self, dest: Path, write: Callable[[Path], Any]) -> Any:
        """Call ``write(tmp_path)`` and return its result; the file moves to ``dest`` on commit."""
        tmp_path = temp_path_for(dest)
        self._staged.append((tmp_path, dest))
        return write(tmp_path)

    def commit(self) -> list[Path]:
        """Move every staged file to its destination; return the destinations."""
        done = []
        with deferred_signals():  # all files or none: no interrupt between two renames
            for tmp, dest in self._staged:
                publish(tmp, dest, mode=self._mode)
                done.append(dest)
            self._staged.clear()
        return done

    def discard(self) -> None:
        """Delete the temporaries not yet committed."""
        for tmp, _ in self._staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._staged.clear()

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def save_state_dict(state_dict: Mapping[str, Tensor], path: Path, *, kind: str) -> None:
    """Save tensors with ``torch.save`` or, for ``kind == ".safetensors"``, safetensors.

    Tensors are cloned so tied or strided tensors save as independent, contiguous ones.
    """
    plain = {k: v.detach().cpu().clone().contiguous() for k, v in state_dict.items()}
    if kind == ".safetensors":
        from safetensors.torch import save_file

        save_file(plain, str(path))
    else:
        torch.save(plain, path)


def onnx_exporter() -> Callable[..., Any]:
    """``ndcompile.backends.onnx.export_onnx``, imported lazily.

    Raises:
        UsageError: If that module or function is not available.
    """
    try:
        module = importlib.import_module("ndcompile.backends.onnx")
    except ModuleNotFoundError as exc:
        if exc.name not in ("ndcompile.backends.onnx", "ndcompile"):
            raise UsageError(f"ONNX export needs a missing package: {exc}") from exc
        raise UsageError(
            "ONNX export is not available: this installation has no ndcompile.export module",
            hint="write a .pt2 file instead",
        ) from exc
    fn = getattr(module, "export_onnx", None)
    if fn is None:
        raise UsageError("ONNX export is not available: ndcompile.export has no export_onnx")
    return fn


class Progress:
    """A step-by-step progress bar on stderr (tqdm), shown only when asked and on a TTY.

    Args:
        steps: Names of the steps, in order.
        enabled: Show the bar (when stderr is also a terminal).
    """

    def __init__(self, steps: list[str], *, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=len(steps), file=sys.stderr, unit="step", leave=False)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Show ``name`` while its block runs; advance the bar after it."""
        if self.bar is not None:
            self.bar.set_description(name)
        yield
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        """Remove the bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    @property
    def shown(self) -> bool:
        """Whether a bar is displayed."""
        return self.bar is not None
