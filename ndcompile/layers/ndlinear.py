"""The NdLinear layer: a rank-R sum of Kronecker products applied mode by mode.

``NdLinear(in_shape, out_shape, rank)`` maps ``(*, d1..dN) -> (*, h1..hN)`` with the
weight ``W = sum_r W1[r] ⊗ ... ⊗ WN[r]`` (factor ``k`` has shape ``(rank, h_k, d_k)``),
acting on the row-major flattened modes, plus a bias. The forward pass executes a
contraction planned once by opt_einsum and lowered to explicit matmul/reshape ops
(:mod:`ndcompile.ir.lowering`); it never calls opt_einsum at run time, so dynamo traces
it without graph breaks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ndcompile.errors import NdCompileError
from ndcompile.ir.bias_steps import bias_steps
from ndcompile.ir.network import NetworkPlan, TensorNetwork, check_optimizer
from ndcompile.ir.tiled import AUTO_WHOLE_TILES
from ndcompile.layers.construction import (
    BiasKind,
    check_layer_arguments,
    from_reference_layer,
    init_like_linear,
)
from ndcompile.layers.execution import ModeBiases, apply_ndlinear
from ndcompile.planner.autotune import autotune_setting
from ndcompile.planner.plan import PlanChoice, candidate_tile, plan_ndlinear

__all__ = ["NdLinear"]

#: Planner names accepted by :class:`NdLinear`.
PLANNERS = ("cost", "flops")


class NdLinear(nn.Module):
    """Factorized linear layer over N-D inputs.

    Args:
        in_shape: Input mode sizes ``(d1, ..., dN)``.
        out_shape: Output mode sizes ``(h1, ..., hN)``.
        rank: Number of Kronecker terms ``R``.
        bias: ``True`` for a full bias over ``prod(out_shape)``, ``False`` for none,
            ``"modes"`` for the paper's per-mode biases (rank 1 only).
        optimizer: opt_einsum optimizer used to plan the contraction.
        lowrank: Rank ``k`` of an optional low-rank residual ``U @ V`` added to the
            Kronecker weight (a hybrid layer); ``U`` starts at zero.
        plan_batch: Batch size assumed when planning (any batch works at run time).
        planner: ``"cost"`` (default) searches mode groupings x order x layout with
            the cost model of :mod:`ndcompile.plan`; ``"flops"`` uses opt_einsum's
            FLOP-optimal order only.
        autotune: Time the best candidate plans on the real shapes and keep the
            fastest (cached on disk per shape/dtype/device): ``True`` times them
            eagerly, ``"inductor"`` compiled by inductor (for a layer that will run
            under ``torch.compile``), ``"eager-train"``/``"inductor-train"`` time
            forward and backward as this layer trains (with its ``recompute``;
            a step that runs faster untiled leaves inference untiled too),
            ``False`` plans by the cost model.
        flat: Take and return flattened modes, ``(*, prod d) -> (*, prod h)``, the
            ``nn.Linear`` convention (a drop-in replacement for a Linear).
        recompute: In training, save only the input and the factors for backward and
            recompute the contraction's intermediates there, so the layer keeps no
            more activation memory than the dense layer (one extra pass of the
            cheap leading steps per backward). False saves every intermediate.
        tile: Batch rows per tile when the layer runs on the CPU tile by tile
            (:mod:`ndcompile.ir.tiled`): ``"auto"`` (default) sizes tiles to the L2
            caches, an int fixes it, 0 never tiles. Batches of at most two tiles
            run whole; without gradients, up to
            :data:`~ndcompile.ir.tiled.AUTO_WHOLE_TILES` automatic ones do.
        device: Parameter device.
        dtype: Parameter dtype.

    Shape:
        ``(*, d1, ..., dN) -> (*, h1, ..., hN)``; leading dims are batch dims. With
        ``flat=True``: ``(*, prod d) -> (*, prod h)``.

    Example:
        >>> layer = NdLinear((32, 32, 3), (16, 16, 3))
        >>> layer(torch.randn(8, 32, 32, 3)).shape
        torch.Size([8, 16, 16, 3])
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        rank: int = 1,
        bias: BiasKind = True,
        *,
        optimizer: str = "auto",
        lowrank: int = 0,
        plan_batch: int = 64,
        planner: str = "cost",
        autotune: bool | str = False,
        flat: bool = False,
        recompute: bool = True,
        tile: int | str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.flat = bool(flat)
        self.recompute = bool(recompute)
        in_shape, out_shape = check_layer_arguments(in_shape, out_shape, rank, bias, tile)
        self.tile_setting: int | str = tile
        self.in_shape, self.out_shape, self.rank = in_shape, out_shape, int(rank)
        self.bias_kind: BiasKind = bias
        self._mode_order: tuple[int, ...] = tuple(range(len(in_shape)))
        self.optimizer = check_optimizer(optimizer)
        self.plan_batch = int(plan_batch)
        if planner not in PLANNERS:
            raise NdCompileError(
                f"unknown planner {planner!r}; valid planners are: {', '.join(PLANNERS)}"
            )
        self.planner = planner
        self.autotune = autotune_setting(autotune)
        self._choice: PlanChoice | None = None
        self._set_plan(self._make_plan(dtype), dtype)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.factors = nn.ParameterList(
            [
                nn.Parameter(torch.empty(rank, h, d, **kw))
                for d, h in zip(in_shape, out_shape, strict=True)
            ]
        )
        self.bias: nn.Parameter | None = None
        self.mode_biases: nn.ParameterList | None = None
        if lowrank < 0:
            raise NdCompileError(f"NdLinear lowrank must be >= 0, got {lowrank}")
        self.lowrank = int(lowrank)
        self.lowrank_u: nn.Parameter | None = None
        self.lowrank_v: nn.Parameter | None = None
        if lowrank:
            self.lowrank_u = nn.Parameter(torch.empty(math.prod(out_shape), lowrank, **kw))
            self.lowrank_v = nn.Parameter(torch.empty(lowrank, math.prod(in_shape), **kw))
        if bias is True:
            self.bias = nn.Parameter(torch.empty(math.prod(out_shape), **kw))
        elif bias == "modes":
            self.mode_biases = nn.ParameterList(
                [nn.Parameter(torch.empty(h, **kw)) for h in out_shape]
            )
        self.reset_parameters()

    # ------------------------------------------------------------------ setup
    @property
    def in_features(self) -> int:
        """``prod(in_shape)``."""
        return math.prod(self.in_shape)

    @property
    def out_features(self) -> int:
        """``prod(out_shape)``."""
        return math.prod(self.out_shape)

    def reset_parameters(self) -> None:
        """Initialise like the equivalent dense ``nn.Linear`` (variance-matched).

        Each factor is uniform with a bound chosen so the Kronecker sum has the
        same per-entry variance as ``nn.Linear``'s Kaiming-uniform weight.
        """
        init_like_linear(self)

    def network(self) -> TensorNetwork:
        """The layer's tensor network (input ``x`` and factors ``W0..W{N-1}``)."""
        return TensorNetwork.from_ndlinear(self.in_shape, self.out_shape, self.rank)

    def _make_plan(self, dtype: torch.dtype | None = None) -> NetworkPlan:
        if self.planner == "flops":
            self._choice = None
            return self.network().plan(self.optimizer, nominal_batch=self.plan_batch)
        self._choice = plan_ndlinear(
            self.in_shape,
            self.out_shape,
            self.rank,
            batch=self.plan_batch,
            optimizer=self.optimizer,
            autotune=self.autotune,
            dtype=dtype or torch.get_default_dtype(),
            recompute=self.recompute,
        )
        return self._choice.chosen.plan

    def plan(self) -> NetworkPlan:
        """The contraction plan the forward pass executes (made once, at construction)."""
        return self._plan

    @property
    def program_text(self) -> str:
        """The planned program as text (what the tiled contraction op receives)."""
        return self._text

    def plan_choice(self) -> PlanChoice | None:
        """The planner's decision with every candidate's estimate (``planner="cost"``)."""
        return self._choice

    def replan(
        self,
        *,
        optimizer: str | None = None,
        plan_batch: int | None = None,
        autotune: bool | str | None = None,
    ) -> None:
        """Plan again for another optimizer, typical batch size or autotune setting."""
        self.optimizer = check_optimizer(optimizer or self.optimizer)
        self.plan_batch = int(plan_batch or self.plan_batch)
        if autotune is not None:
            self.autotune = autotune_setting(autotune)
        dtype = self.factors[0].dtype
        self._set_plan(self._make_plan(dtype), dtype)

    @property
    def mode_order(self) -> tuple[int, ...]:
        """The order in which the per-mode biases are applied (the reference's order)."""
        return self._mode_order

    @mode_order.setter
    def mode_order(self, order: Sequence[int]) -> None:
        self._mode_order = tuple(int(k) for k in order)
        self._find_bias_steps()

    def _set_plan(self, plan: NetworkPlan, dtype: torch.dtype | None) -> None:
        self._plan = plan
        self._text = plan.program.to_text()
        self._find_bias_steps()
        self._size_tile(dtype)

    def _find_bias_steps(self) -> None:
        # Found when the plan or order is set, not in forward (a walk over the
        # program that dynamo would otherwise trace on every compile).
        self._bias_steps = (
            bias_steps(self._plan.program, self._mode_order) if self.bias_kind == "modes" else None
        )

    def _size_tile(self, dtype: torch.dtype | None) -> None:
        if self.tile_setting != "auto":
            self.tile = int(self.tile_setting)
            return
        if self._choice is not None and self._choice.chosen.whole:
            self.tile = 0  # autotuned: the whole program beat the tiled op
            return
        itemsize = (dtype or torch.get_default_dtype()).itemsize
        self.tile = candidate_tile(
            self._plan.program, self.in_shape, self.out_shape, self.rank, itemsize
        )

    @property
    def whole_tiles(self) -> int:
        """Batches of at most this many tiles run whole where no gradient is taken.

        :data:`~ndcompile.ir.tiled.AUTO_WHOLE_TILES` for automatic tiles, two for a
        fixed tile (``tile_setting``; setting ``tile`` alone keeps the rule of the
        setting). Training tiles more than two tiles either way.
        """
        return AUTO_WHOLE_TILES if self.tile_setting == "auto" else 2

    def _apply(self, fn: Any, recurse: bool = True) -> NdLinear:
        # .to(dtype) changes the bytes per element: size automatic tiles again.
        out = super()._apply(fn, recurse)
        if self.tile_setting == "auto" and "_plan" in self.__dict__:
            self._size_tile(self.factors[0].dtype)
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "mode_order" in self.__dict__:  # pickled when the order was a plain attribute
            self._mode_order = tuple(self.__dict__.pop("mode_order"))
        if "_text" not in self.__dict__:  # pickled before tiled execution existed
            self.tile_setting = "auto"
            self._set_plan(self._plan, self.factors[0].dtype)
        elif "_bias_steps" not in self.__dict__:
            self._find_bias_steps()

    # ---------------------------------------------------------------- compute
    def factor_operands(self) -> list[Tensor]:
        """Factors as the network expects them (rank index dropped for rank 1)."""
        if self.rank == 1:
            return [f[0] for f in self.factors]
        return list(self.factors)

    def lowrank_operands(self) -> tuple[Tensor, Tensor] | None:
        """``(U, V)`` of the low-rank residual, or None."""
        if self.lowrank_u is None or self.lowrank_v is None:
            return None
        return self.lowrank_u, self.lowrank_v

    def full_bias(self) -> Tensor | None:
        """The bias over ``prod(out_shape)`` (computed from mode biases if needed)."""
        bias = self.forward_bias()
        return bias.full() if isinstance(bias, ModeBiases) else bias

    def forward_bias(self) -> Tensor | ModeBiases | None:
        """The bias as the forward pass adds it: full, or per mode in the modes' GEMMs."""
        if self.mode_biases is None:
            return self.bias
        return ModeBiases(
            list(self.mode_biases),
            list(self.factors),
            self.mode_order,
            self.out_shape,
            self._bias_steps,
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer to ``x`` of shape ``(*, d1, ..., dN)`` (``(*, prod d)`` if flat)."""
        expected = (self.in_features,) if self.flat else self.in_shape
        n = len(expected)
        if x.dim() < n or tuple(x.shape[-n:]) != expected:
            raise NdCompileError(
                f"NdLinear{'(flat)' if self.flat else ''} expects input "
                f"(*, {', '.join(map(str, expected))}), got {tuple(x.shape)}",
                hint="the last dim must be the layer's in_features"
                if self.flat
                else "reshape the input so its trailing dims are the layer's in_shape",
            )
        return apply_ndlinear(
            x,
            self.factor_operands(),
            self.forward_bias(),
            self._plan,
            self.in_shape,
            self.out_shape,
            flat_input=self.flat,
            lowrank=self.lowrank_operands(),
            recompute=self.recompute,
            tile=self.tile,
            whole_tiles=self.whole_tiles,
            text=self.program_text,
        )

    # ------------------------------------------------------------ conversions
    def dense_weight(self) -> Tensor:
        """The equivalent dense weight ``(prod h, prod d)``."""
        weight = None
        for r in range(self.rank):
            term = self.factors[0][r]
            for f in list(self.factors)[1:]:
                term = torch.kron(term, f[r])
            weight = term if weight is None else weight + term
        assert weight is not None
        if self.lowrank_u is not None and self.lowrank_v is not None:
            weight = weight + self.lowrank_u @ self.lowrank_v
        return weight

    @property
    def weight(self) -> Tensor:
        """The equivalent dense weight ``(prod h, prod d)``, computed (not a parameter).

        Code written for ``nn.Linear`` reads ``layer.weight.dtype``/``.device`` (e.g.
        transformers' T5); this keeps it working. Building it costs a dense weight's
        memory, so the forward pass never does.
        """
        return self.dense_weight()

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function on flattened inputs."""
        ref = self.factors[0]
        bias = self.full_bias()
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=bias is not None,
            device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if bias is not None:
                dense.bias.copy_(bias)
        return dense

    @classmethod
    def from_reference(cls, layer: nn.Module, *, optimizer: str = "auto") -> NdLinear:
        """Import a reference ``ndlinear.NdLinear`` exactly (per-mode biases kept).

        Args:
            layer: An ``ndlinear.NdLinear`` (one ``nn.Linear`` per mode in
                ``align_layers``; modes applied first to last when
                ``transform_outer`` is true, last to first otherwise).
            optimizer: Planner optimizer of the new layer.

        Returns:
            An NdLinear with ``bias="modes"`` (or no bias) and the same function.
        """
        return from_reference_layer(cls, layer, optimizer=optimizer)

    def extra_repr(self) -> str:
        bias = {True: "full", False: "none", "modes": "modes"}[self.bias_kind]
        extra = f", lowrank={self.lowrank}" if self.lowrank else ""
        extra += ", flat=True" if self.flat else ""
        extra += ", recompute=False" if not self.recompute else ""
        return (
            f"in_shape={self.in_shape}, out_shape={self.out_shape}, rank={self.rank}, "
            f"bias={bias}{extra}"
        )

    def sequential_flops(self, batch: int) -> int:
        """FLOPs of applying the modes one at a time in ``mode_order`` (the paper's way)."""
        dims = list(self.in_shape)
        total = 0
        for k in self.mode_order:
            total += 2 * batch * math.prod(dims) * self.out_shape[k] * self.rank
            dims[k] = self.out_shape[k]
        return total

    def num_parameters(self) -> int:
        """Number of parameters (factors and bias)."""
        return sum(p.numel() for p in self.parameters())
