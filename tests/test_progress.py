"""Tests of ndcompile.progress: items pass through unchanged, with or without tqdm."""

from __future__ import annotations

import pytest

from ndcompile import progress as progress_module
from ndcompile.progress import progress, tqdm_available


@pytest.mark.parametrize("enabled", [True, False])
def test_items_pass_through_in_order(enabled: bool, capsys: pytest.CaptureFixture) -> None:
    items = [3, 1, 2]
    assert list(progress(items, desc="fit", enabled=enabled)) == items
    assert list(progress(iter(items), total=3, enabled=enabled)) == items
    assert list(progress((x * x for x in range(4)), enabled=enabled)) == [0, 1, 4, 9]
    err = capsys.readouterr().err
    if not enabled:
        assert err == ""


def test_bar_is_drawn_when_tqdm_is_installed(capsys: pytest.CaptureFixture) -> None:
    if not tqdm_available():
        pytest.skip("tqdm not installed")
    assert list(progress(range(5), desc="layers")) == list(range(5))
    assert "layers" in capsys.readouterr().err


def test_silent_without_tqdm(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(progress_module, "tqdm_available", lambda: False)
    assert list(progress(range(3), desc="layers")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
