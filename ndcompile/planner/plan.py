"""Contraction planner for NdLinear: mode grouping x order x layout, scored by a cost model.

opt_einsum minimises FLOPs, but the fastest NdLinear execution also depends on how
modes are grouped and on memory layout. A *grouping* merges adjacent modes into one
Kronecker block, computed in the graph from the trainable factors on every call
(so gradients flow to the factors, which stay the source of truth): merging a small
trailing mode (e.g. 3 channels) with its neighbour costs extra FLOPs but saves a
full pass over memory and a tiny, inefficient matmul. For each grouping the order of
the remaining contractions comes from opt_einsum and the layout of each step from
:mod:`ndcompile.program`. Candidates are scored with

    time = Σ_matmul max(FLOPs / (peak · efficiency), bytes / bandwidth) + overhead
         + Σ_permute 2 · bytes / bandwidth + overhead

where the bandwidth of an op depends on the size it writes (large fresh buffers pay
page faults; small ones mostly hit cache)

using measured machine constants (:mod:`ndcompile.machine`). ``autotune=True`` times
the best few candidates on the real shapes instead (``autotune="inductor"``: compiled
by inductor; ``"eager-train"``/``"inductor-train"``: forward and backward;
:mod:`ndcompile.planner.autotune`, :mod:`ndcompile.planner.timed`), always with the
reference layer's own schedule and op sequence among them
(:mod:`ndcompile.planner.reference`), and caches the decision on disk keyed on
(network, shapes, dtype, device, threads, torch version, autotune mode).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations, pairwise, permutations
from typing import Any

import opt_einsum
import torch

from ndcompile.ir.network import NetworkPlan, TensorNetwork, check_optimizer
from ndcompile.ir.program import ContractionProgram
from ndcompile.ir.terms import sum_of_terms
from ndcompile.planner import autotune as tuning
from ndcompile.planner.cache import autotune_cache
from ndcompile.planner.machine import MachineModel, machine_model
from ndcompile.planner.reference import (
    reference_layout_plan,
    reference_schedule,
    sequential_path,
)
from ndcompile.planner.timed import candidate_tile, timed_candidates

__all__ = [
    "Candidate",
    "PlanChoice",
    "candidate_tile",
    "estimate_us",
    "groupings",
    "is_dense_block",
    "plan_ndlinear",
    "reference_layout_plan",
    "reference_schedule",
]

#: Kronecker blocks larger than this (elements) are not materialised.
MAX_BLOCK_ELEMENTS = 1 << 21
#: Outputs above this size are fresh allocations that stream at the measured (large
#: copy) bandwidth; smaller ones mostly stay in cache and reuse allocator memory.
LARGE_BUFFER_BYTES = 16 * 2**20
#: Effective bandwidth of small outputs relative to the measured large-copy bandwidth
#: (fitted to timed candidates of the benchmark cases on a 2-core CPU).
CACHED_BANDWIDTH_FACTOR = 4.0
#: Mode orders are enumerated for layers with at most this many modes.
MAX_ORDER_MODES = 4
#: Matmul dims below this run at reduced efficiency.
EFFICIENT_DIM = 32
#: Best rank-1 plans tried as R separate chains of a rank-R layer.
CHAIN_CANDIDATES = 3


@dataclass(frozen=True)
class Candidate:
    """One execution plan of an NdLinear network.

    Attributes:
        grouping: Adjacent modes merged into Kronecker blocks, e.g. ``((0,), (1, 2))``.
        plan: The lowered contraction.
        est_us: Cost-model estimate of one forward call, in microseconds.
        measured_us: Median measured time when autotuned, else None.
        order: Modes applied one at a time in this order (None: opt_einsum's order
            for the grouping).
        chains: Rank R > 1 run as R separate rank-1 chains (each planned as
            ``grouping``/``order``) and added, instead of stacked factors (one
            GEMM per mode over all R terms, the sum folded into the last one).
        layout: ``"reference"`` for the reference layer's own op sequence
            (:func:`~ndcompile.planner.reference.reference_layout_plan`), else empty
            (ndcompile's lowering).
        whole: Run untiled although the batch would be tiled: set when autotuning
            (in any mode) found the whole program, compiled under inductor, faster
            than the tiled op, whose tiles run eagerly, out of inductor's sight.
    """

    grouping: tuple[tuple[int, ...], ...]
    plan: NetworkPlan
    est_us: float
    measured_us: float | None = None
    order: tuple[int, ...] | None = None
    chains: int = 0
    layout: str = ""
    whole: bool = False

    @property
    def label(self) -> str:
        """Short description: ``modes 0 | 1⊗2``, ``order 1,0``, ``4 chains: order 1,0``."""
        if self.layout:
            label = f"{self.layout} layout"
        elif self.order is not None:
            label = "order " + ",".join(map(str, self.order))
        else:
            label = "modes " + " | ".join("⊗".join(map(str, g)) for g in self.grouping)
        label = f"{self.chains} chains: {label}" if self.chains else label
        return f"{label}, untiled" if self.whole else label


@dataclass
class PlanChoice:
    """The chosen candidate and the alternatives, printable like opt_einsum's PathInfo.

    Attributes:
        chosen: The candidate the layer runs.
        candidates: Every candidate (timed ones first when autotuned).
        autotuned: Whether the choice was made by timing.
        cache_hit: Whether the timed decision came from the on-disk cache.
        mode: How candidates were timed: ``"eager"`` or ``"inductor"``, the forward
            alone, or ``"eager-train"`` or ``"inductor-train"``, forward and backward.
    """

    chosen: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    autotuned: bool = False
    cache_hit: bool = False
    mode: str = "eager"

    def __str__(self) -> str:
        how = "cost model"
        if self.autotuned:
            how = "autotuned" + (" under inductor" if tuning.is_compiled(self.mode) else "")
            how += ", forward+backward" if tuning.is_training(self.mode) else ""
            how += " (cached)" if self.cache_hit else ""
        lines = [f"  plan ({how}): {self.chosen.label}", str(self.chosen.plan)]
        lines.append("  candidates (estimated µs | measured µs | FLOPs):")
        width = max([24, *(len(c.label) for c in self.candidates)])
        for cand in self.candidates:
            mark = "*" if cand is self.chosen else " "
            measured = f"{cand.measured_us:9.1f}" if cand.measured_us is not None else "        -"
            label = cand.label.ljust(width)
            lines.append(f"   {mark} {label} {cand.est_us:9.1f} | {measured} | {cand.plan.flops:,}")
        return "\n".join(lines)


def groupings(n: int) -> list[tuple[tuple[int, ...], ...]]:
    """All ways to split modes ``0..n-1`` into runs of adjacent modes (2**(n-1) of them)."""
    out = []
    for k in range(n):
        for cuts in combinations(range(1, n), k):
            bounds = (0, *cuts, n)
            out.append(tuple(tuple(range(a, b)) for a, b in pairwise(bounds)))
    return out


def _bandwidth(machine: MachineModel, nbytes: float) -> float:
    """Bytes per µs for an op writing ``nbytes``: fresh large buffers pay page faults."""
    gbs = machine.bandwidth_gbs
    return (gbs if nbytes > LARGE_BUFFER_BYTES else CACHED_BANDWIDTH_FACTOR * gbs) * 1e3


def estimate_us(program: ContractionProgram, machine: MachineModel, itemsize: int = 4) -> float:
    """Cost-model time of one execution of ``program``, in microseconds."""
    peak = machine.matmul_gflops * 1e3  # FLOP per µs
    total = 0.0
    for ins in program.instructions:
        if ins.op == "matmul":
            batch, m, k, n, lb, rb = ins.dims
            eff = math.sqrt(min(1.0, m / EFFICIENT_DIM) * min(1.0, n / EFFICIENT_DIM))
            eff *= min(1.0, k / EFFICIENT_DIM) ** 0.5
            flops = 2.0 * batch * m * k * n
            written = itemsize * batch * m * n
            moved = itemsize * (lb * m * k + rb * k * n) + written
            bw = _bandwidth(machine, written)
            total += max(flops / (peak * max(eff, 0.02)), moved / bw) + machine.op_overhead_us
        elif ins.op == "permute":
            nbytes = itemsize * ins.dims[0]
            total += 2.0 * nbytes / _bandwidth(machine, nbytes) + machine.op_overhead_us
        elif ins.op == "add":
            nbytes = itemsize * ins.dims[0]
            total += 3.0 * nbytes / _bandwidth(machine, nbytes) + machine.op_overhead_us
        else:
            total += 0.3 * machine.op_overhead_us
    return total


def _grouping_path(
    tn: TensorNetwork, grouping: tuple[tuple[int, ...], ...], nominal_batch: int
) -> list[tuple[int, ...]] | None:
    """Path contracting each block's factors first, then the rest optimally."""
    names = tn.tensors  # x, W0..W{N-1}
    live: list[tuple[str, ...]] = [tn.indices(t) for t in names]
    labels: list[str] = list(names)
    path: list[tuple[int, ...]] = []
    for block in grouping:
        if len(block) < 2:
            continue
        size = math.prod(math.prod(tn.graph.nodes[f"W{k}"]["shape"]) for k in block)
        if size > MAX_BLOCK_ELEMENTS:
            return None
        for k in block[1:]:
            first = labels.index(f"W{block[0]}" if k == block[1] else f"B{block[0]}")
            second = labels.index(f"W{k}")
            i, j = sorted((first, second))
            merged = tuple(dict.fromkeys(live[i] + live[j]))
            for p in (j, i):
                live.pop(p)
                labels.pop(p)
            live.append(merged)
            labels.append(f"B{block[0]}")
            path.append((i, j))
    if len(live) > 1:
        sizes = {i: (nominal_batch if i == tn.dynamic else s) for i, s in tn.sizes.items()}
        letters = {name: opt_einsum.get_symbol(k) for k, name in enumerate(sizes)}
        eq = ",".join("".join(letters[i] for i in op) for op in live)
        eq += "->" + "".join(letters[i] for i in tn.output)
        shapes = [tuple(sizes[i] for i in op) for op in live]
        rest, _ = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize="optimal")
        path.extend(tuple(step) for step in rest)
    return path


