"""One strategy object per conversion mode, in a registry.

A :class:`Mode` says, for its mode, which sites to leave dense (:meth:`Mode.skip_reason`),
how to build the layer replacing a site (:meth:`Mode.make_layer`), what to do to the
whole converted model afterwards (:meth:`Mode.finish`) and how strictly the output
must match the original (:meth:`Mode.strict`). ``convert`` (both outputs), ``ndcompile
inspect`` and the report all ask the same object, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from ndcompile.compress.hybrid_layers import budget_layer
from ndcompile.compress.layer_fits import factorized_layer
from ndcompile.errors import NdCompileError
from ndcompile.frontend.sites import LinearSite
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.pipeline.checks import fill_layer_stats
from ndcompile.pipeline.options import ConvertOptions
from ndcompile.report import LayerReport

__all__ = ["MODE_REGISTRY", "FitData", "Mode", "apply_skip_rules", "get_mode"]


@dataclass
class FitData:
    """Data the fits of one conversion use, by site name.

    Attributes:
        inputs: Each layer's input on the example (output errors, budget choice).
        grams: Each layer's input Gram matrix over the calibration data.
    """

    inputs: dict[str, Tensor] = field(default_factory=dict)
    grams: dict[str, Tensor] = field(default_factory=dict)


def kronecker_params(site: LinearSite, rank: int) -> int:
    """Parameters of a rank-``rank`` Kronecker sum at ``site``'s modes (no bias)."""
    assert site.in_shape is not None and site.out_shape is not None
    return rank * sum(h * d for h, d in zip(site.out_shape, site.in_shape, strict=True))


def planned(
    layer: NdLinear, entry: LayerReport, site: LinearSite, opts: ConvertOptions
) -> NdLinear:
    """Plan ``layer`` for the rows ``site`` sees (autotuned if asked), then report it."""
    layer.replan(plan_batch=max(site.rows, 1), autotune=opts.autotune)
    fill_layer_stats(entry, layer, site)
    return layer


class Mode:
    """Base strategy: convert every plannable site, verify loosely."""

    name = ""
    #: Whether the mode builds a replacement per site (``exact`` rewrites what exists).
    replaces_sites = True
    #: Whether the fits need each layer's example inputs / calibration Grams.
    needs_fit_data = False

    def strict(self, opts: ConvertOptions) -> bool:
        """Whether the output must equal the original's to fp tolerance."""
        return False

    def skip_reason(self, site: LinearSite, opts: ConvertOptions) -> str | None:
        """Why this mode leaves a plannable site dense (None: convert it)."""
        return None

    def make_layer(
        self, site: LinearSite, entry: LayerReport, opts: ConvertOptions, data: FitData
    ) -> nn.Module:
        """The layer replacing ``site``; fills ``entry``."""
        raise NdCompileError(f"mode {self.name!r} does not build layers per site")

    def finish(self, model: nn.Module, opts: ConvertOptions) -> None:
        """Adjust the converted model as a whole (e.g. freeze all but adapters)."""


class FreshMode(Mode):
    """``fresh``: a newly initialised NdLinear per site."""

    name = "fresh"

    def make_layer(
        self, site: LinearSite, entry: LayerReport, opts: ConvertOptions, data: FitData
    ) -> nn.Module:
        assert site.in_shape is not None and site.out_shape is not None
        w = site.module.weight
        layer = NdLinear(
            site.in_shape,
            site.out_shape,
            rank=opts.rank_of(site.name) or 1,
            bias=site.module.bias is not None,
            optimizer=opts.optimizer,
            device=w.device,
            dtype=w.dtype,
        )
        return planned(layer, entry, site, opts)


class FactorizeMode(Mode):
    """``factorize``: the nearest rank-R Kronecker sum (or best form at a budget)."""

    name = "factorize"
    needs_fit_data = True

    def skip_reason(self, site: LinearSite, opts: ConvertOptions) -> str | None:
        dense = site.module.in_features * site.module.out_features
        if opts.budget is not None:
            smallest = kronecker_params(site, 1)
            allowed = opts.budget * dense
            if smallest > allowed:
                return (
                    f"one Kronecker term ({smallest:,} params) exceeds the budget "
                    f"({int(allowed):,} = {opts.budget:g} of the dense weight)"
                )
            return None
        if opts.skip_larger:
            r = opts.rank_of(site.name) or 1
            after = kronecker_params(site, r)
            if after >= dense:
                return (
                    f"rank {r} factors ({after:,} params) are not smaller than the dense "
                    f"weight ({dense:,}); pass skip_larger=False to force"
                )
        return None

    def make_layer(
        self, site: LinearSite, entry: LayerReport, opts: ConvertOptions, data: FitData
    ) -> nn.Module:
        if opts.budget is not None:
            layer = budget_layer(
                site,
                entry,
                budget=opts.budget,
                optimizer=opts.optimizer,
                x=data.inputs.get(site.name),
                gram=data.grams.get(site.name),
            )
        else:
            layer = factorized_layer(
                site,
                entry,
                rank=opts.rank_of(site.name),
                tol=opts.tol,
                max_rank=opts.max_rank,
                optimizer=opts.optimizer,
                x=data.inputs.get(site.name),
                gram=data.grams.get(site.name),
            )
        return planned(layer, entry, site, opts)


class AdapterMode(Mode):
    """``adapter``: frozen dense base + trainable NdLinear update (NdLinear-LoRA)."""

    name = "adapter"

    def strict(self, opts: ConvertOptions) -> bool:
        return opts.zero_init

    def make_layer(
        self, site: LinearSite, entry: LayerReport, opts: ConvertOptions, data: FitData
    ) -> nn.Module:
        from ndcompile.compress.adapter_sites import adapter_for_site

        return adapter_for_site(
            site,
            entry,
            rank=opts.rank_of(site.name) or 1,
            alpha=opts.alpha,
            zero_init=opts.zero_init,
            optimizer=opts.optimizer,
        )

    def finish(self, model: nn.Module, opts: ConvertOptions) -> None:
        from ndcompile.compress.adapters import freeze_all_but_adapters

        freeze_all_but_adapters(model)


class ExactMode(Mode):
    """``exact``: only function-preserving rewrites of NdLinear layers already present."""

    name = "exact"
    replaces_sites = False

    def strict(self, opts: ConvertOptions) -> bool:
        return True


def apply_skip_rules(
    mode: Mode,
    sites: Sequence[LinearSite],
    entries: Mapping[str, LayerReport],
    opts: ConvertOptions,
) -> None:
    """Give every plannable site the mode leaves dense its reason (site and report entry)."""
    for site in sites:
        if site.convertible:
            reason = mode.skip_reason(site, opts)
            if reason is not None:
                site.skip_reason = reason
                if site.name in entries:
                    entries[site.name].reason = reason


#: Mode name -> strategy.
MODE_REGISTRY: Mapping[str, Mode] = {
    m.name: m for m in (FreshMode(), ExactMode(), FactorizeMode(), AdapterMode())
}


def get_mode(name: str) -> Mode:
    """The strategy of mode ``name``.

    Raises:
        NdCompileError: For an unknown name; the message lists the valid ones.
    """
    try:
        return MODE_REGISTRY[name]
    except KeyError:
        raise NdCompileError(
            f"unknown mode {name!r}; valid modes are: {', '.join(MODE_REGISTRY)}"
        ) from None
