"""Fault handling details: what a driver learns of an exception it cannot rebuild and of a SIGKILLed
worker, the supervisor told which workers finished a task, and fork() racing shutdown()."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

import distfork
import tasks
from conftest import wait_until
from distfork.errors import DistforkError, RemoteError, RemoteTraceback, WorkerLostError
from distfork.status import query_status

from .support import embedded_cluster, embedded_ready, started_pid

pytestmark = pytest.mark.timeout(120)


def test_an_exception_class_the_driver_cannot_import_keeps_its_name_message_and_traceback(tmp_path: Path) -> None:
    distfork.init(workers=1)
    fut = distfork.fork(tasks.raise_unimportable, str(tmp_path), "the disk is on fire")
    with pytest.raises(RemoteError) as info:
        distfork.wait(fut, timeout=30)
    err = info.value
    assert err.type_name == "only_on_this_worker.OnlyHereError"
    assert "only_on_this_worker.OnlyHereError: the disk is on fire" in str(err)
    assert isinstance(err.__cause__, RemoteTraceback)
    assert "raise_unimportable" in err.__cause__.tb and "OnlyHereError: the disk is on fire" in err.__cause__.tb
    assert isinstance(err, DistforkError)


def test_a_sigkilled_worker_is_reported_as_possibly_out_of_memory_with_its_last_rss(tmp_path: Path) -> None:
    distfork.init(workers=1, heartbeat_s=0.2)
    [pid] = embedded_ready(1)
    cluster = embedded_cluster()
    assert distfork.wait(distfork.fork(tasks.getpid), timeout=30) == pid
    # It finished a task: it says so to its supervisor, whose back-off then spares it.
    wait_until(lambda: os.path.exists(os.path.join(cluster._progress_dir, str(pid))), 10,
               what="the worker's progress mark")
    started = tmp_path / "started"
    fut = distfork.options(max_retries=0).fork(tasks.announce_and_wait, str(started), str(tmp_path / "never"))
    assert started_pid(started) == pid
    wait_until(lambda: any(w["pid"] == pid and w.get("rss_bytes") for w in query_status(cluster.address)["workers"]),
               10, what="the worker's RSS in a keepalive")
    os.kill(pid, signal.SIGKILL)  # a process of the cluster this test started
    with pytest.raises(WorkerLostError) as info:
        distfork.wait(fut, timeout=30)
    text = str(info.value)
    assert "SIGKILL" in text and ("possibly out of memory, its last RSS" in text or "OOM killer" in text), text
    replacement = wait_until(lambda: [w["pid"] for w in query_status(cluster.address)["workers"] if w["pid"] != pid],
                             10, what="a replacement worker")
    assert replacement and cluster._backoff_s.get(min(cluster._slot.values(), default=0), 0.0) == 0.0


def test_fork_racing_shutdown_never_leaves_a_future_that_never_completes() -> None:
    for _ in range(3):
        _hammer_fork_against_shutdown()


def _hammer_fork_against_shutdown() -> None:
    distfork.init(workers=1, window=8)  # a small window: some forks wait in it when shutdown comes
    embedded_ready(1)
    rt = distfork.api._runtime
    futures: list[distfork.Future] = []  # type: ignore[type-arg]
    refused: list[BaseException] = []
    go = threading.Event()

    def hammer() -> None:
        go.wait()
        while distfork.api._runtime is rt:  # after shutdown, fork() would start a new cluster
            try:
                futures.append(distfork.fork(tasks.add, 1, 2))
            except DistforkError as exc:
                refused.append(exc)
                return

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    go.set()
    wait_until(lambda: len(futures) > 50, 20, interval_s=0.001, what="forks to flow")
    distfork.shutdown()
    for t in threads:
        t.join(20)
        assert not t.is_alive(), "fork() hung across shutdown()"
    distfork.shutdown()  # a fork that slipped in after the first shutdown started another runtime
    assert all("was shut down" in str(e) for e in refused), refused
    stuck = [f for f in futures if not f.done()]
    assert not stuck, f"{len(stuck)} of {len(futures)} futures never completed"
    assert all(f.cancelled() or f.result() == 3 for f in futures)
