"""NdAdapterLinear: a frozen dense Linear plus a trainable Kronecker-structured update.

An :class:`NdAdapterLinear` keeps a dense layer's weight and bias frozen and adds a
trainable update ``ΔW = alpha * sum_r A1[r] ⊗ ... ⊗ AN[r]`` held by a bias-free
:class:`~ndcompile.layers.ndlinear.NdLinear` over a factorisation of the in/out features::

    y = x @ W.T + b + alpha * adapter(x.reshape(*, d1..dN)).flatten(-N)

With ``zero_init=True`` the last factor starts at zero, so ``ΔW = 0`` and the model
is unchanged at step 0 (as LoRA's ``B = 0``). The update is applied either as the
planned NdLinear contraction on ``x`` (``compute="factored"``) or by forming ``ΔW``
(``R`` Kronecker products, cheap) and running one dense matmul with ``W + ΔW``
(``compute="dense"``); ``"auto"`` picks the cheaper for training from a cost model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ndcompile.compress.kronecker_dense import kronecker_sum
from ndcompile.compress.kronecker_shapes import plan_mode_shapes
from ndcompile.errors import NdCompileError
from ndcompile.frontend.sites import order_like
from ndcompile.layers.execution import apply_ndlinear
from ndcompile.layers.ndlinear import NdLinear

__all__ = ["COMPUTE_MODES", "NdAdapterLinear"]

#: Ways to apply the update; see :meth:`NdAdapterLinear.choose_compute`.
COMPUTE_MODES = ("auto", "factored", "dense")
#: Measured slowdown of the small, permute-heavy factored ops per FLOP relative to
#: one large dense matmul (CPU, fp32).
FACTORED_INEFFICIENCY = 2.0


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
            balanced pair from :func:`~ndcompile.compress.kronecker_shapes.plan_mode_shapes`.
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
            whole_tiles=adapter.whole_tiles,
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
