"""The direct path (distfork/direct.py): a lone fork goes straight to a worker slot, and every
failure guarantee of the broker path still holds, because the broker is told of the task.

Each test starts an embedded cluster of two single-slot workers with ``direct=True`` and
injects faults only through public means (SIGKILL of a worker of that cluster, ``cancel``).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import distfork
import distfork.direct
import tasks
from conftest import wait_until
from distfork.status import query_status

from .support import embedded_cluster, embedded_ready, is_gone, started_pid

pytestmark = pytest.mark.timeout(60)

T = 30.0


def settled(direct: int = 0) -> dict[str, Any]:
    """The broker's status once it has heard every result of ours (a direct result reaches the driver
    before its header reaches the broker) and of at least ``direct`` direct tasks (the driver's
    notices come within DIRECT_NOTICE_S)."""
    def status() -> dict[str, Any] | None:
        s = query_status(embedded_cluster().address)
        heard = s["counters"].get("tasks_direct", 0) >= direct
        return s if heard and all(d["unfinished"] == 0 for d in s["drivers"]) else None
    return wait_until(status, 10, what="the broker to hear of every result")  # type: ignore[no-any-return]


def counters() -> dict[str, Any]:
    return query_status(embedded_cluster().address)["counters"]  # type: ignore[no-any-return]


@pytest.fixture
def direct_cluster() -> Iterator[list[int]]:
    """An embedded cluster of two single-slot workers with the direct path on, once a lone fork takes it."""
    distfork.init(workers=2, heartbeat_s=0.2, direct=True)
    try:
        pids = embedded_ready(2)
        # The driver finds the slots' sockets once they are up: until then lone forks take the broker path.
        wait_until(lambda: distfork.wait(distfork.fork(tasks.add, 1, 1), timeout=T) == 2
                   and counters().get("tasks_direct", 0) > 0, 20, what="a lone fork to take the direct path")
        yield pids
    finally:
        distfork.shutdown()


def test_lone_forks_take_the_direct_path_and_the_broker_counts_them(direct_cluster: list[int]) -> None:
    before = settled()
    for i in range(20):
        assert distfork.wait(distfork.fork(tasks.add, i, 1), timeout=T) == i + 1
    with pytest.raises(ValueError, match="boom"):  # a raising task: its exception comes back the same way
        distfork.wait(distfork.fork(tasks.raise_value_error, "boom"), timeout=T)
    after = settled(before["counters"]["tasks_direct"] + 21)
    c0, c1 = before["counters"], after["counters"]
    assert c1["tasks_direct"] - c0["tasks_direct"] == 21
    assert c1["tasks_submitted"] - c0["tasks_submitted"] == 21
    assert c1["tasks_succeeded"] - c0.get("tasks_succeeded", 0) == 20
    assert c1.get("tasks_failed", 0) - c0.get("tasks_failed", 0) == 1
    [d0], [d1] = before["drivers"], after["drivers"]
    assert d1["done"] - d0["done"] == 21 and d1["unfinished"] == 0
    assert d1["result_bytes"] == d0["result_bytes"]  # the results did not pass through the broker


def test_a_worker_sigkilled_mid_direct_task_the_task_is_retried_elsewhere(
    direct_cluster: list[int], tmp_path: Path
) -> None:
    direct_before = counters()["tasks_direct"]
    started, gate = tmp_path / "started", tmp_path / "gate"
    fut = distfork.fork(tasks.announce_and_wait, str(started), str(gate))
    first = started_pid(started)
    assert first in direct_cluster
    wait_until(lambda: counters()["tasks_direct"] == direct_before + 1, 10,  # it went straight to that worker,
               what="the broker to hear of the direct task")  # and the broker knows
    os.kill(first, signal.SIGKILL)  # a worker of the cluster this test started
    second = started_pid(started, other_than=first)  # the broker re-queued it on the other worker
    gate.touch()
    assert distfork.wait(fut, timeout=T) == second
    assert counters()["tasks_retried"] == 1


def test_a_direct_task_whose_worker_dies_past_max_retries_fails_with_worker_lost_error(
    direct_cluster: list[int], tmp_path: Path
) -> None:
    started = tmp_path / "started"
    fut = distfork.options(max_retries=0).fork(tasks.announce_and_wait, str(started), str(tmp_path / "never"))
    pid = started_pid(started)
    os.kill(pid, signal.SIGKILL)  # a worker of the cluster this test started
    with pytest.raises(distfork.WorkerLostError, match="SIGKILL"):
        distfork.wait(fut, timeout=T)
    assert counters()["tasks_lost"] == 1


def test_cancel_of_a_running_direct_task_ends_its_worker(direct_cluster: list[int], tmp_path: Path) -> None:
    started = tmp_path / "started"
    fut = distfork.fork(tasks.announce_and_wait, str(started), str(tmp_path / "never"))
    pid = started_pid(started)
    proc = psutil.Process(pid)
    assert fut.cancel() is True
    with pytest.raises(concurrent.futures.CancelledError):
        distfork.wait(fut, timeout=T)
    wait_until(lambda: is_gone(proc), 10, what=f"worker {pid} to end itself")
    assert counters().get("tasks_retried", 0) == 0
    wait_until(lambda: len(query_status(embedded_cluster().address)["workers"]) == 2, 20, what="a replacement")
    assert distfork.wait(distfork.fork(tasks.getpid), timeout=T) != pid


def test_a_call_naming_a_running_direct_task_gets_its_value_from_the_broker_which_holds_it(
    direct_cluster: list[int], tmp_path: Path
) -> None:
    """As on the broker path: the value goes from task to task and the driver gets a notice (held)."""
    c0 = counters()
    started, gate = tmp_path / "started", tmp_path / "gate"
    first = distfork.fork(tasks.announce_and_wait, str(started), str(gate))  # lone: direct
    pid = started_pid(started)
    second = distfork.fork(tasks.add, first, 10)  # names it while it runs: its slot sends the value to the broker
    producer = distfork.fork(tasks.add, 2, 3)  # not lone: by the broker
    dependent = distfork.fork(tasks.add, producer, 1)  # a reference the broker resolves
    assert distfork.wait(dependent, timeout=T) == 6
    gate.touch()
    assert distfork.wait(second, timeout=T) == pid + 10
    assert first.held and distfork.wait(first) == pid
    c1 = settled(c0["tasks_direct"] + 1)["counters"]
    assert c1["tasks_direct"] - c0["tasks_direct"] == 1  # only `first`
    assert c1["tasks_submitted"] - c0["tasks_submitted"] == 4
    assert c1.get("results_held", 0) - c0.get("results_held", 0) >= 2  # `first` and `producer`


def test_timeout_s_of_a_direct_task_fails_it_and_replaces_its_worker(
    direct_cluster: list[int], tmp_path: Path
) -> None:
    started = tmp_path / "started"
    fut = distfork.options(timeout_s=0.5).fork(tasks.announce_and_wait, str(started), str(tmp_path / "never"))
    pid = started_pid(started)
    with pytest.raises(TimeoutError, match="timeout_s=0.5"):
        distfork.wait(fut, timeout=T)
    wait_until(lambda: is_gone(psutil.Process(pid)) if psutil.pid_exists(pid) else True, 10,
               what=f"worker {pid} to end itself")
    c = counters()
    assert c["tasks_timed_out"] == 1 and c.get("tasks_retried", 0) == 0


def test_the_slot_sockets_are_private_files_of_the_clusters_directory_and_check_their_peer(
    direct_cluster: list[int]
) -> None:
    """docs/SECURITY.md: 0600 files in the cluster's 0700 directory, no TCP port, a same-uid peer."""
    import socket
    import stat

    address = embedded_cluster().address
    directory = Path(address[len("ipc://"):]).parent
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = sorted(directory.glob("direct-*"))
    assert len(files) == 2 and {int(f.name.split("-")[1]) for f in files} == set(direct_cluster)
    assert all(stat.S_ISSOCK(f.stat().st_mode) and stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    for pid in direct_cluster:
        assert not [c for c in psutil.Process(pid).net_connections("tcp")]
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(files[0]))
        pid, uid = distfork.direct._peer(s)
        assert uid == os.getuid() and pid == int(files[0].name.split("-")[1])
