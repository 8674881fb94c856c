"""``torch.compile(model, backend="ndcompile")``: exact tensor-network rewrites, then inductor.

The backend receives each graph dynamo captures (one per graph break), rewrites a
copy of it and hands the result to inductor (or runs it eagerly):

1. mode-wise linear chains, such as the reference ``ndlinear.NdLinear`` forward,
   become one planned contraction (:mod:`ndcompile.passes.dynamo_ndlinear`);
2. with ``factorize=``, dense linear maps become nearest Kronecker sums computed
   from the real weights at compile time (inference only,
   :mod:`ndcompile.passes.dynamo_factorize`);
3. consecutive linear maps fuse where exact and cheaper
   (:mod:`ndcompile.passes.dynamo_linear_chain`).

Options come as ``torch.compile(m, backend="ndcompile", options={...})``, flat or
nested under ``"ndcompile"``::

    torch.compile(model, backend="ndcompile", options={"report": True})
    torch.compile(model, backend="ndcompile",
                  options={"ndcompile": {"inductor": False, "factorize": {"rank": 2}}})

The backend is registered by the ``torch_dynamo_backends`` entry point (no import
needed) and by :func:`register_backend`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ndcompile.errors import NdCompileError
from ndcompile.ir.network import check_optimizer
from ndcompile.passes.dynamo.common import copy_dynamo_graph
from ndcompile.passes.dynamo.factorize import FactorizeSpec, factorize_linears
from ndcompile.passes.dynamo.linear_chain import fuse_linear_chains
from ndcompile.passes.dynamo.ndlinear import rewrite_mode_chains
from ndcompile.passes.runner import ReportedResult
from ndcompile.report import ConversionReport

__all__ = [
    "BACKEND_NAME",
    "OPTION_KEYS",
    "PASSES",
    "PASS_REGISTRY",
    "BackendOptions",
    "ndcompile_backend",
    "parse_options",
    "register_backend",
    "rewrite_dynamo_graph",
    "static_example_inputs",
]

#: The name passed as ``torch.compile(..., backend=BACKEND_NAME)``.
BACKEND_NAME = "ndcompile"

#: Keys accepted in the backend's options.
OPTION_KEYS: tuple[str, ...] = ("optimizer", "inductor", "report", "factorize", "passes")

#: The exact passes, in the order they run; ``passes=`` selects a subset.
#: A backend pass: ``(graph, example inputs, options) -> ReportedResult``.
BackendPass = Callable[[fx.GraphModule, Sequence[Any], "BackendOptions"], ReportedResult]


def _factorize(gm: fx.GraphModule, inputs: Sequence[Any], opts: BackendOptions) -> ReportedResult:
    """The ``factorize`` pass; runs only when the ``factorize`` option is given."""
    assert opts.factorize is not None
    return factorize_linears(gm, inputs, opts.factorize, optimizer=opts.optimizer)


#: Backend passes by name, in the order they run. ``factorize`` runs when the
#: ``factorize`` option is given; the others when listed in ``passes``.
PASS_REGISTRY: dict[str, BackendPass] = {
    "ndlinear": lambda gm, _inputs, opts: rewrite_mode_chains(gm, optimizer=opts.optimizer),
    "factorize": _factorize,
    "linear_chain": lambda gm, _inputs, _opts: fuse_linear_chains(gm),
}
#: Exact passes selectable with the ``passes`` option.
PASSES: tuple[str, ...] = tuple(n for n in PASS_REGISTRY if n != "factorize")

logger = logging.getLogger("ndcompile")

ReportSink = Callable[[ConversionReport], Any]


@dataclass(frozen=True)
class BackendOptions:
    """Validated backend options.

    Attributes:
        optimizer: Contraction-order optimizer (one of ``ndcompile.OPTIMIZERS``).
        inductor: True to compile the rewritten graph with inductor, False to run it
            eagerly, or a dict of inductor config patches (implies True).
        report: True to log each graph's :class:`ConversionReport` on the
            ``"ndcompile"`` logger at INFO level, or a callable receiving it.
        factorize: Kronecker factorization of dense weights (inference only), or None.
        passes: Which exact passes run (subset of :data:`PASSES`).
    """

    optimizer: str = "auto"
    inductor: bool | Mapping[str, Any] = True
    report: bool | ReportSink = False
    factorize: FactorizeSpec | None = None
    passes: tuple[str, ...] = field(default=PASSES)


def _valid_keys() -> str:
    return ", ".join(OPTION_KEYS)


def parse_options(options: Mapping[str, Any] | None) -> BackendOptions:
    """Validate ``torch.compile(..., options=...)`` for this backend.

    Args:
        options: None, a flat dict of :data:`OPTION_KEYS`, or ``{"ndcompile": {...}}``.

    Returns:
        The parsed options.

    Raises:
        NdCompileError: On an unknown key (the message lists the valid keys) or value.
    """
    if options is None:
        return BackendOptions()
    if not isinstance(options, Mapping):
        raise NdCompileError(
            f"backend options must be a dict, got {type(options).__name__}",
            hint=f"valid keys are: {_valid_keys()}",
        )
    opts = dict(options)
    if BACKEND_NAME in opts:
        nested = opts.pop(BACKEND_NAME)
        if opts or not isinstance(nested, Mapping):
            raise NdCompileError(
                f"give options either flat or as {{'ndcompile': {{...}}}}, not both; "
                f"got extra keys {sorted(opts)} next to 'ndcompile'",
                hint=f"valid keys are: {_valid_keys()}",
            )
        opts = dict(nested)
    unknown = sorted(map(str, set(opts) - set(OPTION_KEYS)))
    if unknown:
        raise NdCompileError(
            f"unknown backend option(s) {unknown}; valid keys are: {_valid_keys()}",
            hint="e.g. options={'optimizer': 'dp', 'report': True, 'factorize': {'rank': 2}}",
        )
    inductor = opts.get("inductor", True)
    if not isinstance(inductor, bool | Mapping):
        raise NdCompileError(f"option 'inductor' must be a bool or a dict, got {inductor!r}")
    report = opts.get("report", False)
    if not (isinstance(report, bool) or callable(report)):
        raise NdCompileError(f"option 'report' must be a bool or a callable, got {report!r}")
    passes = opts.get("passes", PASSES)
    if isinstance(passes, str) or not isinstance(passes, Iterable):
        raise NdCompileError(f"option 'passes' must be a list of names from {PASSES}")
    passes = tuple(passes)
    bad = sorted(set(passes) - set(PASSES))
    if bad:
        raise NdCompileError(f"unknown passes {bad}; valid passes are: {', '.join(PASSES)}")
    return BackendOptions(
        optimizer=check_optimizer(opts.get("optimizer", "auto")),
        inductor=inductor,
        report=report,
        factorize=FactorizeSpec.from_option(opts.get("factorize")),
        passes=passes,
    )


#: Calls that apply attention projections from fused weights -> how the report names them.
_FUSED_ATTENTION: dict[Any, str] = {
    F.multi_head_attention_forward: "nn.MultiheadAttention (F.multi_head_attention_forward)",
    **{
        getattr(torch, name): f"{what} (torch.{name})"
        for name, what in (
            ("_transformer_encoder_layer_fwd", "nn.TransformerEncoderLayer's fast path"),
            ("_native_multi_head_attention", "nn.MultiheadAttention's fast path"),
        )
        if hasattr(torch, name)
    },
}


def _fused_attention_calls(gm: fx.GraphModule) -> list[str]:
    """The :data:`_FUSED_ATTENTION` calls of the graph, each with its count."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        what = _FUSED_ATTENTION.get(node.target) if node.op == "call_function" else None
        if what is not None:
            counts[what] = counts.get(what, 0) + 1
    return [f"{n} call(s) of {what}" for what, n in counts.items()]


