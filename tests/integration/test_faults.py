"""The failure table of DESIGN.md, row by row, on real processes.

Broker restart in the middle of 1,000 forks; no broker reachable; a driver
SIGKILLed with work queued; cancellation of queued and running tasks;
``timeout_s``; ``wait(fut, timeout)``; a worker SIGKILLed mid-task (embedded
cluster, and the nanny of ``distfork worker``); the bounded in-flight window.
Faults are injected only through public means: signals, the CLI, ``cancel``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import distfork
import tasks
from conftest import CliCluster, free_port, wait_until
from distfork.status import query_status
from distfork.worker import ABORT_EXIT_CODE

from .support import (
    LineReader,
    all_gone,
    embedded_cluster,
    embedded_ready,
    is_gone,
    start_script,
    started_pid,
    write_script,
)

pytestmark = pytest.mark.timeout(120)

T = 30.0


@pytest.fixture
def fresh_cluster() -> Iterator[list[int]]:
    """An embedded cluster of two single-slot workers for a test that ends some of them; yields their pids."""
    distfork.init(workers=2, heartbeat_s=0.2)
    try:
        yield embedded_ready(2)
    finally:
        distfork.shutdown()


# -- broker restart --------------------------------------------------------------

N_RESTART = 1000


def test_broker_sigkilled_and_restarted_mid_run_every_future_completes_once(cli_cluster: CliCluster) -> None:
    distfork.init(cli_cluster.address, heartbeat_s=0.2)
    completions: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()

    def record(i: int, _: Any) -> None:
        with lock:
            completions[i] += 1

    futs = []
    for i in range(N_RESTART):
        fut = distfork.fork(tasks.slow_identity, i, 0.005)
        fut.add_done_callback(functools.partial(record, i))
        futs.append(fut)
    wait_until(lambda: sum(f.done() for f in futs) >= 50, 60, what="50 tasks to finish")
    cli_cluster.kill_broker()
    done_at_kill = sum(f.done() for f in futs)
    assert 50 <= done_at_kill < N_RESTART, "the broker must die mid-run"
    cli_cluster.restart_broker()

    assert distfork.wait_all(futs, timeout=90) == list(range(N_RESTART))
    wait_until(lambda: len(completions) == N_RESTART, 10, what="every done callback")
    assert sum(completions.values()) == N_RESTART  # none completed twice
    assert distfork.api._runtime.driver.unfinished == 0  # type: ignore[union-attr]
    status = query_status(cli_cluster.address)
    assert len(status["workers"]) == 2  # both workers said hello to the new broker
    assert status["drivers"][0]["unfinished"] == 0 and status["queued"] == 0


def test_without_a_broker_fork_returns_a_future_and_wait_times_out(cli_cluster: CliCluster) -> None:
    distfork.init(cli_cluster.address, heartbeat_s=0.2)
    assert distfork.wait(distfork.fork(tasks.add, 1, 2), timeout=T) == 3
    cli_cluster.kill_broker()

    fut = distfork.fork(tasks.add, 20, 22)  # queued locally, not lost
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        distfork.wait(fut, timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert not fut.done()

    cli_cluster.restart_broker()
    assert distfork.wait(fut, timeout=T) == 42


def test_init_where_nothing_listens_raises_broker_unavailable_naming_the_address() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(distfork.BrokerUnavailableError, match=re.escape(address)):
        distfork.init(address, connect_timeout_s=1)
    assert time.monotonic() - t0 < 10
    assert distfork.api._runtime is None


# -- driver loss -------------------------------------------------------------------

DRIVER_THEN_KILLED = """
    import sys
    import distfork, tasks

    distfork.init(sys.argv[1])
    futs = [distfork.fork(tasks.timed_sleep, 1.0) for _ in range(int(sys.argv[2]))]
    print("forked", flush=True)
    sys.stdin.read()  # until the test kills us
