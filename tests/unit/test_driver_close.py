"""Driver.close() against the futures it cancels: no write to its wake-up pipe after that pipe is closed
(the fd number may belong to another file by then)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import tasks
from distfork import serialize
from distfork.config import Config
from distfork.driver import Driver


def test_close_cancels_its_futures_before_it_closes_its_wake_up_pipe(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    driver = Driver(f"ipc://{tmp_path}/nobody-listens", Config())
    futures = [driver.submit(serialize.dumps_call(tasks.add, (i, 1), {}, 1 << 16)) for i in range(20)]
    pipe = {driver._wakeup.fd, driver._wakeup._w}
    closed: set[int] = set()
    late: list[int] = []
    real_close, real_write = os.close, os.write

    def close(fd: int) -> None:
        if fd in pipe:
            closed.add(fd)
        real_close(fd)

    def write(fd: int, data: Any) -> int:
        if fd in closed:
            late.append(fd)
        return real_write(fd, data)

    monkeypatch.setattr(os, "close", close)
    monkeypatch.setattr(os, "write", write)
    driver.close()
    assert closed == pipe
    assert all(f.cancelled() for f in futures)
    assert late == [], "a cancel wrote to the closed wake-up pipe"
