"""Fitted forms at a parameter budget and the chosen hybrid, with a printable report.

:class:`FormCandidate` is one form measured by
:func:`~ndcompile.compress.hybrid.choose_form` (a Kronecker sum, a plain low-rank
factor or a hybrid); :class:`HybridChoice` holds the chosen form's factors and every
candidate, and prints them ranked by error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ndcompile.compress.kronecker_dense import kron_dense

__all__ = ["FormCandidate", "HybridChoice"]


@dataclass
class FormCandidate:
    """One fitted form.

    Attributes:
        form: ``"kronecker"``, ``"lowrank"`` or ``"hybrid"``.
        rank: Kronecker rank ``R`` (0 for the pure low-rank form).
        lowrank: Low-rank ``k``.
        params: Weight parameters of the form.
        error: Error in the choice metric (output error with a Gram matrix, else weight).
        weight_error: ``|W - W_hat| / |W|``.
        buildable: Whether an NdLinear holds exactly this form.
    """

    form: str
    rank: int
    lowrank: int
    params: int
    error: float
    weight_error: float
    buildable: bool = True

    @property
    def label(self) -> str:
        """``kronecker R=4``, ``lowrank k=10``, ``hybrid R=2+k=6``."""
        if self.form == "kronecker":
            return f"kronecker R={self.rank}"
        if self.form == "lowrank":
            return f"lowrank k={self.lowrank}"
        return f"hybrid R={self.rank}+k={self.lowrank}"


@dataclass
class HybridChoice:
    """The form chosen by :func:`choose_form`, with every candidate measured.

    Attributes:
        form: The chosen form (``"kronecker"`` or ``"hybrid"``).
        in_shape: Input modes.
        out_shape: Output modes.
        factors: Kronecker factors, factor i of shape ``(R, h_i, d_i)``.
        lowrank_u: ``U (prod h, k)`` or None when ``k == 0``.
        lowrank_v: ``V (k, prod d)`` or None when ``k == 0``.
        error: Error of the chosen form in the choice metric.
        weight_error: Its weight error.
        metric: ``"output"`` (a Gram matrix was given) or ``"weight"``.
        params: Weight parameters of the chosen form.
        budget_params: The budget in parameters.
        dense_params: Parameters of the dense weight.
        candidates: Every fitted form, the chosen one included.
    """

    form: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    factors: list[Tensor]
    lowrank_u: Tensor | None
    lowrank_v: Tensor | None
    error: float
    weight_error: float
    metric: str
    params: int
    budget_params: int
    dense_params: int
    candidates: list[FormCandidate] = field(default_factory=list)

    @property
    def rank(self) -> int:
        """Kronecker rank R."""
        return int(self.factors[0].shape[0])

    @property
    def lowrank(self) -> int:
        """Low-rank k (0 for a pure Kronecker sum)."""
        return 0 if self.lowrank_u is None else int(self.lowrank_u.shape[1])

    @property
    def errors(self) -> dict[str, float]:
        """Error of every candidate by label."""
        return {c.label: c.error for c in self.candidates}

    def candidate(self, form: str) -> FormCandidate | None:
        """The best candidate of ``form`` (None if it did not fit the budget)."""
        found = [c for c in self.candidates if c.form == form]
        return min(found, key=lambda c: c.error) if found else None

    def dense_weight(self) -> Tensor:
        """The chosen approximation as a dense ``(prod h, prod d)`` weight."""
        w = kron_dense(self.factors)
        if self.lowrank_u is not None and self.lowrank_v is not None:
            w = w + self.lowrank_u @ self.lowrank_v
        return w

    def __str__(self) -> str:
        lines = [
            f"HybridChoice({self.form} R={self.rank} k={self.lowrank}, {self.metric} error "
            f"{self.error:.4f}, params {self.params:,} / budget {self.budget_params:,} / "
            f"dense {self.dense_params:,})"
        ]
        width = max(len(c.label) for c in self.candidates)
        for c in sorted(self.candidates, key=lambda c: c.error):
            mark = (
                "*" if (c.form, c.rank, c.lowrank) == (self.form, self.rank, self.lowrank) else " "
            )
            note = "" if c.buildable else "  (reference)"
            lines.append(
                f" {mark} {c.label.ljust(width)}  params {c.params:>9,}  error {c.error:.4f}"
                f"  weight error {c.weight_error:.4f}{note}"
            )
        return "\n".join(lines)