def rewrite_dynamo_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: BackendOptions | Mapping[str, Any] | None = None,
) -> tuple[fx.GraphModule, ConversionReport, list[Tensor]]:
    """Run the backend's passes on a copy of a dynamo graph (``gm`` is not modified).

    Args:
        gm: The graph module dynamo hands to a backend.
        example_inputs: Its example inputs (real tensors, one per placeholder).
        options: Backend options (parsed or raw).

    Returns:
        ``(rewritten copy, report, constants)``; the constants (factorized weights)
        must follow the original inputs on every call of the rewritten module.
    """
    opts = options if isinstance(options, BackendOptions) else parse_options(options)
    work = copy_dynamo_graph(gm)
    report = ConversionReport(mode="backend")
    report.params_before = sum(t.numel() for t in example_inputs if isinstance(t, nn.Parameter))
    constants: dict[str, Tensor] = {}
    for name, run in PASS_REGISTRY.items():
        if name == "factorize":
            if opts.factorize is None:
                continue
        elif name not in opts.passes:
            continue
        result = run(work, example_inputs, opts)
        report.layers += result.layers
        report.notes += result.notes
        constants.update(result.constants)
    report.params_after = report.params_before + sum(
        e.params_after - e.params_before for e in report.layers if e.status == "converted"
    )
    compile_id = gm.meta.get("dynamo_compile_id")
    if compile_id is not None:
        report.notes.append(f"dynamo graph {compile_id}")
    hidden = _fused_attention_calls(gm)
    if hidden:
        report.notes.append(
            f"{', '.join(hidden)} keep their projection weights inside one fused call, so "
            "those Linear layers are not rewritten here: convert the model with "
            "ndcompile.convert(model, example, ...) first (it splits nn.MultiheadAttention "
            "into q_proj/k_proj/v_proj/out_proj layers), then torch.compile the result"
        )
    if not report.layers:
        report.notes.append("nothing to rewrite in this graph")
    ordered = [
        constants[str(p.target)]
        for p in work.graph.find_nodes(op="placeholder")
        if str(p.target) in constants
    ]
    work.recompile()
    return work, report, ordered


