"""The variants of a layer case: dense, reference and ndcompile, eager and compiled, tltorch.

All variants of a case share the reference layer's weights (tltorch's CP layer,
which has its own, aside). A variant that cannot run here (a missing optional
package or ``torch.compile`` backend) is skipped with the reason, not an error.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ndcompile.layers.ndlinear import NdLinear

from layer_cases import Case, reference_layer, tltorch_rank

__all__ = [
    "COMPILED",
    "VARIANTS",
    "Skip",
    "build_variants",
    "first_line",
    "phase_callables",
]

VARIANTS: tuple[str, ...] = (
    "dense",
    "ref_eager",
    "ref_inductor",
    "nd_eager",
    "nd_inductor",
    "nd_untiled",
    "ref_ndcompile",
    "tltorch",
)
COMPILED = {"ref_inductor", "nd_inductor", "ref_ndcompile"}


class Skip(Exception):
    """A variant that cannot run here (missing package or backend); message says why."""


def first_line(exc: BaseException) -> str:
    """``"Type: message"`` of an exception, its first line cut to 200 characters."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


class _Flat(nn.Module):
    """Applies a dense Linear to ``(B, *in_shape)`` through a flattening view."""

    def __init__(self, linear: nn.Linear, out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.linear, self.out_shape = linear, out_shape

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1)).unflatten(1, self.out_shape)


def _tltorch_layer(case: Case, device: torch.device) -> nn.Module:
    try:
        import tltorch
    except ImportError as exc:
        raise Skip("tensorly-torch (tltorch) is not installed") from exc
    try:
        layer = tltorch.FactorizedLinear(
            in_tensorized_features=case.in_shape,
            out_tensorized_features=case.out_shape,
            factorization="cp",
            rank=tltorch_rank(case),
        ).to(device)
    except Exception as exc:  # an API change in the optional package
        raise Skip(f"tltorch.FactorizedLinear failed: {first_line(exc)}") from exc
    return _Flat(layer, case.out_shape)  # type: ignore[arg-type]


def _compiled(module: nn.Module, backend: str) -> nn.Module:
    if backend != "inductor" and backend not in torch._dynamo.list_backends():
        raise Skip(f"torch.compile backend {backend!r} is not registered")
    return torch.compile(module, backend=backend, dynamic=False)  # type: ignore[return-value]


def build_variants(
    case: Case,
    device: torch.device,
    *,
    compile_: bool,
    max_dense_params: float,
    autotune: bool | str = False,
) -> tuple[dict[str, nn.Module], dict[str, str], NdLinear]:
    """All variants of ``case`` sharing the reference layer's weights.

    ``autotune`` plans the ndcompile layer by timing candidates (the reference
    schedule and layout and the dense block among them) instead of by the cost
    model: ``"eager"``/``True`` eagerly, ``"inductor"`` compiled by inductor, the
    ``"-train"`` settings timing forward and backward.

    Returns:
        ``(modules, skipped, nd_layer)``: runnable variants, skip reasons by name,
        and the eager ndcompile layer (for its plan).
    """
    ref = reference_layer(case).to(device)
    nd = NdLinear.from_reference(ref)
    nd.replan(plan_batch=case.batch, autotune=autotune)
    mods: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    dense_params = nd.in_features * nd.out_features
    if dense_params <= max_dense_params:
        mods["dense"] = _Flat(nd.to_dense(), case.out_shape)
    else:
        skipped["dense"] = f"{dense_params:.2e} weights > --max-dense-params"
    mods["ref_eager"] = ref
    mods["nd_eager"] = nd
    whole = copy.deepcopy(nd)
    whole.tile = 0
    mods["nd_untiled"] = whole
    builders: dict[str, Callable[[], nn.Module]] = {
        "ref_inductor": lambda: _compiled(ref, "inductor"),
        "nd_inductor": lambda: _compiled(nd, "inductor"),
        "ref_ndcompile": lambda: _compiled(ref, "ndcompile"),
        "tltorch": lambda: _tltorch_layer(case, device),
    }
    for name, build in builders.items():
        if name in COMPILED and not compile_:
            skipped[name] = "torch.compile skipped (--quick without --compile)"
            continue
        try:
            mods[name] = build()
        except Skip as exc:
            skipped[name] = str(exc)
        except Exception as exc:  # e.g. a registered backend whose module fails to import
            skipped[name] = f"failed: {first_line(exc)}"
    return mods, skipped, nd


def phase_callables(
    module: nn.Module, x: Tensor
) -> tuple[Callable[[], None], Callable[[], None], Tensor]:
    """Forward (no grad) and forward+backward callables of one variant, plus its output.

    The backward step computes gradients for the input and every parameter, as for
    a layer inside a network; gradients are dropped (not accumulated) each call.
    """
    with torch.no_grad():
        out = module(x)

    def forward() -> None:
        with torch.no_grad():
            module(x)

    xg = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn_like(out)
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        xg.grad = None
        module(xg).backward(grad_out)

    return forward, step, out
