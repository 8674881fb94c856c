"""The single exception type ndcompile raises for bad input or unsupported models."""

from __future__ import annotations

__all__ = ["NdCompileError", "UntraceableError", "first_line"]


class NdCompileError(ValueError):
    """Raised when ndcompile cannot do what was asked, with a message saying why.

    Every message names the layer (or option) involved, the shapes seen, and
    what the user can do about it.

    Args:
        message: What went wrong.
        layer: Qualified name of the layer or module concerned, if any.
        hint: What to do about it.
    """

    def __init__(self, message: str, *, layer: str | None = None, hint: str | None = None) -> None:
        self.layer = layer
        self.hint = hint
        text = f"[{layer}] {message}" if layer else message
        if hint:
            text = f"{text}\n  hint: {hint}"
        super().__init__(text)


class UntraceableError(NdCompileError):
    """The model (or a submodule) cannot be traced by torch.fx."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, stripped ("" for an empty message)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
