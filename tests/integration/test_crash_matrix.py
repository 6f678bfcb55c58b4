"""The crash matrix: each way a task can fail × each place it can fail, as one table.

Fault kinds: an exception, ``os._exit(3)``, SIGKILL of the worker's own pid,
a segfault (``ctypes.string_at(0)``). Places: while the task runs, while the
worker unpickles its arguments (an argument whose rebuild does the fault),
while the worker pickles its result (a result whose ``__reduce__`` does it).

An exception comes back as itself (as ``SerializationError`` from the
pickling phases) and is never retried. A fault that kills the worker process
is retried on another worker up to ``max_retries`` times, then the future
raises ``WorkerLostError`` naming the exit code or signal. Either way, the
tasks forked alongside succeed and the next fork runs on a replaced worker.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

import distfork
import tasks
from conftest import wait_until
from distfork.status import query_status

from .support import embedded_cluster, embedded_ready

pytestmark = pytest.mark.timeout(60)

T = 30.0

KINDS = ["raise", "exit", "sigkill", "segfault"]
PHASES = ["running", "unpickling_args", "pickling_result"]
# What the WorkerLostError says about how the process ended.
EXIT_TEXT = {
    "exit": f"exited with code {tasks.FAULT_EXIT_CODE}",
    "sigkill": "killed by signal SIGKILL (9)",
    "segfault": "killed by signal SIGSEGV (11)",
}


@pytest.fixture
def cluster() -> Iterator[list[int]]:
    """A fresh embedded cluster of two single-slot workers (this test kills some); yields their pids."""
    distfork.init(workers=2, heartbeat_s=0.2)
    try:
        yield embedded_ready(2)
    finally:
        distfork.shutdown()


def fork_fault(kind: str, phase: str) -> distfork.Future[Any]:
    opts = distfork.options(max_retries=1)
    if phase == "running":
        return opts.fork(tasks.fault, kind)
    if phase == "unpickling_args":
        return opts.fork(tasks.take_and_return, tasks.FaultOnUnpickle(kind))
    assert phase == "pickling_result"
    return opts.fork(tasks.make_fault_on_pickle, kind)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("kind", KINDS)
def test_crash_matrix(kind: str, phase: str, cluster: list[int]) -> None:
    address = embedded_cluster().address
    # Warm the workers up: a worker known to run short tasks is handed many at once, so
    # the faulting task shares a worker with neighbours whose results it holds back.
    assert distfork.wait_all([distfork.fork(tasks.add, i, 0) for i in range(300)], timeout=T) == list(range(300))
    strict = distfork.options(max_retries=0)  # a neighbour blamed for the crash would fail at once
    before = [strict.fork(tasks.add, i, 1) for i in range(40)]
    fut = fork_fault(kind, phase)
    after = [strict.fork(tasks.add, i, 1) for i in range(40, 80)]

    if kind == "raise":
        expected: type[BaseException] = tasks.CustomError if phase == "running" else distfork.SerializationError
        with pytest.raises(expected) as excinfo:
            distfork.wait(fut, timeout=T)
        assert type(excinfo.value) is expected
        assert "fault raise" in str(excinfo.value)
    else:
        with pytest.raises(distfork.WorkerLostError) as excinfo:
            distfork.wait(fut, timeout=T)
        text = str(excinfo.value)
        assert EXIT_TEXT[kind] in text, text
        assert f"host {socket.gethostname()}" in text and "pid " in text
        assert "lost 2 times, more than max_retries=1" in text, text

    # The tasks forked alongside were neither failed nor blamed.
    assert distfork.wait_all(before + after, timeout=T) == [i + 1 for i in range(80)]
    # The cluster replaced every worker that died, and serves the next fork.
    sup = embedded_cluster()
    if kind != "raise":
        wait_until(lambda: sup.restarts >= 2, 10, what="the supervisor to restart the two workers that died")
    assert distfork.wait(distfork.fork(tasks.add, 40, 2), timeout=T) == 42
    status = wait_until(lambda: s if len((s := query_status(address))["workers"]) == 2 else None, 20,
                        what="two registered workers")
    pids = {w["pid"] for w in status["workers"]}
    counters = status["counters"]
    assert counters.get("tasks_lost", 0) == (0 if kind == "raise" else 1)  # the faulting task, nobody else
    if kind == "raise":
        assert pids == set(cluster) and sup.restarts == 0
        assert counters.get("tasks_retried", 0) == 0  # an exception is never retried
    else:
        assert len(pids & set(cluster)) <= 1  # the first worker that ran it was replaced