def _load_cache() -> dict[str, str]:
    return autotune_cache().load()


def _store_cache(key: str, label: str) -> None:
    autotune_cache().set(key, label)


def is_dense_block(cand: Candidate, n_modes: int) -> bool:
    """Whether ``cand`` is the dense layer: every mode in one Kronecker block, one GEMM."""
    return not cand.chains and cand.grouping == (tuple(range(n_modes)),)


@dataclass(frozen=True)
class _Problem:
    """What the candidates are planned for: the network, its shapes and the machine."""

    tn: TensorNetwork
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    rank: int
    batch: int
    optimizer: str
    machine: MachineModel
    itemsize: int

    def fields(self) -> tuple[Any, ...]:
        """The fields in order, shallow (``dataclasses.astuple`` would deep-copy them)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def _chain_candidates(
    problem: _Problem,
) -> list[Candidate]:
    """The best rank-1 plans of the same shapes, each run as ``rank`` separate chains."""
    tn, in_shape, out_shape, rank, batch, optimizer, machine, itemsize = problem.fields()
    single = plan_ndlinear(
        in_shape, out_shape, 1, batch=batch, optimizer=optimizer, machine=machine
    )
    stacked = tn.plan(optimizer, nominal_batch=batch)
    elements = batch * math.prod(out_shape)
    out = []
    for cand in single.candidates[:CHAIN_CANDIDATES]:
        program = sum_of_terms(cand.plan.program, rank, elements)
        plan = dataclasses.replace(
            cand.plan,
            equation=stacked.equation,
            optimizer=f"{rank} x {cand.plan.optimizer}",
            flops=rank * cand.plan.flops + (rank - 1) * elements,
            naive_flops=stacked.naive_flops,
            program=program,
        )
        est = estimate_us(program, machine, itemsize)
        out.append(
            Candidate(cand.grouping, plan, est, order=cand.order, chains=rank, layout=cand.layout)
        )
    return out


def _candidates(problem: _Problem) -> list[Candidate]:
    """Every distinct plan: groupings x orders, the reference layout, rank-R chains."""
    tn, in_shape, out_shape, rank, batch, optimizer, model, itemsize = problem.fields()
    n = len(in_shape)
    seen: set[tuple] = set()
    cands: list[Candidate] = []
    options: list[tuple[tuple[tuple[int, ...], ...], tuple[int, ...] | None]] = []
    for grouping in groupings(n):
        options.append((grouping, None))
        if all(len(g) == 1 for g in grouping) and n <= MAX_ORDER_MODES:
            # The FLOP-optimal order is not always the fastest: applying a mode that
            # grows the activation last keeps the cheap small-K products small.
            options.extend((grouping, order) for order in permutations(range(n)))
        elif all(len(g) == 1 for g in grouping):
            options.append((grouping, tuple(range(n))))  # the reference's order
    for grouping, order in options:
        if order is not None:
            plan = tn.plan(optimizer, nominal_batch=batch, path=sequential_path(order))
        elif all(len(g) == 1 for g in grouping):
            plan = tn.plan(optimizer, nominal_batch=batch)
        else:
            path = _grouping_path(tn, grouping, batch)
            if path is None:
                continue
            plan = tn.plan(optimizer, nominal_batch=batch, path=path)
        key = tuple(plan.program.instructions)
        if key in seen:
            continue
        seen.add(key)
        est = estimate_us(plan.program, model, itemsize)
        cands.append(Candidate(grouping, plan, est, order=order))
    if rank == 1:
        plan = reference_layout_plan(tn, in_shape, out_shape, batch, optimizer)
        if tuple(plan.program.instructions) not in seen:
            est = estimate_us(plan.program, model, itemsize)
            singles = tuple((k,) for k in range(n))
            cands.append(Candidate(singles, plan, est, order=tuple(range(n)), layout="reference"))
    if rank > 1:
        cands += _chain_candidates(problem)
    cands.sort(key=lambda c: c.est_us)
    return cands


def _late_bias(cand: Candidate) -> Candidate:
    """``cand`` with its program adding the bias after its last GEMM (the machine's choice)."""
    program = dataclasses.replace(cand.plan.program, late_bias=True)
    return dataclasses.replace(cand, plan=dataclasses.replace(cand.plan, program=program))


def _timing_operands(
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    rank: int,
    batch: int,
    dtype: torch.dtype,
    device: str,
) -> list[torch.Tensor]:
    """Random input and factors to time candidates on (their own generator)."""
    gen = torch.Generator().manual_seed(0)
    operands = [torch.randn(batch, *in_shape, generator=gen, dtype=dtype).to(device)]
    for d, h in zip(in_shape, out_shape, strict=True):
        shape = (h, d) if rank == 1 else (rank, h, d)
        operands.append(torch.randn(*shape, generator=gen, dtype=dtype).to(device))
    return operands


def plan_ndlinear(
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    rank: int = 1,
    *,
    batch: int = 64,
    optimizer: str = "auto",
    machine: MachineModel | None = None,
    autotune: bool | str = False,
    top_k: int = 3,
    reps: int = 7,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    recompute: bool = True,
) -> PlanChoice:
    """Choose how to execute an NdLinear ``(batch, *in_shape) -> (batch, *out_shape)``.

    Args:
        in_shape: Input modes.
        out_shape: Output modes.
        rank: Kronecker rank.
        batch: Typical number of rows (leading dims flattened).
        optimizer: opt_einsum optimizer for the per-mode candidate.
        machine: Cost-model constants (default: measured once and cached).
        autotune: ``True``/``"eager"`` times the ``top_k`` best-estimated
            candidates, the reference schedule and layout and the dense block (when
            planned) and keeps the fastest; ``"inductor"`` times them compiled by
            inductor (for layers that run under ``torch.compile``);
            ``"eager-train"`` and ``"inductor-train"`` time forward and backward
            (for layers that will be trained). Decisions are cached on disk.
            ``False`` (``"off"``) uses the cost model.
        top_k: Candidates timed when autotuning.
        reps: Timed repetitions per candidate.
        dtype: Dtype used for timing and element sizes.
        device: Device used for timing.
        recompute: How the layer trains (``NdLinear(recompute=...)``), for the
            training modes: recomputing its intermediates in backward (and tiling
            large CPU batches), or saving them (never tiled while training).

    Returns:
        The choice, with every candidate's estimate.

    Raises:
        NdCompileError: On an unknown optimizer or autotune setting, or when an
            ``"inductor"`` mode cannot compile here.
    """
    check_optimizer(optimizer)
    mode = tuning.check_autotune(autotune)
    tn = TensorNetwork.from_ndlinear(in_shape, out_shape, rank)
    itemsize = torch.empty((), dtype=dtype).element_size()
    model = machine or machine_model(device)
    cands = _candidates(
        _Problem(tn, tuple(in_shape), tuple(out_shape), rank, batch, optimizer, model, itemsize)
    )
    if not model.bias_in_gemm:
        cands = [_late_bias(c) for c in cands]
    if mode == "off":
        return PlanChoice(cands[0], cands)
    # Whatever their estimates, autotune also times the reference NdLinear's own
    # schedule (modes applied one at a time, first to last, in ndcompile's layout and
    # in the reference's own) and the dense layer (all modes in one Kronecker block,
    # one GEMM; planned when small enough to build): the timed winner is never slower
    # than either on the machine that runs it, eagerly or compiled as timed.
    n = len(in_shape)
    cache_key = tuning.autotune_key(
        tuple(in_shape), tuple(out_shape), rank, batch, dtype, device, mode, recompute=recompute
    )
    label = _load_cache().get(cache_key)
    for cand in (*cands, *(dataclasses.replace(c, whole=True) for c in cands)):
        if cand.label == label:
            return PlanChoice(cand, cands, autotuned=True, cache_hit=True, mode=mode)
    reference = reference_schedule(tn, n, batch, optimizer).program.instructions
    chosen = [
        c
        for k, c in enumerate(cands)
        if k < top_k
        or is_dense_block(c, n)
        or c.layout == "reference"
        or (not c.chains and c.plan.program.instructions == reference)
    ]
    sizes = (tuple(in_shape), tuple(out_shape), rank, itemsize)
    # Timing takes gradients in the training modes, which inference mode forbids.
    with torch.inference_mode(False):
        operands = _timing_operands(in_shape, out_shape, rank, batch, dtype, device)
        timed = timed_candidates(chosen, operands, reps, mode, sizes, recompute=recompute)
    cands = timed + [c for c in cands if not any(c is t for t in chosen)]
    best = min(timed, key=lambda c: c.measured_us or math.inf)
    _store_cache(cache_key, best.label)
    return PlanChoice(best, cands, autotuned=True, mode=mode)
