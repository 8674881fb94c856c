"""ONNX export of converted models, verified in onnxruntime.

:func:`export_onnx` hands a converted ``fx.GraphModule`` to torch's ONNX exporter
(the ``torch.export``-based "dynamo" path first, the TorchScript path as a
fallback), checks that the planned contractions arrived as ``MatMul``/``Reshape``/
``Transpose`` nodes rather than one ``Einsum``, runs the file in onnxruntime on
the CPU against the PyTorch output, and only then moves it to its destination.
The factors stay separate initializers: the dense weight is never materialised.

Example::

    report = export_onnx(converted, images, "model.onnx")
    print(report)            # exporter, opset, op histogram, max error
    time_onnxruntime("model.onnx", images, iters=50)   # median ms
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from ndcompile.errors import NdCompileError
from ndcompile.fileio import publish, temp_path_for
from ndcompile.frontend.trace import as_tuple

__all__ = [
    "ExportReport",
    "export_onnx",
    "onnx_op_histogram",
    "run_onnxruntime",
    "time_onnxruntime",
]

_INSTALL_HINT = 'install the ONNX extra: pip install -e ".[onnx]"'


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how well it matches PyTorch.

    Attributes:
        path: The ONNX file.
        exporter: ``"dynamo"`` or ``"torchscript"``.
        opset: The default-domain opset of the file.
        op_histogram: Node count per ONNX op type (subgraphs and functions included).
        max_abs_error: Largest ``|onnxruntime - PyTorch|`` over the checked inputs.
        batch_sizes: Leading-dim sizes the file was checked at in onnxruntime.
        notes: Fallbacks and remarks.
    """

    path: Path
    exporter: str
    opset: int
    op_histogram: dict[str, int] = field(default_factory=dict)
    max_abs_error: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        ops = ", ".join(f"{op}: {n}" for op, n in sorted(self.op_histogram.items()))
        lines = [
            f"ExportReport({str(self.path)!r})",
            f"  exporter: {self.exporter}, opset {self.opset}",
            f"  ops: {ops}",
            f"  onnxruntime vs PyTorch: max abs error {self.max_abs_error:.2e} "
            f"at batch sizes {self.batch_sizes}",
        ]
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _require(name: str) -> ModuleType:
    try:
        return __import__(name)
    except ImportError as exc:
        raise NdCompileError(f"ONNX export needs the {name!r} package", hint=_INSTALL_HINT) from exc


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's warnings and log chatter (restored on exit)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _tensor_inputs(example_input: Any) -> tuple[Tensor, ...]:
    inputs = as_tuple(example_input)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise NdCompileError(
            f"export needs example inputs that are tensors, got "
            f"{[type(t).__name__ for t in inputs]}",
            hint="pass a tensor or a tuple of tensors the model accepts",
        )
    return tuple(t.detach().cpu() for t in inputs)


def _outputs(model: nn.Module, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    with torch.no_grad():
        out = model(*inputs)
    return [t for t in tree_leaves(out) if isinstance(t, Tensor)]


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def onnx_op_histogram(model_proto: Any) -> dict[str, int]:
    """Count nodes per op type in an ``onnx.ModelProto`` (subgraphs and functions too)."""
    counts: Counter[str] = Counter()

    def visit(nodes: Any) -> None:
        for node in nodes:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.HasField("g"):
                    visit(attr.g.node)
                for graph in attr.graphs:
                    visit(graph.node)

    visit(model_proto.graph.node)
    for function in model_proto.functions:
        visit(function.node)
    return dict(counts)


def run_onnxruntime(path: str | os.PathLike, inputs: Any, *, threads: int | None = None) -> list:
    """Run an ONNX file in onnxruntime (CPU) on tensors; returns its outputs as numpy arrays."""
    ort = _require("onnxruntime")
    session = _session(ort, path, threads)
    return session.run(None, _feeds(session, _tensor_inputs(inputs)))


def _session(ort: ModuleType, path: str | os.PathLike, threads: int | None) -> Any:
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise NdCompileError(
            f"onnxruntime cannot load {os.fspath(path)!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _feeds(session: Any, inputs: tuple[Tensor, ...]) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise NdCompileError(
            f"the ONNX file takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}"
        )
    return {name: _numpy(t) for name, t in zip(names, inputs, strict=True)}


def time_onnxruntime(
    path: str | os.PathLike,
    example: Any,
    iters: int = 50,
    *,
    warmup: int = 3,
    threads: int | None = None,
) -> float:
    """Median wall time of one onnxruntime (CPU) run of ``path`` on ``example``, in ms.

    Args:
        path: An ONNX file.
        example: A tensor or tuple of tensors.
        iters: Timed runs.
        warmup: Untimed runs first.
        threads: onnxruntime intra-op threads (default: its own choice).

    Returns:
        The median over ``iters`` runs, in milliseconds.
    """
    ort = _require("onnxruntime")
    session = _session(ort, path, threads)
    feeds = _feeds(session, _tensor_inputs(example))
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(max(int(iters), 1)):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _export_dynamo(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    path: str,
    dynamic_batch: bool,
    opset: int | None,
) -> None:
    _require("onnxscript")
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if t.dim() else None for t in inputs)
    torch.onnx.export(
        model,
        inputs,
        path,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        opset_version=opset,
        external_data=False,
        verbose=False,
    )


