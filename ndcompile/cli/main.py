"""The ``ndcompile`` command: ``convert``, ``inspect`` and ``bench`` a model offline.

Examples::

    ndcompile convert mypkg.models:build --state-dict ckpt.pt --example-shape 8,3,32,32 \\
        --mode factorize --rank 2 -o model.pt2 --report report.json
    ndcompile inspect mypkg.models:build --example-shape 8,3,32,32
    ndcompile inspect model.pt2
    ndcompile bench path/to/models.py:build --example-shape 8,3,32,32 --mode fresh

Bad input exits with status 2 and conversion failures with status 1, each with
one ``ndcompile: error: ...`` line on stderr (set ``NDCOMPILE_TRACEBACK=1`` to see
the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

import torch

from ndcompile import __version__
from ndcompile.cli.archive import load_exported_program
from ndcompile.cli.bench import format_timings, time_models
from ndcompile.cli.convert import conversion_kwargs, emit, load_model, run_convert
from ndcompile.cli.inspect import describe_program, format_plan, format_program, plan_model
from ndcompile.cli.loading import DTYPES, UsageError
from ndcompile.cli.output import Terminated, terminate_on_signals
from ndcompile.errors import NdCompileError
from ndcompile.ir.network import OPTIMIZERS
from ndcompile.pipeline.convert import MODES, convert
from ndcompile.planner.autotune import AUTOTUNE_MODES

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "build_parser", "format_error", "main"]

#: Exit status when the conversion (or export) fails.
EXIT_FAILED = 1
#: Exit status for bad command-line input.
EXIT_USAGE = 2


_EPILOG = """examples:
  ndcompile convert mypkg.models:build --state-dict ckpt.pt --example-shape 8,3,32,32 \\
      --mode factorize --rank 2 -o model.pt2 --report report.json
  ndcompile inspect mypkg.models:build --example-shape 8,3,32,32
  ndcompile inspect model.pt2
  ndcompile bench path/to/models.py:build --example-shape 8,3,32,32 --mode fresh
  ndcompile convert hf.py:build --example-shape 2,16 --example-dtype long --mode fresh \\
      -o model.pt2 --save model.safetensors
  ndcompile inspect hf.py:build --example inputs.pt

exit status: 0 done, 1 conversion failed, 2 bad input (set NDCOMPILE_TRACEBACK=1 for tracebacks)
"""

_MODE_HELP = (
    "fresh: new trainable NdLinear layers; factorize: fit trained weights (lossy, needs "
    "--rank or --tol); exact: function-preserving rewrites only; adapter: frozen dense "
    "layers + trainable NdLinear adapters"
)


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors become :class:`UsageError` (one line, exit 2)."""

    def error(self, message: str) -> NoReturn:
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        raise UsageError(f"{sub}: {message}" if sub else message)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dict", metavar="CKPT", help="weights: torch.save file or .safetensors")
    p.add_argument(
        "--example-shape",
        action="append",
        metavar="[NAME=]D0,D1,..",
        help="shape of a random example input, positional or NAME=.. by keyword (repeat for "
        "models with several inputs)",
    )
    p.add_argument(
        "--example-dtype",
        action="append",
        metavar="DTYPE",
        help="dtype of the random inputs: one for all or one per --example-shape (long, int32, "
        "bool, float32, ...; default: --dtype); integer inputs are token ids",
    )
    p.add_argument(
        "--example-high",
        type=_positive_int,
        metavar="N",
        help="integer inputs are drawn from [0, N) (default: the model's config.vocab_size, "
        "else 2)",
    )
    p.add_argument(
        "--example", metavar="FILE",
        help="example inputs (.pt or .safetensors): a dict of named tensors (keyword "
        "arguments), a tensor or a list of tensors (positional)",
    )  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="model/input dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the example input and init")


def _add_conversion_options(p: argparse.ArgumentParser, *, mode_required: bool) -> None:
    p.add_argument(
        "--mode",
        choices=MODES,
        required=mode_required,
        default=None if mode_required else "fresh",
        help=_MODE_HELP + ("" if mode_required else " (default: fresh)"),
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--rank", type=_positive_int, help="Kronecker rank R")
    group.add_argument("--tol", type=_positive_float, help="factorize: max relative weight error")
    group.add_argument(
        "--budget",
        type=_positive_float,
        help="factorize: params per layer as a fraction of dense (best Kronecker/hybrid form)",
    )
    p.add_argument("--shapes", metavar="JSON", help='per-layer modes: {"fc1": [[8,8,4],[4,4,4]]}')
    p.add_argument(
        "--include", nargs="+", action="extend", metavar="GLOB", help="layers to convert"
    )
    p.add_argument("--exclude", nargs="+", action="extend", metavar="GLOB", help="layers to skip")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="auto", help="contraction order")


