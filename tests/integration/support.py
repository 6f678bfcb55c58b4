"""Helpers for the integration tests: the embedded cluster's facts, driver scripts, process checks."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil

import distfork
from conftest import wait_until
from distfork.status import query_status


def embedded_cluster() -> Any:
    """The LocalCluster of this process's runtime (started by ``init`` or the first ``fork``)."""
    rt = distfork.api._runtime
    assert rt is not None and rt.cluster is not None, "no embedded cluster is running"
    return rt.cluster


def wait_for_workers(address: str, n: int, timeout_s: float = 20.0) -> dict[str, Any]:
    """Poll the broker's status until ``n`` workers are registered; return that status."""
    return wait_until(  # type: ignore[no-any-return]
        lambda: s if len((s := query_status(address))["workers"]) >= n else None,
        timeout_s, what=f"{n} workers to register at {address}",
    )


def embedded_ready(n: int = 2) -> list[int]:
    """Wait until every worker of the embedded cluster is registered; return the worker pids."""
    cluster = embedded_cluster()
    status = wait_for_workers(cluster.address, n)
    return sorted(w["pid"] for w in status["workers"])


def started_pid(path: Path, other_than: int | None = None, timeout_s: float = 20.0) -> int:
    """The pid an ``announce_and_wait`` task wrote to ``path`` (a new one if ``other_than``)."""
    def read() -> int | None:
        try:
            pid = int(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid != other_than else None
    return wait_until(read, timeout_s, what=f"a task to start and write its pid to {path.name}")  # type: ignore[no-any-return]


def is_gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def all_gone(procs: Iterable[psutil.Process]) -> bool:
    return all(is_gone(p) for p in procs)


def write_script(tmp_path: Path, body: str, name: str = "driver.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def start_script(path: Path, *args: str, env: dict[str, str], **kwargs: Any) -> subprocess.Popen[str]:
    """Run ``python path *args`` with its stdin, stdout and stderr as pipes (text)."""
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    return subprocess.Popen([sys.executable, str(path), *args], env=env, text=True, **{**pipes, **kwargs})


class LineReader:
    """Read a process's stdout lines on a thread, so a test can wait for one with a deadline."""

    def __init__(self, stream: Any) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next(self, timeout_s: float = 30.0) -> str:
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no line of output within {timeout_s} s") from None
        if line is None:
            raise AssertionError("the process closed its output before printing the expected line")
        return line

    def next_json(self, timeout_s: float = 30.0) -> Any:
        return json.loads(self.next(timeout_s))
