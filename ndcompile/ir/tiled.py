"""Batch-tiled execution of a :class:`~ndcompile.ir.program.ContractionProgram` on the CPU.

An NdLinear program treats every batch row independently, so it can run on a few
rows at a time. Run whole, each step reads and writes a tensor as large as the batch
(the input, an intermediate per mode, the output): on a CPU every step is a pass
through main memory, and training keeps (or recomputes) intermediates that are R
times the activation for a rank-R sum. Run tile by tile, with a tile chosen so that
its input, intermediates and output fit in the L2 caches, the intermediates never
leave the cache: main memory sees the input read and the output written once, and
the transient memory of the layer is that of one tile.

The tiled contraction is the custom op ``ndcompile::tiled_contract`` (with its
backward ``ndcompile::tiled_contract_backward``), so that ``torch.compile`` keeps
it as one opaque kernel instead of unrolling the loop; it saves only its inputs for
backward and recomputes each tile's intermediates there (as
:mod:`ndcompile.ir.autodiff` does for a whole batch). The program travels as its
text (:meth:`ContractionProgram.to_text`). Under ``torch.export`` the untiled
program runs instead, so exported programs hold standard aten ops only.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ndcompile.ir.autodiff import program_vjp, register_shapes
from ndcompile.ir.pages import eager_cpu, empty_like_rows, result_shape
from ndcompile.ir.program import ContractionProgram

__all__ = [
    "AUTO_WHOLE_TILES",
    "PYTHON_IMPLS",
    "TILE_BUDGET_BYTES",
    "choose_tile",
    "graph_tile",
    "program_flops",
    "row_elements",
    "run_tiled",
    "should_tile",
    "tiled_contract",
]

#: Smallest tile worth a loop step (rows).
MIN_TILE = 16

#: Batches of at most this many automatic tiles run whole. Such a batch's working set
#: (8 tiles of 4 MiB or the L2 caches) fits a server's last-level cache, where the
#: whole program's larger GEMMs and single pass of op overhead win: on an Intel Xeon
#: with AVX-512 the transformer's layers (768 -> 768 and 768 <-> 3072) ran 2-33%
#: faster whole at 512-2,048 rows, 2.3 to 9 of their tiles (eager, interleaved).
AUTO_WHOLE_TILES = 8


def _l2_bytes() -> int:
    """Total L2 cache of the machine's first core times the cores torch uses (1 MiB default)."""
    path = "/sys/devices/system/cpu/cpu0/cache/index2/size"
    try:
        with open(path) as fh:
            text = fh.read().strip().upper()
        per_core = int(text.rstrip("KMB")) * (1024 if "K" in text else 1024 * 1024)
    except (OSError, ValueError):
        return 1 << 20
    return per_core * max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


#: Bytes the largest step of one tile may hold: the L2 caches of the cores the GEMMs
#: run on, and at least 4 MiB. Smaller tiles lose more to the per-op overhead of the
#: loop than they gain in cache hits: on a 2-core machine with 1 MiB of L2, steps of
#: 2-8 MB ran the transformer MLP (768 -> 3072 as (24, 32) -> (48, 64), 4,096 rows)
#: and a 3-mode cube fastest, at ranks 1 and 4, forward and backward.
TILE_BUDGET_BYTES = max(_l2_bytes(), 4 << 20)


def row_elements(
    program: ContractionProgram, in_shape: Sequence[int], factors: Sequence[Sequence[int]]
) -> int:
    """Elements per batch row that the program's largest step holds at once.

    A step holds its batch-carrying sources and its result; reshapes are views (the
    copy a reshape makes after a permute is counted at the permute).

    Args:
        program: The program.
        in_shape: ``(d1..dN)`` of one input row.
        factors: Shapes of the factor operands.

    Returns:
        The most elements per row live in one instruction.
    """
    one = register_shapes(program, [(1, *in_shape), *[tuple(f) for f in factors]])
    two = register_shapes(program, [(2, *in_shape), *[tuple(f) for f in factors]])
    per_row = {r: max(math.prod(two[r]) - math.prod(one[r]), 0) for r in one}
    made = {i.out: i for i in program.instructions}

    def base(reg: int) -> int:
        while reg in made and made[reg].op == "reshape":
            reg = made[reg].srcs[0]
        return reg

    peak = per_row[0]
    for ins in program.instructions:
        if ins.op == "reshape":
            continue
        live = {base(s) for s in ins.srcs} | {ins.out}
        peak = max(peak, sum(per_row[r] for r in live))
    return peak


