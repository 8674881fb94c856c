"""Installing NdLinear-LoRA adapters at Linear sites, with their report entries.

``convert(model, x, mode="adapter")`` builds one
:class:`~ndcompile.compress.adapter_linear.NdAdapterLinear` per convertible site with
:func:`adapter_for_site`; :func:`apply_adapters` installs them in a traced graph
module. Each report entry compares the adapter's trainable parameters with LoRA's
(:func:`lora_params`) at the ranks in :data:`LORA_COMPARISON_RANKS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ndcompile.compress.adapter_linear import NdAdapterLinear
from ndcompile.compress.adapters import freeze_all_but_adapters
from ndcompile.errors import NdCompileError
from ndcompile.frontend.sites import LinearSite
from ndcompile.passes.fx.emit import set_submodule
from ndcompile.report import LayerReport

__all__ = ["LORA_COMPARISON_RANKS", "adapter_for_site", "apply_adapters", "lora_params"]

#: LoRA ranks the report lists parameter counts for.
LORA_COMPARISON_RANKS = (1, 4, 8, 16)


def lora_params(in_features: int, out_features: int, r: int) -> int:
    """Trainable parameters of a rank-``r`` LoRA update ``B @ A`` of a Linear.

    ``A`` is ``(r, in_features)`` and ``B`` is ``(out_features, r)``.
    """
    return r * (in_features + out_features)


def _fill_entry(entry: LayerReport, layer: NdAdapterLinear, site: LinearSite) -> None:
    plan = layer.adapter.plan()
    trainable = layer.adapter.num_parameters()
    entry.status = "converted"
    entry.kind = "Linear+NdAdapter"
    entry.rank = layer.rank
    entry.params_before = layer.weight.numel() + (0 if layer.bias is None else layer.bias.numel())
    entry.params_after = trainable
    per_call = entry.flops_before // max(site.n_calls, 1)
    compute = layer.choose_compute()
    if compute == "dense":  # build ΔW, add it, one matmul with W + ΔW
        extra = (2 * layer.rank + 1) * layer.in_features * layer.out_features
    else:  # contraction on x, scale and add
        extra = plan.flops + 2 * site.rows * layer.out_features
    entry.flops_after = (per_call + extra) * site.n_calls
    entry.naive_flops = plan.naive_flops
    entry.largest_intermediate = plan.largest_intermediate
    entry.plan = str(plan)
    n_in_out = layer.in_features + layer.out_features
    entry.extra.update(
        {
            "alpha": layer.alpha,
            "zero_init": layer.zero_init,
            "compute": compute,
            "trainable_params": trainable,
            "lora_rank_equal_params": round(trainable / n_in_out, 3),
            **{
                f"lora_params_r{r}": lora_params(layer.in_features, layer.out_features, r)
                for r in LORA_COMPARISON_RANKS
            },
        }
    )


def apply_adapters(
    gm: fx.GraphModule,
    sites: Sequence[LinearSite],
    entries: Mapping[str, LayerReport],
    *,
    rank: int | Mapping[str, int] = 1,
    alpha: float = 1.0,
    zero_init: bool = True,
    optimizer: str = "auto",
    freeze_base: bool = True,
    compute: str = "auto",
) -> PassResult:
    """Install an :class:`NdAdapterLinear` at every convertible Linear site of ``gm``.

    The adapter replaces the Linear under the same qualified name, so the graph's
    ``call_module`` nodes call it unchanged. With ``freeze_base`` every other
    parameter of ``gm`` is frozen too: only adapter factors are trainable.

    Args:
        gm: A traced graph module (a copy of the user's model; modified in place).
        sites: Sites from :func:`~ndcompile.frontend.sites.find_linear_sites`;
            ``site.in_shape``/``site.out_shape`` are the adapter modes.
        entries: Report entry per site name, filled for the adapted layers.
        rank: Kronecker rank of each update, or ``{layer name: rank}`` (default 1).
        alpha: Scale of each update.
        zero_init: Start every update at zero (the model is unchanged).
        optimizer: Contraction-order optimizer.
        freeze_base: Set ``requires_grad=False`` on all parameters of ``gm`` that
            are not adapter factors.
        compute: How each update is applied (see :class:`NdAdapterLinear`); ``"auto"``
            decides per layer for the example input's rows.

    Returns:
        ``PassResult(gm, modified)``; ``modified`` is False when no site could take
        an adapter (every entry then keeps its skip reason, and with
        ``freeze_base`` nothing in ``gm`` is trainable).

    Raises:
        NdCompileError: If ``rank < 1``.
    """
    ranks = rank.values() if isinstance(rank, Mapping) else [rank]
    if any(r < 1 for r in ranks):
        raise NdCompileError(f"adapter rank must be >= 1, got {rank}")
    chosen = [s for s in sites if s.convertible]
    if not chosen:
        if freeze_base:
            freeze_all_but_adapters(gm)
        return PassResult(gm, False)
    for site in chosen:
        layer = adapter_for_site(
            site,
            entries.get(site.name),
            rank=int(rank.get(site.name, 1)) if isinstance(rank, Mapping) else rank,
            alpha=alpha,
            zero_init=zero_init,
            optimizer=optimizer,
            compute=compute,
        )
        set_submodule(gm, site.name, layer)
    if freeze_base:
        freeze_all_but_adapters(gm)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, True)


def adapter_for_site(
    site: LinearSite,
    entry: LayerReport | None,
    *,
    rank: int = 1,
    alpha: float = 1.0,
    zero_init: bool = True,
    optimizer: str = "auto",
    compute: str = "auto",
) -> NdAdapterLinear:
    """The :class:`NdAdapterLinear` for one convertible site (fills ``entry`` if given)."""
    assert site.in_shape is not None and site.out_shape is not None
    layer = NdAdapterLinear(
        site.module,
        site.in_shape,
        site.out_shape,
        rank=rank,
        alpha=alpha,
        zero_init=zero_init,
        optimizer=optimizer,
        plan_batch=max(site.rows, 1),
        compute=compute,
    )
    layer.adapter.replan(plan_batch=max(site.rows, 1))
    if entry is not None:
        _fill_entry(entry, layer, site)
    return layer
