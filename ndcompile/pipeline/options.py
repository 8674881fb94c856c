"""``ConvertOptions``: every option of ``convert``, validated once.

``convert``, the command line and ``save``/``load`` all build one frozen
:class:`ConvertOptions`; a conversion of part of a model passes
``dataclasses.replace(options, ...)`` on, so no option is ever dropped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from ndcompile.errors import NdCompileError
from ndcompile.ir.network import check_optimizer
from ndcompile.planner.autotune import autotune_setting

__all__ = ["MODES", "OUTPUTS", "ConvertOptions", "Rank"]

#: Conversion modes (see :mod:`ndcompile.pipeline.modes`).
MODES = ("fresh", "exact", "factorize", "adapter")
#: What ``convert`` returns: ``"module"`` (the user's model with layers swapped),
#: ``"graph"`` (an ``fx.GraphModule``) or ``"auto"`` (module, except ``exact`` mode on a
#: model torch.fx can trace, whose region fusion needs the graph).
OUTPUTS = ("auto", "module", "graph")

Rank = int | Mapping[str, int] | None


def _patterns(value: str | Sequence[str] | None, name: str) -> tuple[str, ...] | None:
    """A glob pattern or a sequence of them as a tuple (a bare string is one pattern)."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError as exc:
        raise NdCompileError(
            f"{name}= takes a glob pattern or a list of them, got {value!r}"
        ) from exc
    bad = [v for v in items if not isinstance(v, str)]
    if bad:
        raise NdCompileError(f"{name}= patterns must be strings, got {bad!r}")
    return items