def choose_tile(elements_per_row: int, itemsize: int, budget: int = TILE_BUDGET_BYTES) -> int:
    """Rows per tile so that a tile's largest step fits in ``budget`` bytes (a multiple of 8).

    Args:
        elements_per_row: From :func:`row_elements`.
        itemsize: Bytes per element.
        budget: Working-set bytes per tile.

    Returns:
        Rows per tile, at least :data:`MIN_TILE`.
    """
    rows = budget // max(1, elements_per_row * itemsize)
    return max(MIN_TILE, rows // 8 * 8)


def should_tile(x: Tensor, tile: int, whole_tiles: int = 2) -> bool:
    """Whether a contraction over the batch ``x`` (rows along dim 0) runs tiled.

    Tiling pays on the CPU once the batch holds a few tiles (more than
    ``whole_tiles``: 2 for a tile the user fixed, :data:`AUTO_WHOLE_TILES` for an
    automatic one); GPUs run whole batches (their kernels need the parallelism),
    ``torch.export`` gets the plain ops, and under autocast the plain ops take
    autocast's dtypes.
    """
    if tile <= 0 or not eager_cpu(x):
        return False
    return bool(x.shape[0] > whole_tiles * tile)


def graph_tile(
    program: ContractionProgram,
    row_shape: Sequence[int],
    factor_shapes: Sequence[Sequence[int]],
    like: Any,
    rows: int,
) -> int:
    """Rows per tile for a graph that calls ``program`` over ``rows`` rows, or 0: untiled.

    The graph-level twin of :func:`should_tile` for the ``torch.compile`` backend,
    which decides once per captured graph from its example values: tiles pay on the
    CPU for a floating batch of more than :data:`AUTO_WHOLE_TILES` tiles with static
    row sizes (more than two in a graph captured with gradients enabled).

    Args:
        program: The program (operand 0 is the batch, rows along dim 0).
        row_shape: The batch operand's shape without its rows.
        factor_shapes: Shapes of the other operands.
        like: The batch operand's example value (a FakeTensor), for device and dtype.
        rows: The graph's example rows.

    Returns:
        The tile, or 0 when the plain ops should be emitted.
    """
    if not isinstance(like, Tensor) or like.device.type != "cpu" or not like.is_floating_point():
        return 0
    if not all(isinstance(d, int) for d in (*row_shape, *[d for f in factor_shapes for d in f])):
        return 0
    tile = choose_tile(row_elements(program, row_shape, factor_shapes), like.dtype.itemsize)
    # Dynamo guards on the grad mode: a graph captured for training gets the training
    # rule (more than two tiles: tiled, bounding the recomputed intermediates).
    whole = 2 if torch.is_grad_enabled() else AUTO_WHOLE_TILES
    return tile if rows > whole * tile else 0


@functools.lru_cache(maxsize=256)
def _program(text: str) -> ContractionProgram:
    return ContractionProgram.from_text(text)


def _forward(
    program: ContractionProgram,
    tile: int,
    x: Tensor,
    factors: Sequence[Tensor],
    bias: Tensor | None,
) -> Tensor:
    out = empty_like_rows(x, result_shape(program, x, factors))
    for start in range(0, x.shape[0], tile):
        # The last matmul writes straight into the output rows, with the bias folded
        # into it (or added there while the rows are still in cache).
        program.run(x[start : start + tile], *factors, out=out[start : start + tile], bias=bias)
    return out


def _tiled_contract(
    x: Tensor, factors: list[Tensor], bias: Tensor | None, program: str, tile: int
) -> Tensor:
    """``program.run(x, *factors) + bias``, ``tile`` batch rows at a time.

    Args:
        x: The batch ``(B, d1..dN)``.
        factors: The factor operands.
        bias: Added to every row (broadcast against ``(h1..hN)``), or None.
        program: :meth:`ContractionProgram.to_text` of the program.
        tile: Rows per tile.

    Returns:
        The result ``(B, h1..hN)``.
    """
    return _forward(_program(program), tile, x, factors, bias)


tiled_contract = torch.library.custom_op("ndcompile::tiled_contract", mutates_args=())(
    _tiled_contract
)


@tiled_contract.register_fake
def _tiled_contract_fake(
    x: Tensor, factors: list[Tensor], bias: Tensor | None, program: str, tile: int
) -> Tensor:
    return x.new_empty(result_shape(_program(program), x, factors))


def _tiled_contract_backward(
    grad: Tensor, x: Tensor, factors: list[Tensor], program: str, tile: int, needs: list[bool]
) -> list[Tensor]:
    """Gradients of :func:`tiled_contract` for ``x``, each factor and the bias, tile by tile.

    Each tile's intermediates are recomputed from its rows (:func:`program_vjp`);
    the factors' gradients, and the bias's (the gradient summed over the rows, while
    a tile of it is in cache), are summed over the tiles.

    Args:
        grad: Gradient of the result.
        x: The forward's batch.
        factors: The forward's factors.
        program: The program's text.
        tile: Rows per tile.
        needs: Per operand (``x``, then each factor), whether its gradient is wanted;
            one more flag, when present, for the bias.

    Returns:
        One gradient per operand, then (when ``needs`` has the bias's flag) the
        gradient summed over the rows, of one result row's shape; an empty tensor
        where none is wanted.
    """
    prog = _program(program)
    n = _check_needs(needs, factors)
    # Sums over tiles accumulate in float32 for half-precision gradients, as one
    # reduction over the whole batch would.
    acc_dtype = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
    dx = empty_like_rows(x, x.shape) if needs[0] else x.new_empty(0)
    dfactors: list[Tensor | None] = [None] * len(factors)
    wants_rows = len(needs) > n and needs[n]
    drows = grad.new_zeros(grad.shape[1:], dtype=acc_dtype) if wants_rows else None
    for start in range(0, x.shape[0], tile):
        stop = start + tile
        rows = dx[start:stop] if needs[0] else None
        grads = program_vjp(prog, [x[start:stop], *factors], grad[start:stop], needs[:n], rows)
        if rows is not None and grads[0] is not None and grads[0].data_ptr() != rows.data_ptr():
            rows.copy_(grads[0])
        for k, g in enumerate(grads[1:]):
            if g is not None:
                acc = dfactors[k]
                dfactors[k] = g.to(acc_dtype, copy=True) if acc is None else acc.add_(g)
        if drows is not None:
            drows.add_(grad[start:stop].sum(0, dtype=acc_dtype))
    out = [dx]
    for k, f in enumerate(factors):
        acc = dfactors[k]
        if acc is None:
            acc = f.new_zeros(f.shape) if needs[k + 1] else f.new_empty(0)
        out.append(acc.to(f.dtype).contiguous())
    if len(needs) > n:
        out.append(grad.new_empty(0) if drows is None else drows.to(grad.dtype))
    return out


def _check_needs(needs: Sequence[bool], factors: Sequence[Tensor]) -> int:
    """``1 + len(factors)``: ``needs`` has a flag per operand, and maybe one for the bias."""
    n = 1 + len(factors)
    if len(needs) not in (n, n + 1):
        raise ValueError(f"tiled_contract_backward: {len(needs)} flags for {n} operands")
    return n


tiled_contract_backward = torch.library.custom_op(
    "ndcompile::tiled_contract_backward", mutates_args=()
)(_tiled_contract_backward)

#: The Python implementations of this module's custom ops, by op name (for tools
#: that trace through them, such as :func:`ndcompile.layers.memory.peak_live_bytes`).
PYTHON_IMPLS: dict[str, Callable[..., Any]] = {
    "ndcompile::tiled_contract": _tiled_contract,
    "ndcompile::tiled_contract_backward": _tiled_contract_backward,
}


@tiled_contract_backward.register_fake
def _tiled_contract_backward_fake(
    grad: Tensor, x: Tensor, factors: list[Tensor], program: str, tile: int, needs: list[bool]
) -> list[Tensor]:
    n = _check_needs(needs, factors)
    out = [x.new_empty(x.shape) if needs[0] else x.new_empty(0)]
    out += [f.new_empty(f.shape if w else 0) for f, w in zip(factors, needs[1:n], strict=True)]
    if len(needs) > n:
        out.append(grad.new_empty(grad.shape[1:] if needs[n] else 0))
    return out


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    x, factors, bias, program, tile = inputs
    ctx.save_for_backward(x, *factors)
    ctx.program = program  # type: ignore[attr-defined]
    ctx.tile = tile  # type: ignore[attr-defined]
    ctx.n_factors = len(factors)  # type: ignore[attr-defined]
    ctx.bias_shape = None if bias is None else tuple(bias.shape)  # type: ignore[attr-defined]


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple:
    x, *factors = ctx.saved_tensors  # type: ignore[attr-defined]
    n = ctx.n_factors  # type: ignore[attr-defined]
    # needs_input_grad: x, the factors (a list), bias, program, tile.
    flags: list[bool] = []
    for flag in ctx.needs_input_grad:  # type: ignore[attr-defined]
        if isinstance(flag, list | tuple):
            flags.extend(bool(f) for f in flag)
        else:
            flags.append(bool(flag))
    bias_shape = ctx.bias_shape  # type: ignore[attr-defined]
    wants_bias = bias_shape is not None and flags[1 + n]
    needs = flags[: 1 + n] + ([True] if wants_bias else [])
    grads = tiled_contract_backward(grad, x, factors, ctx.program, ctx.tile, needs)  # type: ignore[attr-defined]
    dx = grads[0] if needs[0] else None
    wanted = needs[1 : 1 + n]
    dfactors = [g if w else None for g, w in zip(grads[1 : 1 + n], wanted, strict=True)]
    dbias = _summed_to(grads[1 + n], bias_shape) if wants_bias else None
    return dx, dfactors, dbias, None, None


def _summed_to(row_grad: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The rows' summed gradient ``(h1..hN)`` summed to a bias of ``shape`` (broadcast to a row).

    A bias with more dims than a row has leading 1s (it broadcasts against every row).
    """
    if len(shape) > row_grad.dim():
        row_grad = row_grad.reshape((1,) * (len(shape) - row_grad.dim()) + tuple(row_grad.shape))
    return row_grad.sum_to_size(shape)


tiled_contract.register_autograd(_backward, setup_context=_setup_context)


def _matmul_flops(program: ContractionProgram, shapes: Sequence[Sequence[int]]) -> list[int]:
    regs = register_shapes(program, [tuple(s) for s in shapes])
    return [
        2 * math.prod(regs[ins.out]) * regs[ins.srcs[0]][-1]
        for ins in program.instructions
        if ins.op == "matmul"
    ]


def program_flops(program: ContractionProgram, shapes: Sequence[Sequence[int]]) -> int:
    """FLOPs of the program's matmuls for operands of ``shapes`` (2 per multiply-add).

    Args:
        program: The program.
        shapes: One shape per operand.

    Returns:
        ``2 * batch * m * k * n`` summed over the matmuls.
    """
    return sum(_matmul_flops(program, shapes))


@register_flop_formula(torch.ops.ndcompile.tiled_contract)
def _tiled_contract_flops(x_shape, factor_shapes, bias_shape, program, tile, out_shape=None):  # type: ignore[no-untyped-def]
    return program_flops(_program(program), [x_shape, *factor_shapes])


@register_flop_formula(torch.ops.ndcompile.tiled_contract_backward)
def _tiled_contract_backward_flops(  # type: ignore[no-untyped-def]
    grad_shape, x_shape, factor_shapes, program, tile, needs, out_shape=None
):
    # Two products per matmul, and the recomputed forward up to the last matmul.
    flops = _matmul_flops(_program(program), [x_shape, *factor_shapes])
    return 2 * sum(flops) + sum(flops[:-1])


def run_tiled(
    text: str,
    tile: int,
    x: Tensor,
    factors: Sequence[Tensor],
    bias: Tensor | None = None,
) -> Tensor:
    """Run ``program`` on ``x`` tile by tile through the custom op (bias added per tile).

    Args:
        text: The program's :meth:`ContractionProgram.to_text`.
        tile: Rows per tile.
        x: The batch ``(B, d1..dN)``.
        factors: The factor operands.
        bias: Broadcast against one result row, or None.

    Returns:
        ``program.run(x, *factors) (+ bias)``.
    """
    return torch.ops.ndcompile.tiled_contract(x, list(factors), bias, text, tile)