def _add_autotune_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--autotune",
        choices=tuple(m for m in AUTOTUNE_MODES if m != "off"),
        help="plan each layer by timing candidate plans on the example's shapes: eagerly, "
        "or compiled by inductor for a model that will run under torch.compile; the "
        "-train settings time forward and backward, for a model that will be trained "
        "(default: the cost model)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``ndcompile`` argument parser with its ``convert``, ``inspect``, ``bench`` commands."""
    parser = _Parser(
        prog="ndcompile",
        description="Convert, inspect and benchmark models whose Linear layers become NdLinear.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ndcompile {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    conv = sub.add_parser("convert", help="convert a model and save it (.pt2 / state_dict)")
    conv.add_argument("model", metavar="MODULE:FACTORY", help="pkg.module:fn or file.py:fn")
    _add_model_options(conv)
    _add_conversion_options(conv, mode_required=True)
    _add_autotune_option(conv)
    conv.add_argument("--calibration", metavar="DATA", help="inputs (tensor or list) for fitting")
    conv.add_argument(
        "--weights-on-disk",
        action="store_true",
        help="with --state-dict CKPT: build the model with its parameters on the meta device "
        "and read each layer's weights from CKPT as it is converted (the dense model is "
        "never in memory; the original is not run, so nothing is compared with it)",
    )
    conv.add_argument(
        "--distill",
        metavar="DATA",
        help="inputs to distill the converted model towards the original: a tensor of rows "
        "(cut into batches), a list of batches, or a dict of named inputs (.pt/.safetensors)",
    )
    conv.add_argument(
        "--distill-steps", type=_positive_int, default=200, help="steps per distillation phase"
    )
    conv.add_argument("-o", "--output", metavar="OUT", help="exported program: .pt2 or .onnx")
    conv.add_argument("--report", metavar="JSON", help="write the conversion report as JSON")
    conv.add_argument(
        "--state-dict-out", metavar="CKPT", help="converted weights: .pt/.safetensors"
    )
    conv.add_argument(
        "--save", metavar="FILE.safetensors",
        help="the converted model with ndcompile.save (weights + layer descriptions; "
        "ndcompile.load rebuilds it)",
    )  # fmt: skip
    conv.add_argument("--quiet", action="store_true", help="print nothing but errors")
    conv.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    insp = sub.add_parser("inspect", help="list a model's Linear sites or a .pt2's layers")
    insp.add_argument("target", metavar="OUT.pt2|MODULE:FACTORY")
    _add_model_options(insp)
    _add_conversion_options(insp, mode_required=False)
    insp.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    bench = sub.add_parser("bench", help="time the original vs the converted model")
    bench.add_argument("model", metavar="MODULE:FACTORY", help="pkg.module:fn or file.py:fn")
    _add_model_options(bench)
    _add_conversion_options(bench, mode_required=False)
    _add_autotune_option(bench)
    bench.add_argument("--repeat", type=_positive_int, default=20, help="timed runs")
    bench.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    bench.add_argument("--threads", type=_positive_int, help="torch.set_num_threads")
    bench.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    return parser


def _run_inspect(args: argparse.Namespace) -> int:
    target = args.target
    if target.endswith(".pt2"):
        program = load_exported_program(target)  # refuses files that need unpickling
        info = describe_program(program)
        emit(
            args, format_program(info, f"exported program {target}"), {"command": "inspect", **info}
        )
        return 0
    args.model = target
    model, example, _ = load_model(args)
    notes: list[str] = []
    rows = plan_model(model, example, notes=notes, **conversion_kwargs(args))
    title = f"{target} (mode {args.mode!r}, example input {example.describe()})"
    text = "\n".join([format_plan(rows, title), *(f"  note: {n}" for n in notes)])
    data = {"command": "inspect", "mode": args.mode, "layers": rows, "notes": notes}
    emit(args, text, data)
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, example, _ = load_model(args)
    torch.manual_seed(args.seed)
    converted = convert(model, example, **conversion_kwargs(args))
    result = time_models(model, converted, example, repeat=args.repeat, warmup=args.warmup)
    result["mode"] = args.mode
    emit(args, format_timings(result), {"command": "bench", **result})
    return 0


# --------------------------------------------------------------------------- main
def format_error(exc: BaseException) -> str:
    """One ``ndcompile: error: ...`` line for ``exc`` (hints joined in parentheses).

    Errors other than :class:`NdCompileError` are prefixed with their type name.
    """
    text = str(exc).strip()
    if not isinstance(exc, NdCompileError):
        text = f"{type(exc).__name__}: {text}"
    message, _, hint = text.partition("\n  hint: ")
    message = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    if hint:
        message = f"{message} (hint: {' '.join(hint.split())})"
    return f"ndcompile: error: {message}"


def _exit_message(exc: SystemExit) -> str:
    code = "" if exc.code is None else repr(exc.code)
    return (
        f"ndcompile: error: the model's code called sys.exit({code}); the command did not "
        "finish and wrote nothing"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ndcompile`` command; return the exit status (never raises).

    Ctrl-C exits with 130, SIGTERM/SIGHUP with 128 + the signal number; in every case
    no output (or temporary file) is left behind. ``sys.exit`` called by the model's
    code is a failure (status 1), not the command's exit.
    """
    handlers = {"convert": run_convert, "inspect": _run_inspect, "bench": _run_bench}
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    except UsageError as exc:
        print(format_error(exc), file=sys.stderr)
        return EXIT_USAGE
    try:
        with terminate_on_signals():
            return handlers[args.command](args)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        name = f" ({signal.Signals(signum).name})" if isinstance(exc, Terminated) else ""
        print(f"ndcompile: interrupted{name}", file=sys.stderr)
        return 128 + int(signum)
    except SystemExit as exc:
        if os.environ.get("NDCOMPILE_TRACEBACK"):
            raise
        print(_exit_message(exc), file=sys.stderr)
        return EXIT_FAILED
    except BaseException as exc:  # the model's code may raise anything
        if os.environ.get("NDCOMPILE_TRACEBACK"):
            raise
        print(format_error(exc), file=sys.stderr)
        if isinstance(exc, UsageError):
            return EXIT_USAGE
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
