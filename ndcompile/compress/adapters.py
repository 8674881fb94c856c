"""NdLinear-LoRA: frozen dense layers plus trainable Kronecker-structured adapters.

An :class:`NdAdapterLinear` keeps a dense layer's weight and bias frozen and adds a
trainable update ``ΔW = alpha * sum_r A1[r] ⊗ ... ⊗ AN[r]`` held by a bias-free
:class:`~ndcompile.layers.ndlinear.NdLinear` over a factorisation of the in/out features::

    y = x @ W.T + b + alpha * adapter(x.reshape(*, d1..dN)).flatten(-N)

With ``zero_init=True`` the last factor starts at zero, so ``ΔW = 0`` and the model
is unchanged at step 0 (as LoRA's ``B = 0``). The update is applied either as the
planned NdLinear contraction on ``x`` (``compute="factored"``) or by forming ``ΔW``
(``R`` Kronecker products, cheap) and running one dense matmul with ``W + ΔW``
(``compute="dense"``); ``"auto"`` picks the cheaper for training from a cost model.
``convert(model, x, mode="adapter")`` calls :func:`apply_adapters`;
:func:`merge_adapters` folds the updates back into plain ``nn.Linear`` layers, and
:func:`adapter_state_dict` / :func:`load_adapter_state_dict` save and restore the
adapter weights alone.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.infra.pass_base import PassResult

from ndcompile.compress.kronecker import plan_mode_shapes
from ndcompile.errors import NdCompileError
from ndcompile.frontend.sites import LinearSite, order_like
from ndcompile.layers.execution import apply_ndlinear
from ndcompile.layers.ndlinear import NdLinear
from ndcompile.passes.fx.emit import set_submodule
from ndcompile.report import LayerReport

__all__ = [
    "COMPUTE_MODES",
    "LORA_COMPARISON_RANKS",
    "NdAdapterLinear",
    "adapter_for_site",
    "adapter_state_dict",
    "apply_adapters",
    "count_trainable",
    "freeze_all_but_adapters",
    "kronecker_sum",
    "load_adapter_state_dict",
    "lora_params",
    "merge_adapters",
]

#: LoRA ranks the report lists parameter counts for.
LORA_COMPARISON_RANKS = (1, 4, 8, 16)
#: Ways to apply the update; see :meth:`NdAdapterLinear.choose_compute`.
COMPUTE_MODES = ("auto", "factored", "dense")
#: Measured slowdown of the small, permute-heavy factored ops per FLOP relative to
#: one large dense matmul (CPU, fp32).
FACTORED_INEFFICIENCY = 2.0


def lora_params(in_features: int, out_features: int, r: int) -> int:
    """Trainable parameters of a rank-``r`` LoRA update ``B @ A`` of a Linear.

    ``A`` is ``(r, in_features)`` and ``B`` is ``(out_features, r)``.
    """
    return r * (in_features + out_features)


def count_trainable(model: nn.Module) -> int:
    """Parameters of ``model`` with ``requires_grad`` (tied ones counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def kronecker_sum(
    factors: Sequence[Tensor], in_shape: Sequence[int], out_shape: Sequence[int]
) -> Tensor:
    """``sum_r F1[r] ⊗ ... ⊗ FN[r]`` as a ``(prod h, prod d)`` matrix.

    Uses only the static mode sizes, so it also runs on FX proxies. The rank index
    is summed in the last step (one matmul), so no ``R``-fold dense tensor is built.

    Args:
        factors: Factor ``k`` of shape ``(R, h_k, d_k)``.
        in_shape: ``(d1..dN)``.
        out_shape: ``(h1..hN)``.
    """
    acc, rows, cols = factors[0], out_shape[0], in_shape[0]
    if len(factors) == 1:
        return acc.sum(0)
    for f, h, d in zip(factors[1:-1], out_shape[1:-1], in_shape[1:-1], strict=True):
        acc = torch.einsum("rac,rbd->rabcd", acc, f).reshape(-1, rows * h, cols * d)
        rows, cols = rows * h, cols * d
    last = torch.einsum("rac,rbd->abcd", acc, factors[-1])
    return last.reshape(rows * out_shape[-1], cols * in_shape[-1])


def _default_modes(linear: nn.Linear) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two balanced modes per side: the largest divisor <= sqrt(n) and its cofactor."""
    in_shape = plan_mode_shapes(linear.in_features, 2)
    out_modes = plan_mode_shapes(linear.out_features, 2)
    if in_shape is None or out_modes is None:
        raise NdCompileError(
            f"Linear({linear.in_features}, {linear.out_features}) has a feature size that "
            "cannot be split into two modes >= 2 (prime or too small)",
            hint="pass in_shape=... and out_shape=... explicitly",
        )
    return in_shape, order_like(out_modes, in_shape)


class NdAdapterLinear(nn.Module):
    """A frozen dense Linear plus a trainable NdLinear (Kronecker-sum) update.

    The base weight and bias are copies of ``base``'s (``base`` itself is not
    touched) with ``requires_grad=False``; they keep the names ``weight`` and
    ``bias`` so a dense checkpoint's keys still match. The adapter is the
    bias-free ``adapter`` submodule (keys ``adapter.factors.0`` ...).

    Args:
        base: The dense layer to adapt.
        in_shape: Input modes ``(d1..dN)``, product ``in_features``. Default: the
            balanced pair from :func:`~ndcompile.compress.kronecker.plan_mode_shapes`.
        out_shape: Output modes ``(h1..hN)``, product ``out_features``. Default:
            the balanced pair, ordered like ``in_shape``.
        rank: Number of Kronecker terms ``R`` of the update.
        alpha: Scale of the update: ``ΔW = alpha * sum_r A1[r] ⊗ ... ⊗ AN[r]``.
        zero_init: Start the last factor at zero so ``ΔW = 0`` (other factors get
            NdLinear's initialisation, so gradients reach the last factor).
        optimizer: Contraction-order optimizer of the adapter.
        plan_batch: Typical number of rows, used when planning the contraction
            and by ``compute="auto"``.
        compute: ``"factored"`` (contract ``x`` with the factors), ``"dense"`` (one
            matmul with ``W + ΔW``) or ``"auto"`` (:meth:`choose_compute`). Same
            function and gradients either way; settable later as ``.compute``.

    Shape:
        ``(*, in_features) -> (*, out_features)``, like ``nn.Linear``.
    """

    def __init__(
        self,
        base: nn.Linear,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        *,
        rank: int = 1,
        alpha: float = 1.0,
        zero_init: bool = True,
        optimizer: str = "auto",
        plan_batch: int = 64,
        compute: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise NdCompileError(f"NdAdapterLinear adapts an nn.Linear, got {type(base).__name__}")
        if (in_shape is None) != (out_shape is None):
            raise NdCompileError(
                "give both in_shape and out_shape, or neither",
                hint="e.g. in_shape=(8, 8), out_shape=(16, 16) for Linear(64, 256)",
            )
        if in_shape is None or out_shape is None:
            in_shape, out_shape = _default_modes(base)
        in_shape, out_shape = tuple(int(d) for d in in_shape), tuple(int(h) for h in out_shape)
        if math.prod(in_shape) != base.in_features or math.prod(out_shape) != base.out_features:
            raise NdCompileError(
                f"adapter modes {in_shape} -> {out_shape} do not match Linear("
                f"{base.in_features}, {base.out_features})",
                hint="the products of the modes must equal in_features and out_features",
            )
        w = base.weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.alpha = float(alpha)
        self.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        self.bias: nn.Parameter | None = None
        if base.bias is not None:
            self.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.adapter = NdLinear(
            in_shape,
            out_shape,
            rank=rank,
            bias=False,
            optimizer=optimizer,
            plan_batch=plan_batch,
            device=w.device,
            dtype=w.dtype,
        )
        self.zero_init = bool(zero_init)
        if zero_init:
            with torch.no_grad():
                self.adapter.factors[-1].zero_()
        self.compute = compute

    @property
    def compute(self) -> str:
        """How the update is applied: ``"auto"``, ``"factored"`` or ``"dense"``."""
        return self._compute

    @compute.setter
    def compute(self, value: str) -> None:
        if value not in COMPUTE_MODES:
            raise NdCompileError(
                f"unknown adapter compute mode {value!r}; valid modes are: "
                f"{', '.join(COMPUTE_MODES)}"
            )
        self._compute = value

    def cost_estimates(self, rows: int | None = None) -> dict[str, float]:
        """Extra FLOP-equivalents of one training step over the frozen base layer.

        ``factored``: forward + two backward contractions of the plan, weighted by
        :data:`FACTORED_INEFFICIENCY`, plus the output add. ``dense``: building
        ``ΔW`` and its backward, plus the weight-gradient matmul the merged
        weight needs (``2 * rows * in * out``).

        Args:
            rows: Rows per call; default the adapter's ``plan_batch``.
        """
        plan = self.adapter.plan()
        rows = rows or plan.nominal_batch
        per_row = plan.flops / max(plan.nominal_batch, 1)
        dense_w = self.in_features * self.out_features
        return {
            "factored": 3 * rows * per_row * FACTORED_INEFFICIENCY + 2 * rows * self.out_features,
            "dense": 2 * rows * dense_w + 3 * (2 * self.rank + 1) * dense_w,
        }

    def choose_compute(self, rows: int | None = None) -> str:
        """The cheaper of ``"factored"`` and ``"dense"`` by :meth:`cost_estimates`."""
        if self.compute != "auto":
            return self.compute
        costs = self.cost_estimates(rows)
        return "dense" if costs["dense"] < costs["factored"] else "factored"

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Input modes of the adapter."""
        return self.adapter.in_shape

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Output modes of the adapter."""
        return self.adapter.out_shape

    @property
    def rank(self) -> int:
        """Kronecker rank of the update."""
        return self.adapter.rank

    def forward(self, x: Tensor) -> Tensor:
        """``base(x) + alpha * adapter(x)`` on ``x`` of shape ``(*, in_features)``."""
        adapter = self.adapter
        if self.choose_compute() == "dense":
            delta_w = kronecker_sum(list(adapter.factors), adapter.in_shape, adapter.out_shape)
            return F.linear(x, self.weight + self.alpha * delta_w, self.bias)
        delta = apply_ndlinear(
            x,
            adapter.factor_operands(),
            None,
            adapter.plan(),
            adapter.in_shape,
            adapter.out_shape,
            flat_input=True,
            recompute=adapter.recompute,
            tile=adapter.tile,
            text=adapter.program_text,
        )
        return F.linear(x, self.weight, self.bias) + self.alpha * delta

    def delta_weight(self) -> Tensor:
        """The dense update ``alpha * sum_r A1[r] ⊗ ... ⊗ AN[r]``, ``(out, in)``."""
        adapter = self.adapter
        return self.alpha * kronecker_sum(
            list(adapter.factors), adapter.in_shape, adapter.out_shape
        )

    def merged(self) -> nn.Linear:
        """An ``nn.Linear`` with weight ``W + ΔW`` (same function, no adapter)."""
        w = self.weight
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(w + self.delta_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, alpha={self.alpha}, compute={self.compute!r}"
        )


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


def _adapter_layers(model: nn.Module) -> dict[str, NdAdapterLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NdAdapterLinear)}


def freeze_all_but_adapters(model: nn.Module) -> nn.Module:
    """Set ``requires_grad`` on the adapter factors of ``model`` and clear it elsewhere.

    Modifies ``model`` in place (meant for a converted copy) and returns it.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in _adapter_layers(model).values():
        layer.adapter.requires_grad_(True)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every adapter folded into a plain ``nn.Linear``.

    Each :class:`NdAdapterLinear` becomes ``nn.Linear`` with weight
    ``W + alpha * sum_r A1[r] ⊗ ... ⊗ AN[r]`` and the base bias, installed under
    the same name (so a converted ``fx.GraphModule`` keeps working). The merged
    layers' parameters have ``requires_grad=True``; others keep their flags.
    ``model`` is not modified.

    Raises:
        NdCompileError: If ``model`` has no adapters.
    """
    if not _adapter_layers(model):
        raise NdCompileError(
            f"{type(model).__name__} has no NdAdapterLinear layers to merge",
            hint="convert with ndcompile.convert(model, x, mode='adapter') first",
        )
    merged = copy.deepcopy(model)
    for name, layer in _adapter_layers(merged).items():
        set_submodule(merged, name, layer.merged())
    return merged


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter factors of ``model``, under their ``state_dict`` keys.

    Like ``state_dict()``, the values are detached tensors sharing storage with
    the parameters (``torch.save`` it, or ``clone`` to snapshot).
    """
    out: dict[str, Tensor] = {}
    for name, layer in _adapter_layers(model).items():
        prefix = f"{name}.adapter." if name else "adapter."
        for key, value in layer.adapter.state_dict().items():
            out[prefix + key] = value
    return out


def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Copy adapter weights saved by :func:`adapter_state_dict` into ``model``.

    Keys must match exactly (strict) and every tensor must have the adapter's
    shape; the base weights are not touched.

    Raises:
        NdCompileError: On missing or unexpected keys, or a shape mismatch (a
            different rank or mode split); names the keys and shapes.
    """
    own = adapter_state_dict(model)
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise NdCompileError(
            f"adapter state_dict keys do not match the model: missing {missing}, "
            f"unexpected {unexpected}",
            layer=type(model).__name__,
            hint="load a state_dict saved from a model converted with the same include= "
            "and layer names",
        )
    for key, target in own.items():
        value = state_dict[key]
        if tuple(value.shape) != tuple(target.shape):
            raise NdCompileError(
                f"adapter tensor {key!r} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(target.shape)}",
                layer=key.rpartition(".adapter.")[0] or None,
                hint="convert with the same rank= and shapes= the adapters were trained with",
            )
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(state_dict[key])
