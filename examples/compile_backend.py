"""Time a model with reference NdLinear layers: eager vs inductor vs the ndcompile backend.

The reference ``ndlinear.NdLinear`` transposes and copies the activation twice per
mode. ``torch.compile(model, backend="ndcompile")`` replaces each such layer by one
planned contraction before inductor compiles the graph. Run::

    python examples/compile_backend.py --batch 64 --iters 50 --in-shape 16,16,16 --hidden 16,16,16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ndlinear
import torch
from torch import nn

from ndcompile.backends.dynamo import register_backend

__all__ = ["NdMLP", "main", "median_ms"]


class NdMLP(nn.Module):
    """Two reference NdLinear layers with a GELU between them, then a classifier."""

    def __init__(self, in_shape: Sequence[int], hidden: Sequence[int], classes: int = 10) -> None:
        super().__init__()
        self.nd1 = ndlinear.NdLinear(tuple(in_shape), tuple(hidden))
        self.nd2 = ndlinear.NdLinear(tuple(hidden), tuple(hidden))
        self.act = nn.GELU()
        n_hidden = 1
        for h in hidden:
            n_hidden *= h
        self.head = nn.Linear(n_hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.nd2(self.act(self.nd1(x)))
        return self.head(y.flatten(1))


def median_ms(
    fns: Mapping[str, Callable[[], Any]], iters: int, warmup: int, rounds: int = 5
) -> dict[str, float]:
    """Median wall time of each ``fn()`` in milliseconds.

    Every function is called ``warmup`` times untimed; then, in each of ``rounds``
    rounds, every function runs one untimed call and a block of timed calls, so that
    drifting load from other processes hits all functions alike while calls of one
    function still run back to back (``iters`` timed calls per function in total).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    block = max(1, iters // rounds)
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            for _ in range(block):
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main(
    batch: int = 64,
    iters: int = 20,
    warmup: int = 3,
    in_shape: Sequence[int] = (32, 32, 3),
    hidden: Sequence[int] = (16, 16, 3),
    backends: Sequence[str] = ("eager", "inductor", "ndcompile"),
    options: Mapping[str, Any] | None = None,
    verbose: bool = True,
) -> dict[str, dict[str, float]]:
    """Compile one model with each backend, check it against eager and time its forward.

    Args:
        batch: Batch size.
        iters: Timed calls per backend, spread over 5 rounds (medians reported).
        warmup: Untimed calls per backend first (the first one compiles).
        in_shape: Input modes of the first NdLinear.
        hidden: Output modes of both NdLinear layers.
        backends: Which of ``"eager"``, ``"inductor"``, ``"ndcompile"`` to run.
        options: Options of the ndcompile backend.
        verbose: Print the table.

    Returns:
        Per backend: ``median_ms``, ``speedup`` over eager (if run) and ``max_abs_diff``.
    """
    register_backend()
    torch.manual_seed(0)
    model = NdMLP(in_shape, hidden).eval()
    x = torch.randn(batch, *in_shape)
    torch._dynamo.reset()
    runners: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for name in backends:
        copy = NdMLP(in_shape, hidden).eval()
        copy.load_state_dict(model.state_dict())
        if name == "eager":
            runners[name] = copy
        elif name == "ndcompile":
            runners[name] = torch.compile(copy, backend="ndcompile", options=dict(options or {}))
        else:
            runners[name] = torch.compile(copy, backend=name)
    with torch.no_grad():
        reference = model(x)
        diffs = {name: (run(x) - reference).abs().max().item() for name, run in runners.items()}
        medians = median_ms(
            {name: (lambda run=run: run(x)) for name, run in runners.items()}, iters, warmup
        )
    base = medians.get("eager")
    results = {
        name: {
            "median_ms": medians[name],
            "speedup": base / medians[name] if base else float("nan"),
            "max_abs_diff": diffs[name],
        }
        for name in runners
    }
    if verbose:
        print(
            f"NdMLP {tuple(in_shape)} -> {tuple(hidden)}, batch {batch}, "
            f"median of {iters} calls in 5 rounds, {torch.get_num_threads()} threads"
        )
        print(f"{'backend':<10} {'ms':>9} {'speedup':>8} {'max |diff|':>11}")
        for name, entry in results.items():
            print(
                f"{name:<10} {entry['median_ms']:>9.3f} {entry['speedup']:>7.2f}x "
                f"{entry['max_abs_diff']:>11.2e}"
            )
    return results


def _modes(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--in-shape", type=_modes, default=(32, 32, 3), help="e.g. 32,32,3")
    parser.add_argument("--hidden", type=_modes, default=(16, 16, 3), help="e.g. 16,16,3")
    args = parser.parse_args()
    main(
        batch=args.batch,
        iters=args.iters,
        warmup=args.warmup,
        in_shape=args.in_shape,
        hidden=args.hidden,
    )
