"""Describe the converted layers of a model and rebuild them on a fresh copy.

A model converted by module surgery differs from its architecture only in the
layers installed at some qualified names. :func:`layer_specs` records those
(type, modes, rank, bias kind, adapter scale, ...) as plain JSON data;
:func:`rebuild_layers` installs empty layers of the same description on another
instance of the architecture, so a state dict saved from the converted model
loads into it with ``strict=True``: nothing is refitted or re-initialised dense.

Used by :func:`ndcompile.save`/:func:`ndcompile.load` and by the Hugging Face
path (:mod:`ndcompile.backends.pretrained`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from ndcompile.compress.adapter_linear import NdAdapterLinear
from ndcompile.errors import NdCompileError
from ndcompile.frontend.capture import is_conv1d
from ndcompile.frontend.module_sites import conv1d_as_linear
from ndcompile.layers.construction import BiasKind
from ndcompile.layers.ndlinear import NdLinear

__all__ = ["BIAS_NAMES", "layer_specs", "rebuild_layers"]

#: NdLinear ``bias_kind`` -> its name in a spec.
BIAS_NAMES: dict[BiasKind, str] = {True: "full", False: "none", "modes": "modes"}
_BIAS_KINDS = {v: k for k, v in BIAS_NAMES.items()}


def _ndlinear_spec(module: NdLinear) -> dict[str, Any]:
    return {
        "type": "NdLinear",
        "in_shape": list(module.in_shape),
        "out_shape": list(module.out_shape),
        "rank": module.rank,
        "bias": BIAS_NAMES[module.bias_kind],
        "lowrank": int(module.lowrank),
        "optimizer": module.optimizer,
        "plan_batch": module.plan_batch,
        "flat": bool(module.flat),
    }


def layer_specs(model: nn.Module) -> list[dict[str, Any]]:
    """One spec per NdLinear / NdAdapterLinear of ``model`` (adapters' inner layer excluded)."""
    specs = []
    adapters: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{a}.") for a in adapters):
            continue
        if isinstance(module, NdAdapterLinear):
            adapters.append(name)
            inner = _ndlinear_spec(module.adapter)
            specs.append(
                {
                    "name": name,
                    "type": "NdAdapterLinear",
                    "in_shape": inner["in_shape"],
                    "out_shape": inner["out_shape"],
                    "rank": inner["rank"],
                    "optimizer": inner["optimizer"],
                    "alpha": module.alpha,
                    "zero_init": module.zero_init,
                    "compute": module.compute,
                }
            )
        elif isinstance(module, NdLinear):
            specs.append({"name": name, **_ndlinear_spec(module)})
    return specs


def _ints(value: Any, what: str, name: str) -> tuple[int, ...]:
    if not isinstance(value, Sequence) or not value or len(value) > 16:
        raise NdCompileError(f"recorded {what} {value!r} is not a list of mode sizes", layer=name)
    if any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 24 for v in value):
        raise NdCompileError(f"recorded {what} {value!r} has invalid mode sizes", layer=name)
    return tuple(value)


def _positive(value: Any, what: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 31:
        raise NdCompileError(f"recorded {what} {value!r} is invalid", layer=name)
    return value


def _where(model: nn.Module, name: str) -> tuple[torch.device, torch.dtype, nn.Module | None]:
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise NdCompileError(
            "the model has no such layer",
            layer=name,
            hint="pass the same model architecture that was converted",
        ) from None
    ref = next(iter(old.parameters()), None)
    if ref is None:
        return torch.device("cpu"), torch.get_default_dtype(), old
    return ref.device, ref.dtype, old


def _features(module: nn.Module | None) -> tuple[int, int] | None:
    """``(in, out)`` features of a Linear-like module (None for anything else)."""
    if isinstance(module, nn.Linear | NdLinear):
        return module.in_features, module.out_features
    if module is not None and is_conv1d(module):
        n_in, n_out = cast(torch.Tensor, module.weight).shape
        return int(n_in), int(n_out)
    return None


def _build(model: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
    name = str(spec.get("name", ""))
    kind = spec.get("type", "NdLinear")
    in_shape = _ints(spec.get("in_shape"), "in_shape", name)
    out_shape = _ints(spec.get("out_shape"), "out_shape", name)
    rank = spec.get("rank", 1)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 4096:
        raise NdCompileError(f"recorded rank {rank!r} is invalid", layer=name)
    device, dtype, old = _where(model, name)
    features = _features(old)
    if features is not None and features != (math.prod(in_shape), math.prod(out_shape)):
        raise NdCompileError(
            f"recorded modes {in_shape} -> {out_shape} do not match the model's layer "
            f"({features[0]} -> {features[1]} features)",
            layer=name,
            hint="pass the same model architecture that was converted",
        )
    if kind == "NdAdapterLinear":
        base = conv1d_as_linear(old) if old is not None and is_conv1d(old) else old
        if not isinstance(base, nn.Linear):
            raise NdCompileError(
                f"the file records an adapter on a Linear, the model has {type(old).__name__}",
                layer=name,
                hint="pass the same model architecture that was converted",
            )
        return NdAdapterLinear(
            base,
            in_shape,
            out_shape,
            rank=rank,
            alpha=float(spec.get("alpha", 1.0)),
            zero_init=bool(spec.get("zero_init", True)),
            optimizer=str(spec.get("optimizer", "auto")),
            compute=str(spec.get("compute", "auto")),
        )
    if kind != "NdLinear":
        raise NdCompileError(f"unknown recorded layer type {kind!r}", layer=name)
    bias = spec.get("bias", "full")
    if bias not in _BIAS_KINDS:
        raise NdCompileError(f"recorded bias kind {bias!r} is invalid", layer=name)
    lowrank = spec.get("lowrank", 0)
    if not isinstance(lowrank, int) or not 0 <= lowrank <= min(
        math.prod(in_shape), math.prod(out_shape)
    ):
        raise NdCompileError(f"recorded lowrank {lowrank!r} is invalid", layer=name)
    return NdLinear(
        in_shape,
        out_shape,
        rank=rank,
        bias=_BIAS_KINDS[bias],
        lowrank=lowrank,
        optimizer=str(spec.get("optimizer", "auto")),
        plan_batch=_positive(spec.get("plan_batch", 64), "plan_batch", name),
        flat=bool(spec.get("flat", False)),
        device=device,
        dtype=dtype,
    )


def rebuild_layers(model: nn.Module, specs: Sequence[Mapping[str, Any]]) -> nn.Module:
    """Install empty layers described by ``specs`` in ``model`` (modified in place).

    Args:
        model: An instance of the converted model's architecture.
        specs: From :func:`layer_specs`.

    Returns:
        ``model``, ready for ``load_state_dict`` of the converted model's weights.

    Raises:
        NdCompileError: If a spec is malformed or names a layer the model lacks.
    """
    from ndcompile.pipeline.surgery import install_layer

    if not isinstance(specs, Sequence):
        raise NdCompileError(f"recorded layers must be a list, got {type(specs).__name__}")
    for spec in specs:
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise NdCompileError(f"recorded layer {spec!r} has no name")
        install_layer(model, spec["name"], _build(model, spec))
    return model
