"""``ndcompile convert`` and the steps the commands share: load the model, convert, verify.

Outputs are staged next to their destinations and published together once
everything has been written and checked (see :class:`~ndcompile.cli.output.StagedOutputs`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ndcompile.backends.serialize import save as save_converted
from ndcompile.cli.data import forward_input_names, load_distill_data
from ndcompile.cli.examples import (
    check_example_names,
    describe_example,
    example_high,
    load_example_file,
    random_example,
    unnamed_inputs_hint,
)
from ndcompile.cli.export import save_program
from ndcompile.cli.loading import (
    UsageError,
    build_model,
    load_calibration,
    load_checkpoint,
    load_state_dict_strict,
    parse_dtype,
    parse_shapes_json,
)
from ndcompile.cli.output import (
    PROGRAM_SUFFIXES,
    STATE_DICT_SUFFIXES,
    Progress,
    StagedOutputs,
    check_output_path,
    onnx_exporter,
    save_state_dict,
)
from ndcompile.compress.distill import distill
from ndcompile.frontend.inputs import ExampleInputs
from ndcompile.pipeline.convert import convert, relative_error
from ndcompile.pipeline.weights import empty_weights
from ndcompile.report import report_of

__all__ = [
    "conversion_kwargs",
    "convert_summary",
    "emit",
    "load_model",
    "run_convert",
    "verify_outputs",
]


def _check_example_options(args: argparse.Namespace) -> None:
    given = [
        flag
        for flag, value in (
            ("--example-shape", args.example_shape),
            ("--example-dtype", args.example_dtype),
            ("--example-high", args.example_high),
        )
        if value
    ]
    if args.example and given:
        raise UsageError(
            f"--example FILE gives the inputs; it does not combine with {', '.join(given)}"
        )
    if not args.example and not args.example_shape:
        raise UsageError(
            f"{args.command} needs --example-shape D0,D1,.. or --example FILE",
            hint="e.g. --example-shape 8,3,32,32, or --example-shape 2,16 --example-dtype long "
            "for token ids",
        )


def load_model(args: argparse.Namespace) -> tuple[nn.Module, ExampleInputs, Any]:
    """Build the model, load its weights, make the example inputs and run the model once."""
    _check_example_options(args)
    dtype = parse_dtype(args.dtype)
    on_disk = getattr(args, "weights_on_disk", False)
    state = load_checkpoint(args.state_dict) if args.state_dict and not on_disk else None
    with empty_weights() if on_disk else contextlib.nullcontext():
        model = build_model(args.model)
    if state is not None:
        load_state_dict_strict(model, state)
    model = model.to(dtype).eval()
    if args.example:
        example = load_example_file(args.example, model, dtype)
        what, hint = f"the --example inputs {describe_example(example)}", None
    else:
        example = random_example(
            args.example_shape,
            args.example_dtype,
            model_dtype=dtype,
            high=example_high(model, args.example_high),
            seed=args.seed,
        )
        check_example_names(model, example, "--example-shape")
        what = f"an example input of shape {describe_example(example)}"
        hint = "pass the input shape the model's forward expects with --example-shape"
    hint = unnamed_inputs_hint(model, example) or hint
    if on_disk:  # the parameters are on the meta device: nothing to run
        return model, example, None
    reference = _run_model(model, example, what, hint=hint)
    return model, example, reference


def _run_model(model: nn.Module, inputs: Any, what: str, hint: str | None) -> Any:
    """``model(*inputs)`` (or the call ``inputs`` describes) without gradients.

    A failure is the user's input: UsageError.
    """
    call = inputs if isinstance(inputs, ExampleInputs) else ExampleInputs(tuple(inputs))
    try:
        with torch.no_grad():
            return call(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        floats = all(t.is_floating_point() for t in call.tensors())
        if floats and re.search(r"\bLong\b|indices|[Ee]mbedding", first):
            hint = "the model takes integer inputs (token ids): add --example-dtype long"
        raise UsageError(
            f"the model rejects {what}: {type(exc).__name__}: {first}", hint=hint
        ) from exc


def distill_batches(
    args: argparse.Namespace, model: torch.nn.Module, example: ExampleInputs
) -> list[tuple[Tensor, ...]]:
    """The ``--distill`` inputs, loaded safely, cut into batches and checked against the model.

    A tensor (or a dict of named input tensors) is cut into batches of the example's
    batch size; the first batch is run through the model to check it fits.
    """
    first = example.tensors()[0]
    batches = load_distill_data(
        args.distill,
        batch_rows=first.shape[0] if first.dim() else 1,
        input_names=forward_input_names(model),
    )
    dtype = parse_dtype(args.dtype)
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
    autotune = {"autotune": args.autotune} if getattr(args, "autotune", None) else {}
    return {
        **autotune,
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


def _checked_calibration(
    model: nn.Module, batches: list[Tensor], dtype: torch.dtype
) -> list[Tensor]:
    """Cast floating calibration batches to the model dtype; check the model accepts them."""
    batches = [b.to(dtype) if b.is_floating_point() else b for b in batches]
    for k, batch in enumerate(batches):
        _run_model(model, (batch,), f"calibration batch {k} of shape {tuple(batch.shape)}", None)
    return batches


def _check_on_disk(args: argparse.Namespace) -> None:
    """``--weights-on-disk`` needs a checkpoint and cannot run the original model."""
    if not args.state_dict:
        raise UsageError(
            "--weights-on-disk reads the weights from --state-dict CKPT",
            hint="add --state-dict model.safetensors",
        )
    for flag, value in (("--calibration", args.calibration), ("--distill", args.distill)):
        if value:
            raise UsageError(
                f"{flag} runs the original model, which --weights-on-disk never loads",
                hint=f"drop {flag}, or drop --weights-on-disk to load the weights first",
            )


def run_convert(args: argparse.Namespace) -> int:
    """``ndcompile convert``: load, convert, verify, then write every output or none."""
    if not args.output and not args.state_dict_out and not args.save:
        raise UsageError(
            "convert needs -o OUT.pt2|OUT.onnx and/or --state-dict-out CKPT and/or "
            "--save FILE.safetensors"
        )
    out = check_output_path(args.output, PROGRAM_SUFFIXES, "-o") if args.output else None
    sd_out = (
        check_output_path(args.state_dict_out, STATE_DICT_SUFFIXES, "--state-dict-out")
        if args.state_dict_out else None
    )  # fmt: skip
    save_out = check_output_path(args.save, (".safetensors",), "--save") if args.save else None
    report_out = check_output_path(args.report, (".json",), "--report") if args.report else None
    export_onnx = onnx_exporter() if out is not None and out.suffix == ".onnx" else None
    kwargs = conversion_kwargs(args)
    if args.weights_on_disk:
        _check_on_disk(args)
        kwargs["weights"] = args.state_dict
    calibration = load_calibration(args.calibration) if args.calibration else None
    progress = Progress(
        ["load", "convert", *(["distill"] if args.distill else []), "verify", "export", "save"],
        enabled=not (args.quiet or args.json),
    )
    try:
        with progress.step("load model"):
            model, example, _ = load_model(args)
        if export_onnx is not None and example.kwargs:
            raise UsageError(
                f"-o {args.output!r}: ONNX export takes positional inputs, not keyword inputs "
                f"({', '.join(example.kwargs)})",
                hint="write a .pt2 file, or give the inputs positionally (--example-shape D0,..)",
            )
        notes = []
        distilled = distill_batches(args, model, example) if args.distill else None
        if calibration is not None:
            calibration = _checked_calibration(model, calibration, parse_dtype(args.dtype))
        if calibration is not None and args.mode == "factorize":
            kwargs["calibration"] = calibration
        elif calibration is not None:
            notes.append(f"mode {args.mode!r} fits nothing: calibration data used to verify only")
        with progress.step(f"convert ({args.mode})"):
            torch.manual_seed(args.seed)
            # A per-layer bar on a terminal (never in logs or pipes, never with --quiet).
            bar = not (args.quiet or args.json) and sys.stderr.isatty()
            converted = convert(model, example, progress=bar, **kwargs)
        report = report_of(converted)
        report.notes.extend(notes)
        if distilled is not None:
            with progress.step("distill"):
                result = distill(
                    converted, model, distilled, steps=args.distill_steps,
                    whole_model_steps=args.distill_steps, whole_model=True, progress=False,
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
                    onnx_example = example.args[0] if len(example.args) == 1 else example.args
                    onnx = staged.stage(out, lambda p: export_onnx(converted, onnx_example, str(p)))
                    if isinstance(getattr(onnx, "max_abs_error", None), float):
                        verification["onnx_max_abs_error"] = onnx.max_abs_error
                elif out is not None:
                    _, verification["export_rel_error"] = staged.stage(
                        out, lambda p: save_program(converted, example, p, notes=report.notes)
                    )
            with progress.step("save"):
                if sd_out is not None:
                    staged.stage(
                        sd_out,
                        lambda p: save_state_dict(converted.state_dict(), p, kind=sd_out.suffix),
                    )
                if save_out is not None:
                    staged.stage(save_out, lambda p: save_converted(converted, p))
                if report_out is not None:
                    staged.stage(report_out, lambda p: p.write_text(report.to_json() + "\n"))
            outputs = (
                (out, "program"), (sd_out, "state_dict"),
                (save_out, "saved"), (report_out, "report"),
            )  # fmt: skip
            for path, key in outputs:
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
    report: Any, verification: dict[str, Any], example: ExampleInputs, written: dict
) -> str:
    """The text ``convert`` prints: the report table, verification results, files written."""
    lines = [str(report)]
    shapes = describe_example(example)
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
