"""Streaming input statistics of a Linear for layer-wise distillation.

:class:`LayerStats` keeps, per layer, either the Gram statistics ``XᵀX``, ``Xᵀ1``,
``n`` (float64, memory ``in_features²``) or a uniform reservoir sample of at most
``cap`` rows; the activation matrix itself is never held. :meth:`LayerStats.finalize`
gives ``(G, s, n)`` either way, summed over processes when ``torch.distributed`` is
initialised (a reservoir's Gram matrix is weighted by the rows each process saw per
row it kept, so the union stays an unbiased sample of all rows).

With the Gram statistics the squared output error of a fit ``(Ŵ, b̂)`` is
``tr(E G Eᵀ) + 2 δᵀ E s + n |δ|²`` (``E = W - Ŵ``, ``δ = b - b̂``):
:func:`squared_error`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ndcompile.compress.distill_data import all_reduce_, all_reduce_floats, world

__all__ = ["GramStats", "LayerStats", "squared_error"]

#: ``(G, s, n)``: Gram matrix, row sum and (effective) row count, float64.
GramStats = tuple[Tensor, Tensor, float]


def squared_error(e: Tensor, delta: Tensor, stats: GramStats) -> Tensor:
    """``sum_rows |E x + δ|²`` from ``(G, s, n)``."""
    gram, row_sum, n = stats
    return ((e @ gram) * e).sum() + 2 * (delta * (e @ row_sum)).sum() + n * (delta * delta).sum()


class LayerStats:
    """Streaming input statistics of one Linear: Gram matrix or reservoir sample.

    Args:
        in_features: Input features.
        kind: ``"gram"`` (``XᵀX``, ``Xᵀ1``, ``n`` in float64) or ``"reservoir"``
            (a uniform sample of at most ``cap`` rows, Vitter's algorithm R).
        cap: Reservoir size.
        seed: Reservoir sampling seed.

    Attributes:
        rows: Rows seen by this process.
        rows_total: Rows seen by all processes (set by :meth:`finalize`).
        rows_kept: Rows the statistics are made of, all processes (the reservoirs'
            rows for a reservoir; set by :meth:`finalize`).
    """

    def __init__(self, in_features: int, kind: str, cap: int, seed: int = 0) -> None:
        self.in_features, self.kind, self.cap = in_features, kind, int(cap)
        self.rows = 0
        self.rows_total = self.rows_kept = 0
        self.gram: Tensor | None = None
        self.row_sum: Tensor | None = None
        self.sample: Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed + 7919 * world()[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the largest statistic held."""
        if self.kind == "gram":
            return (self.in_features, self.in_features)
        return (self.cap, self.in_features)

    def add(self, x: Tensor) -> None:
        """Add the rows of ``x (..., in_features)``."""
        x = x.detach().reshape(-1, self.in_features)
        if self.kind == "gram":
            # MPS has no float64: accumulate on the CPU there
            x64 = x.to("cpu" if x.device.type == "mps" else x.device, torch.float64)
            if self.gram is None:
                self.gram = x64.new_zeros(self.in_features, self.in_features)
                self.row_sum = x64.new_zeros(self.in_features)
            self.gram.addmm_(x64.T, x64)
            assert self.row_sum is not None
            self.row_sum += x64.sum(0)
            self.rows += x.shape[0]
            return
        if self.sample is None:
            self.sample = x.new_empty(self.cap, self.in_features)
        start, b = self.rows, x.shape[0]
        fill = max(0, min(self.cap - start, b))
        self.sample[start : start + fill] = x[:fill]
        if fill < b:
            t = torch.arange(start + fill, start + b, dtype=torch.float64)
            slot = (torch.rand(t.shape, generator=self._gen, dtype=torch.float64) * (t + 1)).long()
            hit = torch.nonzero(slot < self.cap).flatten().flip(0)  # last write wins
            slots, inverse = torch.unique(slot[hit], return_inverse=True)
            first = torch.full(slots.shape, hit.numel(), dtype=torch.long)
            first = first.scatter_reduce(0, inverse, torch.arange(hit.numel()), "amin")
            rows = hit[first] + fill
            self.sample[slots.to(self.sample.device)] = x[rows.to(x.device)]
        self.rows += b

    def _local(self, device: torch.device) -> tuple[Tensor, Tensor, int]:
        """This process's ``(G, s, kept rows)`` (zeros if it saw no rows)."""
        zeros = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=device)
        if self.rows == 0:
            return zeros, zeros[0].clone(), 0
        if self.kind == "gram":
            assert self.gram is not None and self.row_sum is not None
            return self.gram, self.row_sum, self.rows
        assert self.sample is not None
        rows = self.sample[: min(self.rows, self.cap)]
        gram = zeros.to(rows.device)
        for chunk in rows.split(1024):
            c64 = chunk.to(torch.float64)
            gram.addmm_(c64.T, c64)
        return gram, rows.to(torch.float64).sum(0), rows.shape[0]

    def finalize(self, device: torch.device | None = None) -> GramStats | None:
        """``(G, s, n)`` in float64 over all processes, or None if no process saw rows.

        Every process must call it (collectively) when ``torch.distributed`` is
        initialised. A reservoir gives the Gram matrix of its rows, weighted when
        processes saw different numbers of rows per row kept; ``n`` is then the
        number of rows kept.
        """
        dev = (
            device
            if device is not None
            else (self.gram.device if self.gram is not None else torch.device("cpu"))
        )
        gram, row_sum, kept = self._local(dev)
        seen_all, kept_all = all_reduce_floats([float(self.rows), float(kept)])
        self.rows_total, self.rows_kept = int(seen_all), int(kept_all)
        if seen_all == 0:
            return None
        if self.kind == "reservoir" and world()[1] > 1:
            # each kept row stands for rows/kept rows of its process; total weight = kept_all
            weight = (self.rows / kept) * (kept_all / seen_all) if kept else 0.0
            gram, row_sum = gram * weight, row_sum * weight
        if world()[1] > 1:
            gram, row_sum = all_reduce_(gram.clone()), all_reduce_(row_sum.clone())
        n = kept_all if self.kind == "reservoir" else seen_all
        return gram, row_sum, n
