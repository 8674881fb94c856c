"""``convert(..., output="module")``: module surgery on a copy of the user's model.

Phases:

1. **capture** the user's model on the example (its state restored afterwards;
   :func:`~ndcompile.frontend.capture.capture_linear_calls`: torch.export, forward
   hooks where export fails) and **plan** a site per Linear-like layer
   (:func:`~ndcompile.frontend.module_sites.plan_module_sites`);
2. **copy** the model without the dense weights of the layers about to be replaced
   (streaming: peak memory is the model plus the new layers, not two models);
3. **fit**: the mode builds each replacement (fresh init, Kronecker fit on the
   weights and the layer's inputs, adapter), optionally shared over
   ``torch.distributed`` processes;
4. **install** each at the layer's qualified name, keeping the layer's hooks and
   trainability, so the result is the user's own class (``generate``, ``config``,
   ``save_pretrained``, custom methods) with readable ``state_dict`` keys;
5. **verify** against the original on the example.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ndcompile.backends.pretrained import record_in_config
from ndcompile.compress.layer_fits import capture_grams, capture_inputs
from ndcompile.errors import NdCompileError
from ndcompile.frontend.capture import capture_linear_calls
from ndcompile.frontend.inputs import ExampleInputs
from ndcompile.frontend.module_sites import plan_module_sites
from ndcompile.frontend.sites import LinearSite
from ndcompile.frontend.trace import is_reference_ndlinear
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.passes.fx.emit import set_submodule
from ndcompile.pipeline.attention import has_attention, with_split_attention
from ndcompile.pipeline.checks import (
    check_runs,
    count_parameters,
    layer_entry,
    reference_outputs,
    unchanged_state,
    verify_outputs,
)
from ndcompile.pipeline.modes import FitData, Mode, apply_skip_rules, get_mode
from ndcompile.pipeline.options import ConvertOptions
from ndcompile.pipeline.weights import (
    fill_from_checkpoint,
    materialized_site,
    open_weights,
    tensor_names,
)
from ndcompile.progress import progress
from ndcompile.report import ConversionReport, LayerReport

__all__ = [
    "STACKED_SHARE",
    "convert_module",
    "find_module_sites",
    "install_layer",
    "stacked_weights_note",
]

#: Hook dicts of an ``nn.Module`` (name -> whether it holds hooks, or their flags).
_HOOK_DICTS = {
    "_forward_hooks": True,
    "_forward_hooks_with_kwargs": False,
    "_forward_hooks_always_called": False,
    "_forward_pre_hooks": True,
    "_forward_pre_hooks_with_kwargs": False,
    "_backward_hooks": True,
    "_backward_pre_hooks": True,
}


def install_layer(root: nn.Module, name: str, new: nn.Module) -> list[str]:
    """Replace the submodule ``name`` of ``root`` by ``new``, keeping its hooks.

    Forward (pre-)hooks see the same ``(*, in_features)``/``(*, out_features)``
    tensors as before, so they move to the new layer. A frozen layer stays frozen.

    Returns:
        A note per kind of hook moved (empty when the layer had none).
    """
    old = root.get_submodule(name)
    notes = []
    for attr, holds_hooks in _HOOK_DICTS.items():
        hooks = getattr(old, attr, None)
        if hooks:
            getattr(new, attr).update(hooks)
            if holds_hooks:
                notes.append(f"{name}: kept {len(hooks)} {attr.strip('_').replace('_', ' ')}")
    weight = getattr(old, "weight", None)
    if weight is not None and not weight.requires_grad and not _is_adapter(new):
        new.requires_grad_(False)
    set_submodule(root, name, new)
    return notes


def _is_adapter(module: nn.Module) -> bool:
    return hasattr(module, "adapter") and isinstance(module.adapter, NdLinear)


def find_module_sites(
    model: nn.Module, example: ExampleInputs, opts: ConvertOptions, notes: list[str]
) -> list[LinearSite]:
    """One site per Linear-like layer of ``model``, found as ``convert`` finds them.

    The model is captured on the example (torch.export, forward hooks where export
    fails) with its state restored afterwards; how the layers were found goes to
    ``notes``. Shared by ``convert`` and ``ndcompile inspect``.
    """
    with unchanged_state(model):
        capture = capture_linear_calls(model, example)
    if capture.fallback_reason is not None:
        notes.append(
            f"torch.export could not capture {type(model).__name__} "
            f"({capture.fallback_reason}); layers were found by running it with forward "
            "hooks (modes come from the feature sizes; functional calls are not seen)"
        )
    notes.append(f"layers found with {capture.method}")
    stacked = stacked_weights_note(model)
    if stacked is not None:
        notes.append(stacked)
    return plan_module_sites(
        model,
        capture,
        shapes=opts.shapes,
        include=opts.include,
        exclude=opts.exclude,
        n_modes=opts.n_modes,
        min_features=opts.min_features,
    )


#: Share of a model's parameters in stacked weights above which the report says so.
STACKED_SHARE = 0.1


def stacked_weights_note(model: nn.Module) -> str | None:
    """A note when 3-D weights outside convolutions hold much of the model's parameters.

    Some layers keep several matrices in one tensor (transformers' fused
    mixture-of-experts weights, ``experts.gate_up_proj`` of shape ``(E, 2I, H)``).
    They are not Linear-like layers, so ``convert`` leaves them dense; the note keeps
    that from passing unnoticed.

    Returns:
        The note, or None when such weights hold less than :data:`STACKED_SHARE`.
    """
    total = sum(p.numel() for p in model.parameters())
    found: list[tuple[str, int]] = []
    seen: set[int] = set()  # a weight shared by two modules counts once, as in ``total``
    for owner, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.dim() == 3 and id(p) not in seen:
                seen.add(id(p))
                found.append((f"{owner}.{name}" if owner else name, p.numel()))
    share = sum(n for _, n in found) / max(total, 1)
    if not found or share < STACKED_SHARE:
        return None
    names = ", ".join(name for name, _ in found[:3]) + (", ..." if len(found) > 3 else "")
    return (
        f"{share:.0%} of the parameters are in 3-D weights that are not Linear-like layers "
        f"and stay dense ({names}; e.g. fused mixture-of-experts weights)"
    )


def _fit_data(
    work: nn.Module, sites: list[LinearSite], example: ExampleInputs, opts: ConvertOptions
) -> FitData:
    names = [s.name for s in sites if s.convertible]
    if not names:
        return FitData()
    data = FitData(inputs=capture_inputs(work, names, example))
    if opts.calibration is not None:
        data.grams = capture_grams(work, names, opts.calibration)
    return data


def _exact(
    work: nn.Module, example: ExampleInputs, report: ConversionReport, opts: ConvertOptions
) -> None:
    """Module-level exact rewrites: reference NdLinear layers become planned NdLinears.

    Dense Linear-like layers are kept; each is listed in the report with the reason.
    """
    for name, module in list(work.named_modules()):
        if name and is_reference_ndlinear(module):
            layer = NdLinear.from_reference(module, optimizer=opts.optimizer)
            report.layers.append(
                LayerReport(
                    name=name,
                    kind="ndlinear.NdLinear",
                    status="inlined",
                    in_features=layer.in_features,
                    out_features=layer.out_features,
                    in_shape=layer.in_shape,
                    out_shape=layer.out_shape,
                    mode_source="layer",
                    rank=1,
                    params_before=sum(p.numel() for p in module.parameters()),
                    params_after=layer.num_parameters(),
                    plan=str(layer.plan_choice() or layer.plan()),
                )
            )
            report.notes.extend(install_layer(work, name, layer))
    for site in find_module_sites(work, example, opts, report.notes):
        entry = layer_entry(site)
        entry.reason = site.skip_reason or (
            "exact mode keeps dense layers (it rewrites NdLinear layers already present)"
        )
        report.layers.append(entry)
    report.notes.append(
        "fusing connected linear regions and removing transposes need a graph: "
        "convert(..., mode='exact', output='graph') when the model traces with torch.fx"
    )


def _plan_sites(
    model: nn.Module,
    mode: Mode,
    example: ExampleInputs,
    report: ConversionReport,
    opts: ConvertOptions,
    has_weights: bool = True,
) -> tuple[list[LinearSite], dict[str, LayerReport], FitData]:
    """Capture and plan on the user's model itself (its state is restored afterwards).

    A model on the meta device (``has_weights=False``) gives no activations: the
    fits then report no example output errors.
    """
    sites = find_module_sites(model, example, opts, report.notes)
    opts.check_layer_names(s.name for s in sites)
    entries = {site.name: layer_entry(site) for site in sites}
    report.layers.extend(entries.values())
    apply_skip_rules(mode, sites, entries, opts)
    with unchanged_state(model):
        wanted = mode.needs_fit_data and has_weights
        data = _fit_data(model, sites, example, opts) if wanted else FitData()
    return sites, entries, data


def _world(opts: ConvertOptions) -> tuple[int, int]:
    """``(rank, world size)`` to share fits over (``(0, 1)`` unless ``distributed=True``)."""
    if not opts.distributed:
        return 0, 1
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise NdCompileError(
            "convert(distributed=True) needs an initialised torch.distributed process group",
            hint="call torch.distributed.init_process_group(...) in every process first "
            "(every process must then call convert with the same model and options)",
        )
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _from_rank(
    src: int, layer: nn.Module | None, entries: dict[str, LayerReport], name: str
) -> nn.Module:
    """Share the layer process ``src`` fitted (and its report entry) with every process."""
    box: list[object] = [layer, entries[name]] if layer is not None else [None, None]
    torch.distributed.broadcast_object_list(box, src=src)
    shared, entry = box
    assert isinstance(shared, nn.Module) and isinstance(entry, LayerReport)
    entries[name].__dict__.update(entry.__dict__)
    return shared


def _copy_without(model: nn.Module, replaced: list[str]) -> nn.Module:
    """A deep copy of ``model`` whose layers in ``replaced`` hold meta tensors.

    Those layers are about to be replaced, so their dense weights are never copied:
    converting needs the model's own size plus the new layers, not two full copies.
    """
    memo: dict[int, object] = {}
    for name in replaced:
        for p in model.get_submodule(name).parameters(recurse=False):
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:
        raise NdCompileError(
            f"cannot copy {type(model).__name__} (convert never modifies your model, so it "
            f"converts a deep copy): {type(exc).__name__}: {exc}",
            layer=type(model).__name__,
            hint="make the model deep-copyable (no open files, locks or generators as attributes)",
        ) from exc


def convert_module(model: nn.Module, example: ExampleInputs, opts: ConvertOptions) -> nn.Module:
    """Convert a deep copy of ``model`` by replacing its Linear-like layers in place.

    Args:
        model: The user's model (never modified).
        example: The example call.
        opts: Validated options.

    Returns:
        The copy (the user's class) with converted layers and a ``report``.
    """
    mode = get_mode(opts.mode)
    ckpt = open_weights(model, opts)
    reference = reference_outputs(model, example) if opts.verify and ckpt is None else None
    report = ConversionReport(
        mode=opts.mode,
        params_before=count_parameters(model),
        output="module",
        options=opts.to_json(),
    )
    if mode.replaces_sites:
        if ckpt is None:
            model = with_split_attention(model, opts.include, opts.exclude, report.notes)
        elif has_attention(model):
            report.notes.append(
                "nn.MultiheadAttention projections are kept when the weights come from a "
                "checkpoint (convert the loaded model to convert them)"
            )
        sites, entries, data = _plan_sites(model, mode, example, report, opts, ckpt is None)
        chosen = [site for site in sites if site.convertible]
        work = _copy_without(model, [site.name for site in chosen])
        aliases = tensor_names(model) if ckpt is not None else {}
        rank, world = _world(opts)
        for i, site in enumerate(
            progress(chosen, desc=f"{opts.mode} layers", enabled=opts.progress)
        ):
            layer = None
            if i % world == rank:
                fit = site if ckpt is None else materialized_site(site, model, ckpt, aliases)
                layer = mode.make_layer(fit, entries[site.name], opts, data)
                if isinstance(layer, NdLinear):
                    layer.flat = True
            if world > 1:
                layer = _from_rank(i % world, layer, entries, site.name)
            assert layer is not None
            report.notes.extend(install_layer(work, site.name, layer))
        if world > 1:
            report.notes.append(
                f"layer fits shared over {world} torch.distributed processes (rank i fitted "
                f"layers i, i+{world}, ...; every process holds the whole result)"
            )
        loaded = fill_from_checkpoint(work, ckpt) if ckpt is not None else 0
    else:
        work = _copy_without(model, [])
        loaded = fill_from_checkpoint(work, ckpt) if ckpt is not None else 0
        _exact(work, example, report, opts)
    if ckpt is not None:
        report.notes.append(
            f"weights read from {ckpt.path.name}: each replaced layer's weights when its fit "
            f"ran, then {loaded} tensors of the layers kept"
        )
    mode.finish(work, opts)
    record_in_config(work, opts.mode)
    report.params_after = count_parameters(work)
    if opts.verify and ckpt is None:
        verify_outputs(work, example, reference, report, strict=mode.strict(opts))
    elif opts.verify:
        check_runs(work, example, report)
    work.report = report  # type: ignore[assignment]
    return work
