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
from torch import Tensor, nn

from ndcompile.cli.loading import UsageError
from ndcompile.errors import NdCompileError
from ndcompile.fileio import default_file_mode, publish, temp_path_for
from ndcompile.pipeline.checks import relative_error

__all__ = [
    "PROGRAM_SUFFIXES",
    "STATE_DICT_SUFFIXES",
    "Progress",
    "StagedOutputs",
    "Terminated",
    "check_output_path",
    "deferred_signals",
    "export_error",
    "export_program",
    "onnx_exporter",
    "save_program",
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


#: Rows of the example input an exported program is traced (and stored) with.
EXPORT_ROWS = 2


def _few_rows(example: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The first :data:`EXPORT_ROWS` rows of each input (repeated if it has fewer), copied.

    A copy, so the program stores a small tensor rather than a view of the whole input.
    """
    out = []
    for t in example:
        if t.dim() == 0:
            out.append(t.clone())
        elif t.shape[0] >= EXPORT_ROWS:
            out.append(t[:EXPORT_ROWS].clone())
        else:
            reps = -(-EXPORT_ROWS // max(t.shape[0], 1))
            out.append(t.repeat(reps, *([1] * (t.dim() - 1)))[:EXPORT_ROWS].clone())
    return tuple(out)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


#: Largest relative error of an exported program vs the module, per dtype (default 1e-2).
EXPORT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def export_error(program: Any, module: nn.Module, example: tuple[Tensor, ...]) -> float:
    """Relative error of ``program`` vs ``module`` on ``example``.

    Raises:
        NdCompileError: Beyond floating-point tolerance for the example's dtype.
        Exception: Whatever running the program raises (e.g. a shape guard).
    """
    with torch.no_grad():
        want, got = module(*example), program.module()(*example)
    err = relative_error(want, got)
    if err > EXPORT_TOLERANCE.get(example[0].dtype, 1e-2):
        raise NdCompileError(
            f"the exported program differs from the converted module (relative error {err:.2e})",
            hint="save the weights with --state-dict-out and report the model",
        )
    return err


def export_program(module: nn.Module, example: tuple[Tensor, ...]) -> tuple[Any, str | None]:
    """``torch.export`` ``module`` with a dynamic batch dimension, or statically if it must.

    The program is traced on a few rows of ``example`` with dim 0 of every input
    dynamic and checked on the whole ``example``; it stores those few rows as its
    sample inputs. If that fails, it is exported with the shapes of ``example``
    (and stores no sample inputs), and the note says so.

    Returns:
        The ``ExportedProgram`` and a note for the report (``None`` when dynamic).

    Raises:
        NdCompileError: If the static export fails too.
    """
    from torch.export import Dim

    batched = [t.dim() > 0 for t in example]
    if any(batched):
        dynamic = tuple({0: Dim.DYNAMIC} if b else None for b in batched)
        try:
            program = torch.export.export(module, _few_rows(example), dynamic_shapes=dynamic)
            export_error(program, module, example)
            return program, None
        except Exception as exc:
            reason = _first_line(exc)[:200]
    else:
        reason = "the inputs have no batch dimension"
    try:
        program = torch.export.export(module, example)
    except Exception as exc:
        raise NdCompileError(
            f"torch.export failed on the converted model: {_first_line(exc)}",
            hint="save the weights with --state-dict-out instead",
        ) from exc
    program.example_inputs = None  # the whole example would be stored otherwise
    shapes = ", ".join(str(tuple(t.shape)) for t in example)
    note = (
        f"exported program has static input shapes {shapes} (only this batch size runs): "
        f"dynamic batch export failed: {reason}"
    )
    return program, note


def save_program(
    module: nn.Module, example: tuple[Tensor, ...], path: Path, notes: list[str] | None = None
) -> Any:
    """Export ``module`` (see :func:`export_program`) and ``torch.export.save`` it to ``path``.

    Args:
        module: The converted module.
        example: The example inputs (the batch dimension is exported dynamic when possible).
        path: The file to write.
        notes: Where a note on a static fallback is appended.

    Returns:
        The ``ExportedProgram``.

    Raises:
        NdCompileError: If export fails.
    """
    program, note = export_program(module, example)
    if note is not None and notes is not None:
        notes.append(note)
    with open(path, "wb") as handle, deferred_signals():
        # a handle, so the archive is not named after the temp file; signals are held
        # because torch's zip writer calls handle.write from C++
        torch.export.save(program, handle)
    return program


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