def _check_rank(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise NdCompileError(
            f"{what} must be a positive integer, got {value!r} ({type(value).__name__})",
            hint="e.g. rank=4, or rank={'fc1': 4, 'fc2': 2}",
        )
    if value < 1:
        raise NdCompileError(f"{what} must be >= 1, got {value}")
    return value


def _check_fraction(value: float | None, name: str, low_open: bool = True) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise NdCompileError(f"{name} must be a finite number, got {value!r}")
    if not (0 < value <= 1 if low_open else value >= 0):
        raise NdCompileError(f"{name} must be in (0, 1], got {value}")
    return float(value)


@dataclass(frozen=True)
class ConvertOptions:
    """The options of :func:`ndcompile.convert` (see its docstring for each one).

    Construction validates everything that can be checked without the model: an
    unknown mode or optimizer, ranks that are not positive integers, options that
    the chosen mode would ignore (``tol``/``budget`` outside ``factorize``), a
    non-finite ``alpha``. Names in ``rank``/``shapes`` mappings are checked against
    the model's layers once they are known.
    """

    mode: str = "fresh"
    rank: Rank = None
    tol: float | None = None
    budget: float | None = None
    max_rank: int = 64
    shapes: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    calibration: Iterable[Any] | None = field(default=None, compare=False)
    n_modes: int = 2
    min_features: int = 16
    optimizer: str = "auto"
    autotune: bool | str = False
    skip_larger: bool = True
    alpha: float = 1.0
    zero_init: bool = True
    verify: bool = True
    leaf_modules: tuple[type[nn.Module], ...] = ()
    fallback: bool = True
    output: str = "auto"
    progress: bool = False
    distributed: bool = False
    weights: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise NdCompileError(f"unknown mode {self.mode!r}; valid modes are: {', '.join(MODES)}")
        if self.output not in OUTPUTS:
            raise NdCompileError(
                f"unknown output {self.output!r}; valid outputs are: {', '.join(OUTPUTS)}",
                hint="'module' returns your model's class with layers replaced; 'graph' an "
                "fx.GraphModule (needs a model torch.fx can trace); 'auto' picks",
            )
        check_optimizer(self.optimizer)
        set_ = object.__setattr__
        set_(self, "autotune", autotune_setting(self.autotune))
        set_(self, "include", _patterns(self.include, "include"))
        set_(self, "exclude", _patterns(self.exclude, "exclude"))
        set_(self, "leaf_modules", tuple(self.leaf_modules))
        if isinstance(self.rank, Mapping):
            set_(
                self, "rank", {str(k): _check_rank(v, f"rank[{k!r}]") for k, v in self.rank.items()}
            )
        elif self.rank is not None:
            _check_rank(self.rank, "rank")
        _check_rank(self.max_rank, "max_rank")
        _check_rank(self.n_modes, "n_modes")
        if isinstance(self.min_features, bool) or not isinstance(self.min_features, int):
            raise NdCompileError(f"min_features must be an integer, got {self.min_features!r}")
        set_(self, "tol", _check_fraction(self.tol, "tol", low_open=False))
        set_(self, "budget", _check_fraction(self.budget, "budget"))
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            raise NdCompileError(f"alpha must be a number, got {self.alpha!r}")
        if not math.isfinite(self.alpha):
            raise NdCompileError(f"alpha must be finite, got {self.alpha}")
        self._check_mode_options()
        self._check_weights()

    def _check_weights(self) -> None:
        if self.weights is None:
            return
        object.__setattr__(self, "weights", os.fspath(self.weights))
        if self.output == "graph":
            raise NdCompileError(
                "weights= (a model on the meta device, weights on disk) needs output='module'",
                hint="drop output='graph'",
            )
        if self.calibration is not None:
            raise NdCompileError(
                "calibration= needs the original's activations, which a model on the meta "
                "device cannot compute",
                hint="load the weights into the model and convert it with calibration=, "
                "or drop calibration=",
            )

    def _check_mode_options(self) -> None:
        ignored = {
            "tol": self.tol is not None,
            "budget": self.budget is not None,
            "calibration": self.calibration is not None,
        }
        if self.mode != "factorize":
            used = [k for k, given in ignored.items() if given]
            if used:
                raise NdCompileError(
                    f"{', '.join(f'{k}=' for k in used)} only apply to mode='factorize' "
                    f"(mode is {self.mode!r})",
                    hint="drop them, or use mode='factorize'",
                )
        if self.mode == "exact" and self.rank is not None:
            raise NdCompileError(
                "rank= does not apply to mode='exact' (it keeps the layers it finds)"
            )
        if self.mode == "factorize":
            given = [k for k in ("rank", "tol", "budget") if getattr(self, k) is not None]
            if not given:
                raise NdCompileError(
                    "mode='factorize' needs rank=R, tol=t or budget=b",
                    hint="e.g. rank=4, tol=0.1 or budget=0.2",
                )
            if len(given) > 1:
                raise NdCompileError(f"give only one of rank=, tol=, budget= (got {given})")

    def rank_of(self, name: str, default: int = 1) -> int | None:
        """The rank for layer ``name``: the global rank, or the mapping's entry (default 1)."""
        if isinstance(self.rank, Mapping):
            return int(self.rank.get(name, default))
        return self.rank

    def check_layer_names(self, names: Iterable[str]) -> None:
        """Raise if a ``rank`` mapping names a layer that is not among ``names``."""
        if not isinstance(self.rank, Mapping):
            return
        valid = set(names)
        unknown = sorted(set(self.rank) - valid)
        if unknown:
            raise NdCompileError(
                f"rank= names layers that are not Linear-like layers of the model: {unknown}",
                hint=f"valid names: {', '.join(sorted(valid)) or '(none)'}",
            )

    def to_json(self) -> dict[str, Any]:
        """The options that describe the converted architecture, as JSON-ready values."""
        out = {}
        for f in fields(self):
            if f.name in ("calibration", "leaf_modules", "progress", "distributed", "weights"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        if self.shapes is not None:
            out["shapes"] = {k: [list(a), list(b)] for k, (a, b) in self.shapes.items()}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ConvertOptions:
        """Rebuild options saved by :meth:`to_json` (unknown keys are an error)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise NdCompileError(f"saved options have unknown keys {unknown}")
        kwargs = dict(data)
        if kwargs.get("shapes") is not None:
            kwargs["shapes"] = {k: (tuple(a), tuple(b)) for k, (a, b) in kwargs["shapes"].items()}
        return cls(**kwargs)