"""


def test_driver_sigkilled_its_queued_tasks_are_dropped(cli_cluster: CliCluster, tmp_path: Path) -> None:
    n = 200
    driver = start_script(write_script(tmp_path, DRIVER_THEN_KILLED), cli_cluster.address, str(n),
                          env=cli_cluster.env)
    try:
        assert LineReader(driver.stdout).next(30) == "forked"
        status = wait_until(
            lambda: s if (s := query_status(cli_cluster.address))["drivers"] and s["queued"] >= n - 2 else None,
            20, what="the broker to hold the driver's tasks")
        assert [d["pid"] for d in status["drivers"]] == [driver.pid]
        assert status["drivers"][0]["unfinished"] == n
        driver.send_signal(signal.SIGKILL)
        assert driver.wait(10) == -signal.SIGKILL

        def dropped() -> dict[str, Any] | None:
            s = query_status(cli_cluster.address)
            return s if not s["drivers"] and s["queued"] == 0 and s["running"] == 0 else None

        status = wait_until(dropped, 10, what="the dead driver's tasks to be dropped")
        counters = status["counters"]
        assert counters["driver_tasks_dropped"] >= n - 2  # all but the two that were running at most ...
        assert counters["driver_tasks_dropped"] + counters.get("tasks_succeeded", 0) == n  # ... which finished
        assert len(status["workers"]) == 2
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait()
        for stream in (driver.stdin, driver.stdout, driver.stderr):
            if stream is not None:
                stream.close()


# -- cancellation and timeouts ---------------------------------------------------------


@pytest.mark.usefixtures("class_cluster")
class TestCancelAndWaitOnALiveCluster:
    """Cases that end no worker share one cluster."""

    def test_a_cancelled_queued_task_never_runs(self, tmp_path: Path) -> None:
        gate = tmp_path / "gate"
        blockers = [distfork.fork(tasks.announce_and_wait, str(tmp_path / f"busy{i}"), str(gate)) for i in range(2)]
        busy = {started_pid(tmp_path / f"busy{i}") for i in range(2)}
        assert len(busy) == 2  # both workers are occupied: what follows waits in a queue
        victim_path = tmp_path / "victim"
        victim = distfork.fork(tasks.touch, str(victim_path))
        behind = [distfork.fork(tasks.touch, str(tmp_path / f"behind{i}")) for i in range(4)]
        assert victim.cancel() is True
        assert victim.cancelled()
        gate.touch()

        assert set(distfork.wait_all(blockers, timeout=T)) == busy
        assert set(distfork.wait_all(behind, timeout=T)) <= busy  # the tasks queued behind it ran ...
        assert all((tmp_path / f"behind{i}").exists() for i in range(4))
        assert not victim_path.exists()  # ... and it did not
        with pytest.raises(concurrent.futures.CancelledError):
            distfork.wait(victim, timeout=T)

    def test_wait_with_a_timeout_leaves_the_task_running(self, tmp_path: Path) -> None:
        started, gate = tmp_path / "started", tmp_path / "gate"
        fut = distfork.fork(tasks.announce_and_wait, str(started), str(gate))
        pid = started_pid(started)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            distfork.wait(fut, timeout=0.5)
        assert 0.4 < time.monotonic() - t0 < 5
        assert not fut.done() and not fut.cancelled()
        gate.touch()
        assert distfork.wait(fut, timeout=T) == pid  # the same run finished: it was never stopped
        assert int(started.read_text()) == pid


def test_cancel_a_running_task_ends_its_worker_which_is_replaced(
    fresh_cluster: list[int], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="distfork.cluster")
    started = tmp_path / "started"
    fut = distfork.fork(tasks.announce_and_wait, str(started), str(tmp_path / "never"))
    pid = started_pid(started)
    proc = psutil.Process(pid)
    assert fut.cancel() is True
    assert fut.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        distfork.wait(fut, timeout=T)

    wait_until(lambda: is_gone(proc), 10, what=f"worker {pid} to end itself")
    wait_until(lambda: f"worker pid {pid} exited with code {ABORT_EXIT_CODE}" in caplog.text, 10,
               what="the supervisor to see the abort exit code")
    address = embedded_cluster().address
    status = wait_until(
        lambda: s if len((s := query_status(address))["workers"]) == 2 else None, 20, what="a replacement worker")
    assert pid not in {w["pid"] for w in status["workers"]}
    assert distfork.wait(distfork.fork(tasks.getpid), timeout=T) != pid
    assert int(started.read_text()) == pid  # the cancelled task was not run again elsewhere
    assert status["counters"].get("tasks_retried", 0) == 0


def test_timeout_s_fails_the_task_and_replaces_its_worker_not_the_other(
    fresh_cluster: list[int], tmp_path: Path
) -> None:
    a_started, b_started, b_gate = tmp_path / "a", tmp_path / "b", tmp_path / "b-gate"
    slow = distfork.options(timeout_s=1.0).fork(tasks.announce_and_wait, str(a_started), str(tmp_path / "never"))
    other = distfork.fork(tasks.announce_and_wait, str(b_started), str(b_gate))
    pid_a, pid_b = started_pid(a_started), started_pid(b_started)
    assert pid_a != pid_b
    proc_a = psutil.Process(pid_a)

    with pytest.raises(TimeoutError) as excinfo:
        distfork.wait(slow, timeout=T)
    assert type(excinfo.value) is TimeoutError
    assert "timeout_s=1" in str(excinfo.value) and f"pid {pid_a}" in str(excinfo.value)
    wait_until(lambda: is_gone(proc_a), 10, what=f"worker {pid_a} to end itself")

    assert not other.done()  # the other worker's task goes on ...
    b_gate.touch()
    assert distfork.wait(other, timeout=T) == pid_b  # ... and succeeds, in the same run
    address = embedded_cluster().address
    status = wait_until(
        lambda: s if len((s := query_status(address))["workers"]) == 2 else None, 20, what="a replacement worker")
    pids = {w["pid"] for w in status["workers"]}
    assert pid_a not in pids and pid_b in pids
    assert distfork.wait(distfork.fork(tasks.add, 1, 1), timeout=T) == 2
    assert status["counters"]["tasks_timed_out"] == 1
    assert status["counters"].get("tasks_retried", 0) == 0


# -- a worker SIGKILLed mid-task -----------------------------------------------------


def test_embedded_worker_sigkilled_mid_task_the_task_is_retried_elsewhere(
    fresh_cluster: list[int], tmp_path: Path
) -> None:
    started, gate = tmp_path / "started", tmp_path / "gate"
    fut = distfork.fork(tasks.announce_and_wait, str(started), str(gate))
    first = started_pid(started)
    assert first in fresh_cluster
    os.kill(first, signal.SIGKILL)  # a worker of the cluster this test started
    second = started_pid(started, other_than=first)  # the retry started on another worker
    gate.touch()
    assert distfork.wait(fut, timeout=T) == second
    status = query_status(embedded_cluster().address)
    assert status["counters"]["tasks_retried"] == 1
    wait_until(lambda: len(query_status(embedded_cluster().address)["workers"]) == 2, 20,
               what="a replacement worker")


def test_the_fork_server_sigkilled_mid_task_the_cluster_comes_back_and_the_task_completes(
    fresh_cluster: list[int], tmp_path: Path
) -> None:
    """The embedded cluster's processes are forked by one server: if it dies, they stop (they watch
    it), the supervisor starts another server, a broker and workers, and the driver re-submits."""
    cluster = embedded_cluster()
    server = psutil.Process(cluster.server_pid)
    old = [psutil.Process(pid) for pid in cluster.pids]
    assert {p.pid for p in old} <= {c.pid for c in server.children()}
    assert sorted(p.name() for p in old) == ["distfork-broker", "distfork-worker", "distfork-worker"]
    started, gate = tmp_path / "started", tmp_path / "gate"
    fut = distfork.fork(tasks.announce_and_wait, str(started), str(gate))
    first = started_pid(started)
    server.kill()  # SIGKILL, a process of the cluster this test started
    wait_until(lambda: all_gone(old), 20, what="the old broker and workers to stop")
    second = started_pid(started, other_than=first, timeout_s=30)
    assert second not in {p.pid for p in old}
    assert cluster.server_pid not in (None, server.pid)
    gate.touch()
    assert distfork.wait(fut, timeout=T) == second
    assert distfork.wait(distfork.fork(tasks.add, 1, 1), timeout=T) == 2


def test_nanny_worker_sigkilled_mid_task_is_replaced_and_the_task_retried(cli_cluster: CliCluster,
                                                                          tmp_path: Path) -> None:
    # A third worker process, under the nanny of `distfork worker` (its fork server forks them); the two
    # bare workers are stopped first so that the task can only run on the nanny's children.
    for p in cli_cluster.workers:
        p.send_signal(signal.SIGTERM)
    for p in cli_cluster.workers:
        p.wait(15)
    nanny = subprocess.Popen([sys.executable, "-m", "distfork", "worker", "--connect", cli_cluster.address,
                              "--processes", "2"], env=cli_cluster.env)
    cli_cluster.workers.append(nanny)  # the fixture stops it (and the nanny its children)

    def descendants() -> set[int]:
        return {c.pid for c in psutil.Process(nanny.pid).children(recursive=True)}

    def nanny_workers() -> set[int] | None:
        pids = {w["pid"] for w in query_status(cli_cluster.address)["workers"]}
        return pids if len(pids) == 2 and pids <= descendants() else None

    children = wait_until(nanny_workers, 20, what="the nanny's two workers to replace the bare ones")

    distfork.init(cli_cluster.address, heartbeat_s=0.2)
    started, gate = tmp_path / "started", tmp_path / "gate"
    fut = distfork.fork(tasks.announce_and_wait, str(started), str(gate))
    first = started_pid(started)
    assert first in children
    os.kill(first, signal.SIGKILL)  # a child of the nanny this test started
    second = started_pid(started, other_than=first)
    gate.touch()
    assert distfork.wait(fut, timeout=T) == second

    def replaced() -> set[int] | None:
        pids = {w["pid"] for w in query_status(cli_cluster.address)["workers"]}
        return pids if len(pids) == 2 and first not in pids and pids - children else None

    pids = wait_until(replaced, 20, what="the nanny to start a replacement that registers")
    assert pids <= descendants()
    assert query_status(cli_cluster.address)["counters"]["tasks_retried"] == 1


# -- backpressure --------------------------------------------------------------------


def test_fork_blocks_when_the_window_is_full() -> None:
    window, n = 50, 500
    distfork.init(workers=2, window=window, heartbeat_s=0.2)
    embedded_ready(2)
    driver = distfork.api._runtime.driver  # type: ignore[union-attr]
    assert driver is not None
    futs: list[distfork.Future[Any]] = []

    def produce() -> None:
        for i in range(n):
            futs.append(distfork.fork(tasks.slow_identity, i, 0.01))

    producer = threading.Thread(target=produce)
    samples: list[tuple[int, int]] = []
    producer.start()
    while producer.is_alive():
        samples.append((driver.unfinished, len(futs)))
        producer.join(0.005)
    producer.join()
    assert len(samples) > 20
    assert max(u for u, _ in samples) <= window
    # The producer sat at a full window while forks were still to come: fork blocked.
    assert any(u == window and forked < n for u, forked in samples)
    assert distfork.wait_all(futs, timeout=60) == list(range(n))
    assert driver.unfinished == 0