def _export_torchscript(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    n_outputs: int,
    path: str,
    dynamic_batch: bool,
    opset: int | None,
) -> None:
    input_names = [f"input_{k}" for k in range(len(inputs))]
    output_names = [f"output_{k}" for k in range(n_outputs)]
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n in input_names + output_names}
    torch.onnx.export(
        model,
        inputs,
        path,
        dynamo=False,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
        opset_version=opset,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _check_batches(inputs: tuple[Tensor, ...], dynamic_batch: bool) -> list[tuple[Tensor, ...]]:
    """The example, plus (for a dynamic batch) the example with one row repeated."""
    batches = [inputs]
    if dynamic_batch and all(t.dim() and t.shape[0] == inputs[0].shape[0] for t in inputs):
        batches.append(tuple(torch.cat([t, t[:1]]) for t in inputs))
    return batches


def export_onnx(
    converted: nn.Module,
    example_input: Any,
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    allow_einsum: bool = False,
    tol: float = 1e-4,
) -> ExportReport:
    """Export ``converted`` to ONNX and verify it in onnxruntime.

    The dynamo exporter (``torch.onnx.export(..., dynamo=True)``) is tried first;
    if it fails, the TorchScript exporter is used and the failure is noted. The
    file is written to a temporary name next to ``path`` and renamed only once
    it has been verified, so ``path`` never holds a partial or wrong file. The
    model is exported in eval mode from a copy (the caller's module is untouched).

    Args:
        converted: A converted model (any ``nn.Module`` works).
        example_input: A tensor or tuple of tensors the model accepts.
        path: Destination ``.onnx`` file.
        dynamic_batch: Make the leading dim of every input (and output) symbolic.
        opset: ONNX opset (default: the exporter's).
        allow_einsum: Accept ``Einsum`` nodes (by default one means a contraction
            was not lowered to the planned matmuls, and export fails).
        tol: Largest accepted ``max |ort - torch| / max(1, max |torch|)``.

    Returns:
        An :class:`ExportReport`.

    Raises:
        NdCompileError: onnx/onnxruntime missing, both exporters failing, an
            ``Einsum`` node, or onnxruntime disagreeing with PyTorch.
    """
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    inputs = _tensor_inputs(example_input)
    model = copy.deepcopy(converted).cpu().eval()
    references = [_outputs(model, batch) for batch in _check_batches(inputs, dynamic_batch)]
    dest = Path(path)
    if not dest.parent.exists():
        raise NdCompileError(
            f"cannot write {str(dest)!r}: directory {str(dest.parent)!r} is missing"
        )
    tmp = os.fspath(temp_path_for(dest))  # published only once verified
    try:
        notes: list[str] = []
        with _quiet_exporter():
            try:
                _export_dynamo(model, inputs, tmp, dynamic_batch, opset)
                exporter = "dynamo"
            except Exception as exc:
                if isinstance(exc, NdCompileError):
                    notes.append(
                        "dynamo exporter unavailable (onnxscript missing); used TorchScript"
                    )
                else:
                    notes.append(f"dynamo exporter failed ({_first_line(exc)}); used TorchScript")
                try:
                    _export_torchscript(
                        model, inputs, len(references[0]), tmp, dynamic_batch, opset
                    )
                    exporter = "torchscript"
                except Exception as exc2:
                    raise NdCompileError(
                        f"ONNX export failed with both exporters: {notes[-1]}; "
                        f"TorchScript: {_first_line(exc2)}",
                        layer=type(converted).__name__,
                        hint="export the dense equivalent (ndcompile.backends.dense.to_dense) or "
                        "torch.export the model instead",
                    ) from exc2
        proto = onnx.load(tmp)
        histogram = onnx_op_histogram(proto)
        if histogram.get("Einsum") and not allow_einsum:
            raise NdCompileError(
                f"the exported graph holds {histogram['Einsum']} Einsum node(s): a contraction "
                "was not lowered to the planned MatMul/Reshape/Transpose ops",
                layer=type(converted).__name__,
                hint="convert the model with ndcompile.convert first, or pass allow_einsum=True",
            )
        if histogram.get("Einsum"):
            notes.append(f"{histogram['Einsum']} Einsum node(s) allowed")
        opset_used = next(
            (int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0
        )
        session = _session(ort, tmp, None)
        max_err, sizes = 0.0, []
        for batch, expected in zip(_check_batches(inputs, dynamic_batch), references, strict=True):
            got = session.run(None, _feeds(session, batch))
            if len(got) != len(expected):
                raise NdCompileError(
                    f"onnxruntime returned {len(got)} outputs, PyTorch {len(expected)}"
                )
            for g, e in zip(got, expected, strict=True):
                ref = _numpy(e).astype(np.float64)
                if tuple(g.shape) != ref.shape:
                    raise NdCompileError(
                        f"onnxruntime output shape {tuple(g.shape)} != PyTorch {ref.shape} at "
                        f"input shapes {[tuple(t.shape) for t in batch]}",
                        hint="export with dynamic_batch=False if the model fixes its batch size",
                    )
                err = float(np.max(np.abs(g.astype(np.float64) - ref))) if ref.size else 0.0
                scale = max(1.0, float(np.max(np.abs(ref))) if ref.size else 0.0)
                if not err <= tol * scale:
                    raise NdCompileError(
                        f"onnxruntime disagrees with PyTorch: max abs error {err:.3e} "
                        f"(tolerance {tol * scale:.3e}) at input shapes "
                        f"{[tuple(t.shape) for t in batch]}",
                        layer=type(converted).__name__,
                        hint="the file was not written; please report this with the model",
                    )
                max_err = max(max_err, err)
            sizes.append(int(batch[0].shape[0]) if batch[0].dim() else 1)
        publish(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return ExportReport(
        path=dest,
        exporter=exporter,
        opset=opset_used,
        op_histogram=histogram,
        max_abs_error=max_err,
        batch_sizes=sizes,
        notes=notes,
    )
