"""Load ``.pt2`` exported programs without running code hidden in them.

``torch.export.load`` trusts its input: it unpickles weights and constants flagged
``use_pickle`` with ``torch.load(weights_only=False)``, falls back to full unpickling
when the sample inputs do not load safely, unpickles opaque and torchbind constants,
loads AOTInductor shared libraries, and hands every symbolic-shape expression to
``sympy.sympify`` (which calls ``eval``). :func:`check_pt2_archive` reads the archive
with torch's own zip reader and refuses any file that would take one of those paths;
:func:`load_exported_program` then loads what passed from the same open file, with no
fallback to the legacy format. Nothing is unpickled beyond tensors and plain containers.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ndcompile.cli.loading import UsageError

__all__ = ["check_pt2_archive", "load_exported_program", "unsafe_reasons"]

_ARCHIVE_VERSION = "archive_version"
_MODELS_DIR = "models/"
_WEIGHTS_DIR = "data/weights/"
_CONSTANTS_DIR = "data/constants/"
_SAMPLE_INPUTS = "data/sample_inputs/{}.pt"
_WEIGHTS_CONFIG = "data/weights/{}_weights_config.json"
_CONSTANTS_CONFIG = "data/constants/{}_constants_config.json"
_TENSOR_CONSTANT_PREFIX = "tensor_"
#: Archive folders whose content is native code loaded by ``torch.export.load``.
_NATIVE_DIRS = ("data/aotinductor/",)

#: Names a symbolic-shape expression may use besides symbols (``s0``, ``u3``, ...):
#: sympy's constructors and assumptions (torch writes ``srepr`` form, e.g.
#: ``Mul(Integer(8), Symbol('s31', positive=True, integer=True))``) and the functions
#: torch's deserializer defines. Anything else (``exec``, ``__import__``, ``chr``,
#: attribute access, subscripts, other strings) is refused.
# fmt: off
_SYMPY_NAMES = frozenset((
    "Symbol", "Dummy", "Integer", "Rational", "Float", "Mul", "Add", "Pow", "Max", "Min",
    "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan",
    "LessThan", "GreaterThan", "Equality", "Unequality", "And", "Or", "Not", "BooleanTrue",
    "BooleanFalse", "true", "false", "True", "False", "oo", "int_oo", "Infinity",
    "NegativeInfinity", "IntInfinity", "NegativeIntInfinity", "Half", "One", "Zero",
    "NegativeOne", "floor", "ceiling", "sqrt", "Piecewise",
    # torch.utils._sympy.functions, as registered by torch's deserializer
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
    # assumptions: Symbol('s0', positive=True, integer=True)
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
    "infinite", "nonzero", "zero", "even", "odd", "rational", "commutative", "precision",
))
# fmt: on
_SYMBOL = re.compile(r"[a-z]+\d+")
_EXPR_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|'(?P<string>[A-Za-z_][A-Za-z0-9_]*)'"
    r"|(?P<op>\*\*|//|==|!=|<=|>=|[-+*/%(),<>~&|=]))"
)


def _unsafe_expression(expr: Any) -> bool:
    """Whether ``expr`` is anything but arithmetic on symbols and known sympy functions."""
    if not isinstance(expr, str):
        return True
    pos, end = 0, len(expr.rstrip())
    while pos < end:
        match = _EXPR_TOKEN.match(expr, pos)
        if match is None:
            return True
        name = match.group("name")
        if name is not None and name not in _SYMPY_NAMES and not _SYMBOL.fullmatch(name):
            return True
        string = match.group("string")
        if string is not None and not _SYMBOL.fullmatch(string):
            return True
        pos = match.end()
    return False


def _expressions(data: Any) -> Iterator[Any]:
    """Every value under an ``expr_str`` key in a JSON document."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "expr_str":
                    yield value
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _payload_problems(config: Any, what: str, *, constants: bool) -> list[str]:
    """Entries of a weights/constants config that torch would unpickle."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        return [f"its {what} config is not a JSON object"]
    problems = []
    for name, meta in entries.items():
        if not isinstance(meta, dict):
            problems.append(f"{what} {name!r} has no valid metadata")
        elif meta.get("use_pickle") is not False:
            problems.append(f"{what} {name!r} is pickled")
        elif constants and not str(meta.get("path_name", "")).startswith(_TENSOR_CONSTANT_PREFIX):
            problems.append(f"{what} {name!r} is a pickled object")
    return problems


def _safe_torch_load(data: bytes) -> bool:
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:
        return False
    return True


def _model_problems(reader: Any, records: set[str], model: str) -> list[str]:
    problems = []
    for legacy in (f"{_WEIGHTS_DIR}{model}.pt", f"{_CONSTANTS_DIR}{model}.pt"):
        if legacy in records:
            problems.append(f"it stores {legacy!r} in the legacy pickled format")
    for fmt, what, constants in ((_WEIGHTS_CONFIG, "weight", False),
                                 (_CONSTANTS_CONFIG, "constant", True)):  # fmt: skip
        name = fmt.format(model)
        if name in records:
            try:
                config = json.loads(reader.get_record(name))
            except ValueError:
                config = None
            problems.extend(_payload_problems(config, what, constants=constants))
    sample = _SAMPLE_INPUTS.format(model)
    if sample in records:
        data = bytes(reader.get_record(sample))
        if data and not _safe_torch_load(data):
            problems.append("its sample inputs need arbitrary unpickling")
    try:
        program = json.loads(reader.get_record(f"{_MODELS_DIR}{model}.json"))
    except ValueError:
        return [*problems, f"its program {model!r} is not valid JSON"]
    bad = next((e for e in _expressions(program) if _unsafe_expression(e)), None)
    if bad is not None:
        problems.append(f"a symbolic shape expression is not plain arithmetic: {str(bad)[:60]!r}")
    return problems


def unsafe_reasons(handle: BinaryIO) -> list[str]:
    """Why loading the archive open in ``handle`` could run code in it (empty: safe).

    Raises:
        RuntimeError: If torch's zip reader cannot read the file (not a ``.pt2``).
    """
    handle.seek(0)
    reader = torch._C.PyTorchFileReader(handle)
    records = set(reader.get_all_records())
    if _ARCHIVE_VERSION not in records:
        return ["it is not in the current .pt2 format (older files are unpickled to load)"]
    problems = [f"it contains native code ({d})" for d in _NATIVE_DIRS
                if any(r.startswith(d) for r in records)]  # fmt: skip
    models = sorted(
        r[len(_MODELS_DIR) : -len(".json")]
        for r in records
        if r.startswith(_MODELS_DIR) and r.endswith(".json")
    )
    if not models:
        problems.append("it holds no exported program")
    for model in models:
        problems.extend(_model_problems(reader, records, model))
    handle.seek(0)
    return problems


def check_pt2_archive(handle: BinaryIO, name: str) -> None:
    """Refuse the archive open in ``handle`` unless it loads without unpickling anything.

    Raises:
        UsageError: If the file is not a readable ``.pt2`` or needs unpickling or native
            code to load.
    """
    try:
        problems = unsafe_reasons(handle)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UsageError(f"cannot read {name!r}: not a .pt2 archive ({first})") from exc
    if problems:
        raise UsageError(
            f"{name!r} needs arbitrary unpickling or code execution to load, which is refused "
            f"for safety: {'; '.join(problems[:3])}"
            + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""),
            hint="re-export it with torch.export.save from plain tensors, or load it "
            "yourself with torch.export.load if you trust it",
        )


#: Packages whose output classes (``ModelOutput``) register their pytree when imported.
_OUTPUT_PACKAGES = ("transformers",)


def _import_output_type(message: str) -> bool:
    """Import the module of an unregistered pytree output type from a known package.

    Only modules of :data:`_OUTPUT_PACKAGES` that are installed are imported (a
    ``.pt2`` of a Hugging Face model returns ``ModelOutput`` dataclasses); returns
    whether one was.
    """
    match = re.search(r"Deserializing ([\w.]+) in pytree is not registered", message)
    module = match.group(1).rpartition(".")[0] if match else ""
    if module.split(".")[0] not in _OUTPUT_PACKAGES:
        return False
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def load_exported_program(path: str | os.PathLike[str]) -> Any:
    """The ``ExportedProgram`` in ``path``, refused if loading it could run code.

    Raises:
        UsageError: If the file is missing, not a ``.pt2`` archive, unsafe (see
            :func:`check_pt2_archive`) or fails to load.
    """
    from torch.export.pt2_archive._package import load_pt2

    name = str(path)
    if not Path(path).is_file():
        raise UsageError(f"exported program {name!r} does not exist")
    with open(path, "rb") as handle:  # one handle: what is checked is what is loaded
        check_pt2_archive(handle, name)
        try:
            try:
                contents = load_pt2(handle)
            except NotImplementedError as exc:  # an output type whose module is not imported
                if not _import_output_type(str(exc)):
                    raise
                handle.seek(0)
                contents = load_pt2(handle)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise UsageError(
                f"cannot load {name!r} with torch.export: {type(exc).__name__}: {first}"
            ) from exc
    program = contents.exported_programs.get("model")
    if program is None:
        raise UsageError(f"{name!r} holds no exported program named 'model'")
    return program
