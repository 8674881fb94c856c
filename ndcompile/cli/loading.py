"""Safe loading for the command line: model factories, checkpoints, shapes, calibration data.

Everything here turns bad input into a :class:`UsageError` (an ``NdCompileError``)
with a one-line message, so the CLI can report it without a traceback. Checkpoints
are read with ``torch.load(weights_only=True)`` or safetensors: nothing is ever
unpickled beyond tensors and plain containers.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pickle
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ndcompile.errors import NdCompileError

__all__ = [
    "DTYPES",
    "UsageError",
    "build_model",
    "load_calibration",
    "load_checkpoint",
    "load_factory",
    "load_state_dict_strict",
    "load_tensor_file",
    "make_example",
    "parse_dtype",
    "parse_factory_spec",
    "parse_shape",
    "parse_shapes_json",
]

#: ``--dtype`` names accepted by the CLI.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

#: Keys under which training scripts commonly nest the model's state_dict.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")


class UsageError(NdCompileError):
    """Bad command-line input (exit status 2): a missing file, a wrong spec or shape."""


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _failure(exc: BaseException) -> str:
    """What user code did: ``RuntimeError: message`` or ``it called sys.exit(3)``."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({'' if exc.code is None else repr(exc.code)})"
    return _first_line(exc)


def parse_factory_spec(spec: str) -> tuple[str, str]:
    """Split ``"pkg.module:fn"`` or ``"path/to/file.py:fn"`` into (module or path, name).

    Raises:
        UsageError: If the spec has no ``:name`` part or an empty side.
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise UsageError(
            f"model spec {spec!r} is not MODULE:FACTORY",
            hint="e.g. mypkg.models:build or path/to/models.py:build",
        )
    return target, name


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise UsageError(f"model file {str(path)!r} does not exist")
    name = f"_ndcompile_factory_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except KeyboardInterrupt:
        sys.modules.pop(name, None)
        raise
    except BaseException as exc:  # user code: sys.exit() and the like are failures too
        sys.modules.pop(name, None)
        raise UsageError(f"importing {str(path)!r} failed: {_failure(exc)}") from exc
    finally:
        sys.path.remove(folder)
    return module


def _import_module(name: str) -> Any:
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:  # console scripts do not put the working folder on sys.path; python -m does
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise UsageError(
            f"cannot import module {name!r}: {exc}",
            hint="check the spelling, or give a file path: path/to/file.py:factory",
        ) from exc
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # user code: sys.exit() and the like are failures too
        raise UsageError(f"importing module {name!r} failed: {_failure(exc)}") from exc
    finally:
        if added:
            sys.path.remove(cwd)


def load_factory(spec: str) -> Any:
    """Import the callable named by ``spec`` (``pkg.module:fn`` or ``file.py:fn``).

    Raises:
        UsageError: If the module cannot be imported or has no such callable.
    """
    target, name = parse_factory_spec(spec)
    is_file = target.endswith(".py") or os.sep in target or "/" in target
    module = _import_file(Path(target)) if is_file else _import_module(target)
    factory = getattr(module, name, None)
    if not callable(factory):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise UsageError(
            f"{target!r} has no callable {name!r}",
            hint=f"callables defined there: {_short(found)}" if found else None,
        )
    return factory


def build_model(spec: str) -> nn.Module:
    """Call the factory named by ``spec`` with no arguments and check it returns a module.

    Raises:
        UsageError: If the factory fails or returns something other than an ``nn.Module``.
    """
    factory = load_factory(spec)
    try:
        model = factory()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # user code: sys.exit() and the like are failures too
        raise UsageError(f"factory {spec!r} failed: {_failure(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``"8,3,32,32"`` (or ``8x3x32x32``) into a tuple of positive ints.

    Raises:
        UsageError: If a dim is not a positive integer.
    """
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise UsageError(
            f"example shape {text!r} is not a comma-separated list of positive integers",
            hint="e.g. --example-shape 8,3,32,32",
        )
    return dims


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (one of :data:`DTYPES`)."""
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; valid dtypes are: {', '.join(DTYPES)}")
    return DTYPES[name]


def make_example(
    shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[Tensor, ...]:
    """Seeded standard-normal example inputs, one per shape."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=gen, dtype=torch.float32).to(dtype) for s in shapes)


_SHAPES_HINT = "e.g. --shapes '{\"fc1\": [[8, 8, 4], [4, 4, 4]]}' or --shapes modes.json"