def _with_constants(compiled: Callable[..., Any], constants: list[Tensor]) -> Callable[..., Any]:
    """Append the constant inputs on every call.

    Dynamo calls a backend's result with the graph inputs unpacked, as it calls the
    result of ``compile_fx``, so the wrapper forwards them the same way.
    """

    def run(*args: Any) -> Any:
        return compiled(*args, *constants)

    return run


def static_example_inputs(constants: Sequence[Tensor]) -> list[Tensor]:
    """Example values of the constant inputs for ``compile_fx``, with static shapes.

    AOT autograd fakifies every real example input that dynamo did not fakify itself
    with *symbolic* sizes attached to placeholder sources unknown to dynamo. Once the
    traced code guards on such a size (a reshape of a factor does), dynamo's guard
    builder finds no source for the symbol and fails. Fakes made with static shapes
    in the tracing context's FakeTensorMode are taken as they are, so the constants'
    shapes stay plain ints. Outside a dynamo compile the real tensors are returned.

    Args:
        constants: The constant tensors appended to the graph's inputs.

    Returns:
        One example value per constant.
    """
    context = torch._guards.TracingContext.try_get()
    fake_mode = getattr(context, "fake_mode", None)
    if fake_mode is None or fake_mode.shape_env is None:
        return list(constants)
    return [fake_mode.from_tensor(t, static_shapes=True) for t in constants]


def _publish(report: ConversionReport, sink: bool | ReportSink) -> None:
    logger.debug("%s", report)
    if sink is True:
        logger.info("%s", report)
    elif callable(sink):
        sink(report)


def ndcompile_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any
) -> Callable[..., Any]:
    """The dynamo backend: rewrite ``gm``, then compile it with inductor or run it eagerly.

    Args:
        gm: The captured graph (parameters lifted to placeholders).
        example_inputs: Real example inputs, one per placeholder.
        **kwargs: ``options`` (see :func:`parse_options`) and ``mode`` (an inductor
            mode such as ``"max-autotune"``), as passed by ``torch.compile``.

    Returns:
        A callable running the graph.

    Raises:
        NdCompileError: On bad options, or ``factorize`` while autograd is recording.
    """
    options, mode = kwargs.pop("options", None), kwargs.pop("mode", None)
    if kwargs:
        raise NdCompileError(
            f"unexpected backend arguments {sorted(kwargs)}",
            hint=f"pass settings as options={{...}}; valid keys are: {_valid_keys()}",
        )
    opts = parse_options(options)
    work, report, constants = rewrite_dynamo_graph(gm, example_inputs, opts)
    _publish(report, opts.report)
    if not report.converted:
        work = gm
    if opts.inductor is False:
        compiled: Callable[..., Any] = work.forward
    else:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = dict(list_mode_options(mode)) if mode else {}
        if isinstance(opts.inductor, Mapping):
            patches.update(opts.inductor)
        inputs = [*example_inputs, *static_example_inputs(constants)]
        # Not AOT mode, so compile_fx returns the compiled callable.
        compiled = cast(
            Callable[..., Any], compile_fx(work, inputs, config_patches=patches or None)
        )
    return _with_constants(compiled, constants) if constants else compiled


def register_backend() -> bool:
    """Register :func:`ndcompile_backend` as ``backend="ndcompile"`` (idempotent).

    Nothing is registered when the name is already taken, or when torch has already
    discovered the package's ``torch_dynamo_backends`` entry point (torch registers
    it itself when the entry point is loaded; registering here too would make
    torch's own registration fail on the duplicate name).

    Returns:
        True if this call registered the backend.
    """
    from torch._dynamo.backends import registry

    if BACKEND_NAME in getattr(registry, "_COMPILER_FNS", {}):
        return False
    if getattr(registry, "_BACKENDS", {}).get(BACKEND_NAME) is not None:
        return False
    try:
        torch._dynamo.register_backend(compiler_fn=ndcompile_backend, name=BACKEND_NAME)
    except AssertionError:  # registered concurrently under the same name
        return False
    return True
