"""The CLI's malloc tuning: applied on Linux/glibc, skipped when the user set MALLOC_* themselves."""

from __future__ import annotations

import os
import sys

import pytest

from uclr_cli.malloc import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_applied_on_linux(monkeypatch):
    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    assert keep_freed_memory() is True


def test_user_malloc_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert keep_freed_memory() is False
