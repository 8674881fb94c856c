"""``ndcompile convert`` and the steps the commands share: load the model, convert, verify.

Outputs are staged next to their destinations and published together once
everything has been written and checked (see :class:`~ndcompile.cli.output.StagedOutputs`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ndcompile.cli.data import forward_input_names, load_distill_data
from ndcompile.cli.loading import (
    UsageError,
    build_model,
    load_calibration,
    load_checkpoint,
    load_state_dict_strict,
    make_example,
    parse_dtype,
    parse_shape,
    parse_shapes_json,
)
from ndcompile.cli.output import (
    PROGRAM_SUFFIXES,
    STATE_DICT_SUFFIXES,
    Progress,
    StagedOutputs,
    check_output_path,
    export_error,
    onnx_exporter,
    save_program,
    save_state_dict,
)
from ndcompile.compress.distill import distill
from ndcompile.pipeline.convert import convert, relative_error

__all__ = [
    "check_export",
    "conversion_kwargs",
    "convert_summary",
    "emit",
    "load_model",
    "run_convert",
    "verify_outputs",
]


def load_model(args: argparse.Namespace) -> tuple[nn.Module, tuple[Tensor, ...], Any]:
    """Build the model, load its weights, make the example input and run the model once."""
    shapes = [parse_shape(s) for s in args.example_shape]
    dtype = parse_dtype(args.dtype)
    state = load_checkpoint(args.state_dict) if args.state_dict else None
    model = build_model(args.model)
    if state is not None:
        load_state_dict_strict(model, state)
    model = model.to(dtype).eval()
    example = make_example(shapes, dtype, args.seed)
    reference = _run_model(
        model,
        example,
        "an example input of shape " + ", ".join(str(tuple(t.shape)) for t in example),
        hint="pass the input shape the model's forward expects with --example-shape",
    )
    return model, example, reference


def _run_model(model: nn.Module, inputs: tuple[Tensor, ...], what: str, hint: str | None) -> Any:
    """``model(*inputs)`` without gradients; a failure is the user's input: UsageError."""
    try:
        with torch.no_grad():
            return model(*inputs)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UsageError(
            f"the model rejects {what}: {type(exc).__name__}: {first}", hint=hint
        ) from exc


def distill_batches(
    args: argparse.Namespace, model: torch.nn.Module, example: tuple[Tensor, ...]
) -> list[tuple[Tensor, ...]]:
    """The ``--distill`` inputs, loaded safely, cut into batches and checked against the model.

    A tensor (or a dict of named input tensors) is cut into batches of the example's
    batch size; the first batch is run through the model to check it fits.
    """
    batches = load_distill_data(
        args.distill,
        batch_rows=example[0].shape[0] if example[0].dim() else 1,
        input_names=forward_input_names(model),
    )
    dtype = example[0].dtype
    batches = [tuple(t.to(dtype) if t.is_floating_point() else t for t in b) for b in batches]
    shapes = ", ".join(str(tuple(t.shape)) for t in batches[0])
    _run_model(model, batches[0], f"--distill batch 0 of shape {shapes}", None)
    return batches


def conversion_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`ndcompile.convert` from the parsed options."""
    budget = getattr(args, "budget", None)
    if args.mode == "factorize" and args.rank is None and args.tol is None and budget is None:
        raise UsageError(
            "--mode factorize needs --rank R, --tol T or --budget B", hint="e.g. --rank 4"
        )
    for flag, value in (("--tol", args.tol), ("--budget", budget)):
        if value is not None and args.mode != "factorize":
            raise UsageError(f"{flag} applies to --mode factorize only, not {args.mode!r}")
    if budget is not None and budget > 1:
        raise UsageError(f"--budget is a fraction of the dense parameters (0, 1], got {budget}")
    return {
        "mode": args.mode,
        "rank": args.rank,
        "tol": args.tol,
        "budget": budget,
        "shapes": parse_shapes_json(args.shapes) if args.shapes else None,
        "include": args.include,
        "exclude": args.exclude,
        "optimizer": args.optimizer,
    }


def emit(args: argparse.Namespace, text: str, data: dict[str, Any]) -> None:
    """Print ``data`` as JSON with ``--json``, else ``text`` unless ``--quiet``."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    elif not getattr(args, "quiet", False):
        print(text)


def verify_outputs(
    model: nn.Module,
    converted: nn.Module,
    report: Any,
    calibration: list[Tensor] | None,
) -> dict[str, Any]:
    """Output errors of ``converted`` vs ``model``.

    The error on the example input comes from the report; the calibration batches,
    when given, are run through both models (except in ``fresh`` mode, untrained).
    """
    result: dict[str, Any] = {"output_rel_error": report.output_rel_error}
    if calibration and report.mode != "fresh":
        with torch.no_grad():
            ref = [model(c) for c in calibration]
            got = [converted(c) for c in calibration]
        result["calibration_rel_error"] = relative_error(ref, got)
    return result


def check_export(program: Any, converted: nn.Module, example: tuple[Tensor, ...]) -> float:
    """Relative error of the exported program vs ``converted``; raise beyond fp tolerance."""
    return export_error(program, converted, example)


