"""Fixtures of the integration tests that start CLI processes (the security tests)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import distfork

from .secsupport import Procs


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """The processes a test starts (their logs under tmp_path), all stopped after it."""
    logs = tmp_path / "logs"
    logs.mkdir()
    started = Procs(logs)
    try:
        yield started
    finally:
        distfork.shutdown()  # our driver leaves before its broker does
        started.stop_all()
