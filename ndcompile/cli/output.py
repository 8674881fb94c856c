"""All-or-nothing output files and progress display for the command line.

Every output is first written to a temporary file in its destination folder;
:meth:`StagedOutputs.commit` moves them all into place with ``os.replace`` once
every one of them has been written, so a failure never leaves a partial file.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ndcompile.cli.loading import UsageError
from ndcompile.errors import NdCompileError

__all__ = [
    "PROGRAM_SUFFIXES",
    "STATE_DICT_SUFFIXES",
    "Progress",
    "StagedOutputs",
    "check_output_path",
    "onnx_exporter",
    "save_program",
    "save_state_dict",
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


class StagedOutputs:
    """Write files to temporaries next to their destinations; publish them together.

    Use as a context manager: temporaries left when the block exits (because of
    an error, or without :meth:`commit`) are deleted.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []
        umask = os.umask(0)
        os.umask(umask)
        self._mode = 0o666 & ~umask  # what open() would give a new file

    def stage(self, dest: Path, write: Callable[[Path], Any]) -> Any:
        """Call ``write(tmp_path)`` and return its result; the file moves to ``dest`` on commit."""
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.stem}.", suffix=dest.suffix)
        os.close(fd)
        tmp_path = Path(tmp)
        self._staged.append((tmp_path, dest))
        return write(tmp_path)

    def commit(self) -> list[Path]:
        """Move every staged file to its destination; return the destinations."""
        done = []
        for tmp, dest in self._staged:
            os.chmod(tmp, self._mode)  # mkstemp creates files readable by the owner only
            os.replace(tmp, dest)
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


def save_program(module: nn.Module, example: tuple[Tensor, ...], path: Path) -> Any:
    """``torch.export.export`` ``module`` on ``example`` and ``torch.export.save`` it.

    Returns:
        The ``ExportedProgram``.

    Raises:
        NdCompileError: If export fails.
    """
    try:
        program = torch.export.export(module, example)
    except Exception as exc:
        raise NdCompileError(
            f"torch.export failed on the converted model: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            hint="save the weights with --state-dict-out instead",
        ) from exc
    with open(path, "wb") as handle:  # a handle, so the archive is not named after the temp file
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