def _checked_calibration(
    model: nn.Module, batches: list[Tensor], dtype: torch.dtype
) -> list[Tensor]:
    """Cast floating calibration batches to the model dtype; check the model accepts them."""
    batches = [b.to(dtype) if b.is_floating_point() else b for b in batches]
    for k, batch in enumerate(batches):
        _run_model(model, (batch,), f"calibration batch {k} of shape {tuple(batch.shape)}", None)
    return batches


def run_convert(args: argparse.Namespace) -> int:
    """``ndcompile convert``: load, convert, verify, then write every output or none."""
    if not args.output and not args.state_dict_out:
        raise UsageError("convert needs -o OUT.pt2|OUT.onnx and/or --state-dict-out CKPT")
    out = check_output_path(args.output, PROGRAM_SUFFIXES, "-o") if args.output else None
    sd_out = (
        check_output_path(args.state_dict_out, STATE_DICT_SUFFIXES, "--state-dict-out")
        if args.state_dict_out else None
    )  # fmt: skip
    report_out = check_output_path(args.report, (".json",), "--report") if args.report else None
    export_onnx = onnx_exporter() if out is not None and out.suffix == ".onnx" else None
    kwargs = conversion_kwargs(args)
    calibration = load_calibration(args.calibration) if args.calibration else None
    progress = Progress(
        ["load", "convert", *(["distill"] if args.distill else []), "verify", "export", "save"],
        enabled=not (args.quiet or args.json),
    )
    try:
        with progress.step("load model"):
            model, example, _ = load_model(args)
        notes = []
        distilled = distill_batches(args, model, example) if args.distill else None
        if calibration is not None:
            calibration = _checked_calibration(model, calibration, example[0].dtype)
        if calibration is not None and args.mode == "factorize":
            kwargs["calibration"] = calibration
        elif calibration is not None:
            notes.append(f"mode {args.mode!r} fits nothing: calibration data used to verify only")
        with progress.step(f"convert ({args.mode})"):
            torch.manual_seed(args.seed)
            converted = convert(model, example, **kwargs)
        report = converted.report
        report.notes.extend(notes)
        if distilled is not None:
            with progress.step("distill"):
                result = distill(
                    converted, model, distilled, steps=args.distill_steps,
                    whole_model=True, progress=False,
                )  # fmt: skip
                report.notes.append(
                    "distilled: " + "; ".join(
                        f"{e.name} {e.error_before:.3g} -> {e.error_after:.3g}"
                        for e in result.layers
                    )
                )  # fmt: skip
        with progress.step("verify"):
            verification = verify_outputs(model, converted, report, calibration)
        written: dict[str, str] = {}
        with StagedOutputs() as staged:
            with progress.step("export"):
                if out is not None and export_onnx is not None:
                    onnx_example = example[0] if len(example) == 1 else example
                    onnx = staged.stage(out, lambda p: export_onnx(converted, onnx_example, str(p)))
                    if isinstance(getattr(onnx, "max_abs_error", None), float):
                        verification["onnx_max_abs_error"] = onnx.max_abs_error
                elif out is not None:
                    program = staged.stage(
                        out, lambda p: save_program(converted, example, p, notes=report.notes)
                    )
                    verification["export_rel_error"] = check_export(program, converted, example)
            with progress.step("save"):
                if sd_out is not None:
                    staged.stage(
                        sd_out,
                        lambda p: save_state_dict(converted.state_dict(), p, kind=sd_out.suffix),
                    )
                if report_out is not None:
                    staged.stage(report_out, lambda p: p.write_text(report.to_json() + "\n"))
            for path, key in ((out, "program"), (sd_out, "state_dict"), (report_out, "report")):
                if path is not None:
                    written[key] = str(path)
            staged.commit()
    finally:
        progress.close()
    emit(args, convert_summary(report, verification, example, written), {
        "command": "convert", "report": report.to_dict(),
        "verification": verification, "outputs": written,
    })  # fmt: skip
    return 0


def convert_summary(
    report: Any, verification: dict[str, Any], example: tuple[Tensor, ...], written: dict
) -> str:
    """The text ``convert`` prints: the report table, verification results, files written."""
    lines = [str(report)]
    shapes = ", ".join(str(tuple(t.shape)) for t in example)
    if verification.get("output_rel_error") is not None:
        lines.append(
            f"verify: output relative error vs the original {verification['output_rel_error']:.2e} "
            f"(example input {shapes})"
        )
    if verification.get("calibration_rel_error") is not None:
        lines.append(
            "verify: output relative error vs the original "
            f"{verification['calibration_rel_error']:.2e} (calibration data)"
        )
    if "export_rel_error" in verification:
        lines.append(
            "verify: exported program matches the converted module "
            f"(relative error {verification['export_rel_error']:.1e})"
        )
    if "onnx_max_abs_error" in verification:
        lines.append(
            "verify: onnxruntime matches the converted module "
            f"(max abs error {verification['onnx_max_abs_error']:.1e})"
        )
    for path in written.values():
        lines.append(f"wrote {path} ({Path(path).stat().st_size / 1024:.1f} KiB)")
    return "\n".join(lines)
