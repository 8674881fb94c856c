"""Optional progress bars: tqdm when it is installed and wanted, silent otherwise.

``progress`` wraps an iterable and yields its items unchanged, so a loop reads the
same with or without a bar::

    for site in progress(sites, desc="factorize"):
        ...
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress", "tqdm_available"]

T = TypeVar("T")


def tqdm_available() -> bool:
    """Whether ``tqdm`` can be imported."""
    return importlib.util.find_spec("tqdm") is not None


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str | None = None,
    enabled: bool = True,
) -> Iterator[T]:
    """Yield the items of ``iterable``, with a tqdm bar on stderr when possible.

    Args:
        iterable: The items.
        total: Number of items, for iterables without ``len`` (taken from ``len``
            when available).
        desc: Label shown before the bar.
        enabled: False for no bar at all (the items are still yielded).

    Returns:
        An iterator over the same items, in the same order.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if not enabled or not tqdm_available():
        yield from iterable
        return
    from tqdm.auto import tqdm

    with tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False) as bar:
        yield from bar
