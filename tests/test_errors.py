"""Tests of ndcompile.errors: the error type's message and first_line."""

from __future__ import annotations

import pytest

from ndcompile.errors import NdCompileError, first_line


@pytest.mark.parametrize(
    ("message", "expected"),
    [("boom", "boom"), ("  first\nsecond\n", "first"), ("", ""), ("  \n ", "")],
)
def test_first_line(message: str, expected: str) -> None:
    assert first_line(RuntimeError(message)) == expected


def test_error_names_layer_and_hint() -> None:
    err = NdCompileError("bad shape", layer="fc1", hint="reshape it")
    assert str(err) == "[fc1] bad shape\n  hint: reshape it"
    assert err.layer == "fc1" and err.hint == "reshape it"