def _read_shapes_file(text: str) -> tuple[str, str]:
    """(source name, JSON text) of a ``--shapes`` argument that names a file."""
    path = Path(text)
    if not path.exists():
        raise UsageError(
            f"--shapes file {text!r} does not exist",
            hint="give a JSON file or an inline JSON object: " + _SHAPES_HINT,
        )
    if path.is_dir():
        raise UsageError(f"--shapes {text!r} is a folder, not a JSON file", hint=_SHAPES_HINT)
    try:
        return f"--shapes file {text!r}", path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --shapes file {text!r}: {_first_line(exc)}") from exc


def _modes(source: str, name: str, modes: Any) -> tuple[int, ...]:
    if not isinstance(modes, list) or not modes:
        raise UsageError(
            f"{source}: layer {name!r} must map to [in_modes, out_modes], two lists of "
            f"positive integers; got {json.dumps(modes)} for one of them",
            hint=_SHAPES_HINT,
        )
    bad = [v for v in modes if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise UsageError(
            f"{source}: modes of layer {name!r} must be positive integers, got "
            f"{json.dumps(bad[0])} in {json.dumps(modes)}",
            hint="modes multiply to the layer's features, e.g. [28, 28] for 784",
        )
    return tuple(modes)


def parse_shapes_json(text: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Parse per-layer mode overrides: inline JSON, or the path of a JSON file.

    The format is ``{"fc1": [[8, 8, 4], [4, 4, 4]]}`` (input modes, output modes);
    every mode is a positive integer (``28.9`` or ``"28"`` is an error, not rounded).

    Raises:
        UsageError: If the file does not exist or the text is not JSON of that form.
    """
    source = "--shapes"
    if not text.lstrip().startswith(("{", "[")):
        source, text = _read_shapes_file(text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source} is not valid JSON: {exc}", hint=_SHAPES_HINT) from exc
    if not isinstance(data, dict):
        raise UsageError(
            f"{source} must map layer names to [in_modes, out_modes] (a JSON object), "
            f"not a {type(data).__name__}",
            hint=_SHAPES_HINT,
        )
    out: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for name, spec in data.items():
        if not isinstance(spec, list) or len(spec) != 2:
            raise UsageError(
                f"{source}: layer {name!r} must map to [in_modes, out_modes], "
                f"got {json.dumps(spec)}",
                hint=_SHAPES_HINT,
            )
        out[name] = (_modes(source, name, spec[0]), _modes(source, name, spec[1]))
    return out


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please|\n|$)", str(exc).strip())
        reason = detail.group(1).strip() if detail else str(exc).strip().splitlines()[0]
        if "GLOBAL" not in reason:
            raise UsageError(
                f"cannot read {str(path)!r}: not a torch checkpoint ({reason})"
            ) from exc
        raise UsageError(
            f"{str(path)!r} needs arbitrary unpickling, which is refused for safety "
            f"(torch.load weights_only=True: {reason})",
            hint="re-save it with torch.save(model.state_dict(), path) or as .safetensors",
        ) from exc
    except Exception as exc:
        raise UsageError(f"cannot read {str(path)!r}: {_first_line(exc)}") from exc


def load_tensor_file(path: Path) -> Any:
    """Tensors and plain containers from a ``.safetensors`` or ``torch.save`` file, safely.

    Raises:
        UsageError: If the file is unreadable or needs arbitrary unpickling.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise UsageError(f"cannot read {str(path)!r}: {_first_line(exc)}") from exc
    return _torch_load(path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a state_dict from a torch checkpoint or a ``.safetensors`` file, safely.

    A dict nested under ``state_dict``/``model_state_dict``/``model`` is accepted.

    Raises:
        UsageError: If the file is missing, unreadable, needs arbitrary unpickling,
            or does not hold a mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} does not exist")
    data = load_tensor_file(path)
    if isinstance(data, Mapping):
        for key in _NESTED_KEYS:
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    if not isinstance(data, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()
    ):
        raise UsageError(
            f"{str(path)!r} does not hold a state_dict (a mapping of names to tensors); "
            f"found {type(data).__name__}"
        )
    return dict(data)


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load ``state_dict`` into ``model`` strictly, with a one-line error on mismatch.

    Raises:
        UsageError: Listing missing keys, unexpected keys and shape mismatches.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {_short(wrong)}")
    if problems:
        raise UsageError("state_dict does not match the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def load_calibration(path: str | os.PathLike) -> list[Tensor]:
    """Load calibration inputs: a tensor or a list/tuple of tensors saved with torch.save.

    Raises:
        UsageError: If the file is unreadable or holds anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"calibration file {str(path)!r} does not exist")
    data = _torch_load(path)
    if isinstance(data, Tensor):
        return [data]
    if isinstance(data, list | tuple) and data and all(isinstance(t, Tensor) for t in data):
        return list(data)
    raise UsageError(
        f"calibration file {str(path)!r} must hold a tensor or a list of tensors, "
        f"found {type(data).__name__}"
    )
