"""The NdLinear layer: a rank-R sum of Kronecker products applied mode by mode.

``NdLinear(in_shape, out_shape, rank)`` maps ``(*, d1..dN) -> (*, h1..hN)`` with the
weight ``W = sum_r W1[r] ⊗ ... ⊗ WN[r]`` (factor ``k`` has shape ``(rank, h_k, d_k)``),
acting on the row-major flattened modes, plus a bias. The forward pass executes a
contraction planned once by opt_einsum and lowered to explicit matmul/reshape ops
(:mod:`ndcompile.program`); it never calls opt_einsum at run time, so dynamo traces
it without graph breaks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ndcompile.errors import NdCompileError
from ndcompile.ir.autodiff import run_recomputed
from ndcompile.ir.network import NetworkPlan, TensorNetwork, check_optimizer
from ndcompile.ir.tiled import choose_tile, row_elements, run_tiled, should_tile
from ndcompile.planner.plan import PlanChoice, plan_ndlinear

__all__ = ["NdLinear", "apply_ndlinear", "mode_bias"]

BiasKind = bool | str

#: Planner names accepted by :class:`NdLinear`.
PLANNERS = ("cost", "flops")


def mode_bias(
    biases: Sequence[Tensor],
    factors: Sequence[Tensor],
    order: Sequence[int],
    out_shape: Sequence[int],
) -> Tensor:
    """Full bias (flattened) of per-mode biases applied in ``order``.

    Applying mode ``k`` as ``x -> W_k x + b_k`` (``b_k`` broadcast over the other
    modes) in sequence gives the bias ``sum_t (1 ⊗ .. ⊗ b_{m_t} ⊗ .. ⊗ W_j 1)``:
    modes applied before ``m_t`` contribute ones, modes applied after it
    contribute the row sums of their (rank-1) factors.

    Args:
        biases: ``b_k`` of shape ``(h_k,)`` per mode.
        factors: Rank-1 factors ``(1, h_k, d_k)`` per mode.
        order: The order in which the modes are applied.
        out_shape: ``(h1..hN)``.

    Returns:
        The bias of shape ``(prod h,)``.
    """
    n = len(factors)
    out_shape = list(out_shape)
    total = None
    for t, k in enumerate(order):
        term = biases[k]
        view = [1] * n
        view[k] = out_shape[k]
        term = term.reshape(view)
        for j in order[t + 1 :]:
            rows = factors[j][0].sum(dim=1)
            shape = [1] * n
            shape[j] = out_shape[j]
            term = term * rows.reshape(shape)
        term = term.expand(out_shape)
        total = term if total is None else total + term
    assert total is not None
    return total.reshape(-1)


def apply_ndlinear(
    x: Any,
    factors: Sequence[Any],
    bias: Any,
    plan: NetworkPlan,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    *,
    flat_input: bool,
    lead: Any = None,
    lowrank: tuple[Any, Any] | None = None,
    recompute: bool = False,
    tile: int = 0,
    text: str = "",
) -> Any:
    """The NdLinear computation on tensors or FX proxies.

    Args:
        x: Input ``(*, prod d)`` if ``flat_input`` else ``(*, d1..dN)``.
        factors: Factor operands as the plan expects them.
        bias: Full bias ``(prod h,)`` or None.
        plan: The planned contraction.
        in_shape: ``(d1..dN)``.
        out_shape: ``(h1..hN)``.
        flat_input: Whether input and output have flattened modes (the ``nn.Linear``
            convention) rather than N-D modes.
        lead: The leading (batch) dims of ``x`` when they can be read from another
            tensor with the same leading dims (so the graph does not query ``x``);
            default ``x``'s own.
        lowrank: ``(U, V)`` of a low-rank residual ``U @ V`` added to the weight.
        recompute: Save only the contraction's inputs for backward and recompute
            its intermediates there (:mod:`ndcompile.ir.autodiff`); ignored for FX
            proxies.
        tile: Batch rows per tile of a tiled contraction (:mod:`ndcompile.ir.tiled`),
            used on CPU tensors with more than two tiles of rows; 0 never tiles.
            Tiled runs recompute in backward, so with ``recompute=False`` they are
            used only where no gradient is taken.
        text: ``plan.program.to_text()`` (needed when ``tile`` is set).

    Returns:
        ``(*, prod h)`` if ``flat_input`` else ``(*, h1..hN)``; leading dims as ``x``'s.
    """
    if lead is None:
        lead = x.shape[:-1] if flat_input else x.shape[: -len(in_shape)]
    rows = x.reshape((-1, *in_shape))
    tiled = bool(text) and should_tile(rows, tile)
    if tiled and not recompute:
        tiled = not _needs_grad(rows, factors)
    saved = not tiled and recompute and isinstance(rows, Tensor) and _needs_grad(rows, factors)
    # The tiled op and a plain run add the bias (in the last GEMM where it fits, else
    # in place outside autograd); the recomputing autograd function and FX proxies
    # leave it to the end.
    fused_bias = bias if tiled or (isinstance(rows, Tensor) and not saved) else None
    b = None if fused_bias is None else fused_bias.reshape(out_shape)
    if tiled:
        y = run_tiled(text, tile, rows, factors, b)
    elif saved:
        y = run_recomputed(plan.program, rows, *factors)
    else:
        y = plan.program.run(rows, *factors, bias=b)
    if lowrank is not None:
        u, v = lowrank
        flat = x.reshape((-1, math.prod(in_shape)))
        y = y + torch.matmul(torch.matmul(flat, v.t()), u.t()).reshape((-1, *out_shape))
    y = y.reshape(lead + ((math.prod(out_shape),) if flat_input else out_shape))
    if bias is not None and fused_bias is None:
        y = y + (bias if flat_input else bias.reshape(out_shape))
    return y


def _needs_grad(rows: Tensor, factors: Sequence[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in (rows, *factors))


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
            fastest (cached on disk per shape/dtype/device).
        flat: Take and return flattened modes, ``(*, prod d) -> (*, prod h)``, the
            ``nn.Linear`` convention (a drop-in replacement for a Linear).
        recompute: In training, save only the input and the factors for backward and
            recompute the contraction's intermediates there, so the layer keeps no
            more activation memory than the dense layer (one extra pass of the
            cheap leading steps per backward). False saves every intermediate.
        tile: Batch rows per tile when the layer runs on the CPU tile by tile
            (:mod:`ndcompile.ir.tiled`): ``"auto"`` (default) sizes tiles to the L2
            caches, an int fixes it, 0 never tiles. Batches of at most two tiles run
            whole.
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
        autotune: bool = False,
        flat: bool = False,
        recompute: bool = True,
        tile: int | str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.flat = bool(flat)
        self.recompute = bool(recompute)
        if not (tile == "auto" or (isinstance(tile, int) and tile >= 0)):
            raise NdCompileError(f"NdLinear tile must be 'auto' or an int >= 0, got {tile!r}")
        self.tile_setting: int | str = tile
        in_shape, out_shape = tuple(int(d) for d in in_shape), tuple(int(h) for h in out_shape)
        if len(in_shape) != len(out_shape) or not in_shape or min(in_shape + out_shape) < 1:
            raise NdCompileError(
                f"NdLinear needs as many input as output modes, all >= 1; got in_shape="
                f"{in_shape}, out_shape={out_shape}",
                hint="give one output size per input mode, e.g. (32, 32, 3) -> (16, 16, 3)",
            )
        if rank < 1:
            raise NdCompileError(f"NdLinear rank must be >= 1, got {rank}")
        if bias not in (True, False, "modes"):
            raise NdCompileError(f"NdLinear bias must be True, False or 'modes', got {bias!r}")
        if bias == "modes" and rank != 1:
            raise NdCompileError(
                f"bias='modes' is defined for rank 1 only (got rank {rank})",
                hint="use bias=True (a full bias) with rank > 1",
            )
        self.in_shape, self.out_shape, self.rank = in_shape, out_shape, int(rank)
        self.bias_kind: BiasKind = bias
        self.mode_order: tuple[int, ...] = tuple(range(len(in_shape)))
        self.optimizer = check_optimizer(optimizer)
        self.plan_batch = int(plan_batch)
        if planner not in PLANNERS:
            raise NdCompileError(
                f"unknown planner {planner!r}; valid planners are: {', '.join(PLANNERS)}"
            )
        self.planner = planner
        self.autotune = bool(autotune)
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
        if any(f.is_meta for f in self.factors):
            return
        n = len(self.factors)
        # Var(W) = R * prod Var(W_k); nn.Linear: bound b -> Var = b^2 / 3 with b^2 = 1 / fan_in.
        target_var = 1.0 / (3.0 * self.in_features)
        per_mode_var = (target_var / self.rank) ** (1.0 / n)
        bound = math.sqrt(3.0 * per_mode_var)
        with torch.no_grad():
            for f in self.factors:
                f.uniform_(-bound, bound)
            fan_bound = 1.0 / math.sqrt(self.in_features)
            if self.bias is not None:
                self.bias.uniform_(-fan_bound, fan_bound)
            if self.lowrank_u is not None and self.lowrank_v is not None:
                self.lowrank_u.zero_()
                self.lowrank_v.uniform_(-fan_bound, fan_bound)
            if self.mode_biases is not None:
                for k, b in enumerate(self.mode_biases):
                    b.uniform_(-1.0, 1.0).mul_(1.0 / math.sqrt(self.in_shape[k]))

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
        autotune: bool | None = None,
    ) -> None:
        """Plan again for another optimizer, typical batch size or autotune setting."""
        self.optimizer = check_optimizer(optimizer or self.optimizer)
        self.plan_batch = int(plan_batch or self.plan_batch)
        if autotune is not None:
            self.autotune = autotune
        dtype = self.factors[0].dtype
        self._set_plan(self._make_plan(dtype), dtype)

    def _set_plan(self, plan: NetworkPlan, dtype: torch.dtype | None) -> None:
        self._plan = plan
        self._text = plan.program.to_text()
        self._size_tile(dtype)

    def _size_tile(self, dtype: torch.dtype | None) -> None:
        if self.tile_setting != "auto":
            self.tile = int(self.tile_setting)
            return
        modes = zip(self.in_shape, self.out_shape, strict=True)
        shapes = [(self.rank, h, d) if self.rank > 1 else (h, d) for d, h in modes]
        itemsize = (dtype or torch.get_default_dtype()).itemsize
        self.tile = choose_tile(row_elements(self._plan.program, self.in_shape, shapes), itemsize)

    def _apply(self, fn: Any, recurse: bool = True) -> NdLinear:
        # .to(dtype) changes the bytes per element: size automatic tiles again.
        out = super()._apply(fn, recurse)
        if self.tile_setting == "auto" and "_plan" in self.__dict__:
            self._size_tile(self.factors[0].dtype)
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_text" not in self.__dict__:  # pickled before tiled execution existed
            self.tile_setting = "auto"
            self._set_plan(self._plan, self.factors[0].dtype)

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
        if self.mode_biases is not None:
            return mode_bias(
                list(self.mode_biases), list(self.factors), self.mode_order, self.out_shape
            )
        return self.bias

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
            self.full_bias(),
            self._plan,
            self.in_shape,
            self.out_shape,
            flat_input=self.flat,
            lowrank=self.lowrank_operands(),
            recompute=self.recompute,
            tile=self.tile,
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
        linears = list(getattr(layer, "align_layers", []))
        if not linears or not all(isinstance(m, nn.Linear) for m in linears):
            raise NdCompileError(
                f"{type(layer).__name__} is not a reference NdLinear (no align_layers)"
            )
        has_bias = [m.bias is not None for m in linears]
        if any(has_bias) != all(has_bias):
            raise NdCompileError("reference NdLinear mixes modes with and without bias")
        ref = linears[0].weight
        new = cls(
            [m.in_features for m in linears],
            [m.out_features for m in linears],
            rank=1,
            bias="modes" if all(has_bias) else False,
            optimizer=optimizer,
            device=ref.device,
            dtype=ref.dtype,
        )
        n = len(linears)
        new.mode_order = (
            tuple(range(n))
            if getattr(layer, "transform_outer", True)
            else tuple(reversed(range(n)))
        )
        with torch.no_grad():
            for f, m in zip(new.factors, linears, strict=True):
                f.copy_(m.weight.unsqueeze(0))
            if new.mode_biases is not None:
                for b, m in zip(new.mode_biases, linears, strict=True):
                    b.copy_(m.bias)
        return new

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
