"""Compile generated C kernels with the machine's C compiler and load them with ctypes.

Kernels are built on Linux for the host CPU (``-march=native``) with OpenMP, which links
the ``libgomp`` PyTorch already loaded, so they share its thread pool. Built
libraries are cached under ``<cache_dir>/kernels`` (see
:func:`ndcompile.planner.cache.cache_dir`), keyed by the source, the compiler, its
flags and the CPU, so a cache shared between machines never hands one machine
another's instructions. A cache directory that other users can write to is not
used (a library there could be swapped for theirs); the process then builds into a
private temporary directory.

``NDCOMPILE_KERNELS=0`` turns the fused kernels off; ``CC`` picks the compiler
(default ``cc``, then ``gcc``). Without a working compiler the kernels are simply
unavailable and layers run their planned library GEMMs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

from ndcompile.kernels.codegen import VectorUnit, probe_source
from ndcompile.planner.cache import cache_dir

__all__ = ["KernelBuildWarning", "compile_library", "kernels_enabled", "vector_unit"]

_LOCK = threading.Lock()
_FAILED: set[str] = set()


class KernelBuildWarning(UserWarning):
    """A generated kernel failed to compile; the layer runs its library GEMMs instead."""


def kernels_enabled() -> bool:
    """Whether fused kernels may be used: on Linux, unless ``NDCOMPILE_KERNELS=0``."""
    return sys.platform.startswith("linux") and os.environ.get("NDCOMPILE_KERNELS", "1") != "0"


@functools.cache
def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


@functools.cache
def _compiler_version(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.splitlines()[0] if done.stdout else ""


@functools.cache
def _cpu_signature() -> str:
    """The CPU's model and feature flags (what ``-march=native`` compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [
        line
        for line in text.splitlines()
        if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")
    ]
    return "\n".join(sorted(set(keep)))


def _flags() -> list[str]:
    arch = "-mcpu=native" if platform.machine() in ("aarch64", "arm64") else "-march=native"
    # -ffp-contract=fast: ``c += a * b`` on vectors becomes one fused multiply-add.
    return ["-O3", arch, "-fPIC", "-shared", "-std=gnu11", "-ffp-contract=fast", "-fopenmp"]


def compile_library(source: str, tag: str) -> ctypes.CDLL | None:
    """Build ``source`` into a shared library (cached) and load it.

    Args:
        source: A C translation unit.
        tag: A short name for the file (and for the warning if it fails).

    Returns:
        The loaded library, or None when there is no compiler or the build failed
        (warned once per source with :class:`KernelBuildWarning`).
    """
    cc = _compiler()
    if cc is None:
        return None
    flags = _flags()
    key = hashlib.sha256(
        "\0".join([source, cc, _compiler_version(cc), *flags, _cpu_signature()]).encode()
    ).hexdigest()[:20]
    if key in _FAILED:
        return None
    folder = _kernel_dir()
    path = folder / f"{tag}-{key}.so"
    with _LOCK:
        if not path.exists():
            error = _build(cc, flags, source, folder, path)
            if error is not None:
                _FAILED.add(key)
                warnings.warn(
                    f"ndcompile: the fused kernel {tag} did not compile ({error}); "
                    "its layers run library GEMMs instead (set NDCOMPILE_KERNELS=0 "
                    "to skip the attempt)",
                    KernelBuildWarning,
                    stacklevel=3,
                )
                return None
        try:
            return ctypes.CDLL(str(path))
        except OSError as exc:
            _FAILED.add(key)
            warnings.warn(
                f"ndcompile: could not load the fused kernel {path}: {exc}",
                KernelBuildWarning,
                stacklevel=3,
            )
            return None


def _kernel_dir() -> Path:
    """Where built kernels live: ``<cache_dir>/kernels`` when only this user can write it.

    A library loaded from a directory other users can write to could be replaced
    by theirs, so such a cache (and one owned by someone else) is not used: this
    process builds into a private temporary directory instead.
    """
    folder = cache_dir() / "kernels"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if _private(folder):
            return folder
    except OSError:
        pass
    return _private_dir()


def _private(folder: Path) -> bool:
    info = folder.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


@functools.cache
def _private_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="ndcompile-kernels-"))


def _build(cc: str, flags: list[str], source: str, folder: Path, path: Path) -> str | None:
    """Compile into ``path`` atomically; the compiler's first error line, or None."""
    try:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src = Path(tmp) / "kernel.c"
            src.write_text(source)
            out = Path(tmp) / "kernel.so"
            done = subprocess.run(
                [cc, *flags, str(src), "-o", str(out)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode != 0:
                lines = [ln for ln in done.stderr.splitlines() if "error" in ln]
                return (lines or done.stderr.splitlines() or ["unknown error"])[0].strip()
            os.replace(out, path)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return None


@functools.cache
def vector_unit() -> VectorUnit | None:
    """The vector width and register file the compiler targets here, or None.

    None when kernels cannot be built on this machine (no compiler, or the probe
    failed to compile).
    """
    lib = compile_library(probe_source(), "probe")
    if lib is None:
        return None
    stream = {2: "avx512", 1: "avx"}.get(int(lib.ndc_stream_kind()), "")
    return VectorUnit(int(lib.ndc_vector_bytes()), int(lib.ndc_vector_registers()), stream)
