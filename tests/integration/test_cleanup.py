"""Nothing of ours outlives its driver: after shutdown(), at interpreter exit, and when the driver is killed.

The processes of a driver run as a subprocess are its children, not ours:
the script prints their pids and waits for a line on stdin, so the test
holds a ``psutil.Process`` for each (safe against pid reuse) before the
driver goes away.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

import distfork
import tasks
from conftest import cli_env, wait_until

from .support import LineReader, all_gone, embedded_cluster, embedded_ready, start_script, write_script

pytestmark = pytest.mark.timeout(90)


def _ours(pids: list[int]) -> list[psutil.Process]:
    procs = [psutil.Process(pid) for pid in pids]
    for p in procs:
        assert "distfork" in " ".join(p.cmdline())
    return procs


def test_shutdown_stops_every_process_of_the_embedded_cluster() -> None:
    np = pytest.importorskip("numpy")
    distfork.init(workers=2)
    worker_pids = embedded_ready(2)
    assert distfork.wait_all([distfork.fork(tasks.getpid) for _ in range(4)], timeout=30)
    big = np.ones(2_000_000)  # 16 MB each way: through shared memory
    assert [r.sum() for r in distfork.wait_all([distfork.fork(tasks.add, big, i) for i in range(3)], timeout=30)] \
        == [(1 + i) * 2_000_000 for i in range(3)]
    cluster = embedded_cluster()
    session = f"df-{cluster.session}-"
    procs = _ours(cluster.pids)
    assert len(procs) == 3 and set(worker_pids) < {p.pid for p in procs}
    me = psutil.Process()
    assert {p.pid for p in procs} <= {c.pid for c in me.children(recursive=True)}
    socket_dir = Path(cluster.address.removeprefix("ipc://")).parent
    assert socket_dir.is_dir()

    distfork.shutdown()
    assert all_gone(procs)  # shutdown() returns once they are gone
    assert not socket_dir.exists()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(session)]


def test_shutdown_stops_the_cluster_started_by_the_first_fork() -> None:
    me = psutil.Process()
    before = {c.pid for c in me.children(recursive=True)}
    assert distfork.wait(distfork.fork(tasks.add, 1, 1), timeout=30) == 2  # nothing configured: starts one
    started = [c for c in me.children(recursive=True) if c.pid not in before]
    # The fork server, and forked by it a broker and one worker per core.
    assert len(started) == 2 + (os.cpu_count() or 1)
    distfork.shutdown()
    assert all_gone(started)


def test_shutdown_with_a_task_still_running(tmp_path: Path) -> None:
    distfork.init(workers=2)
    procs = _ours(embedded_cluster().pids)
    fut = distfork.fork(tasks.wait_for_path, str(tmp_path / "never"), 60)
    wait_until(lambda: distfork.api._runtime is not None and embedded_busy(), 20, what="the task to start")
    distfork.shutdown()
    assert fut.cancelled()
    assert all_gone(procs)


def embedded_busy() -> bool:
    from distfork.status import query_status

    return query_status(embedded_cluster().address)["running"] > 0


def test_shutdown_is_idempotent() -> None:
    distfork.init(workers=1)
    distfork.shutdown()
    distfork.shutdown()


# -- a driver in a subprocess -------------------------------------------------

def _socket_dir(info: dict) -> Path:  # type: ignore[type-arg]
    return Path(info["address"].removeprefix("ipc://")).parent


def _segments(info: dict) -> list[str]:  # type: ignore[type-arg]
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"df-{info['session']}-"))


DRIVER = """
    import json, os, signal, sys
    import numpy as np
    import distfork, tasks

    distfork.init(workers=2)
    big = np.arange(2_000_000, dtype=np.float64)  # 16 MB each way: large enough for shared memory
    assert (distfork.wait(distfork.fork(tasks.add, big, 1), timeout=30) == big + 1).all()
    busy = distfork.fork(tasks.wait_for_path_holding, sys.argv[2], big, 60)  # still running when we go
    cluster = distfork.api._runtime.cluster
    info = {"pids": [*cluster.pids, cluster.server_pid], "address": cluster.address, "session": cluster.session}
    print(json.dumps(info), flush=True)
    sys.stdin.readline()
    how = sys.argv[1]
    if how == "return":
        pass                               # atexit does the rest
    elif how == "raise":
        raise RuntimeError("driver crashed")
    elif how == "os._exit":
        os._exit(0)                        # no atexit: the children notice their parent is gone
    elif how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("how", ["return", "raise", "os._exit", "sigkill"])
def test_driver_that_exits_without_shutdown_leaves_nothing_behind(how: str, tmp_path: Path) -> None:
    script = write_script(tmp_path, DRIVER)
    env = cli_env(DISTFORK_HEARTBEAT_S="0.2")
    driver = start_script(script, how, str(tmp_path / "never"), env=env)
    try:
        info = LineReader(driver.stdout).next_json(30)
        procs = _ours(info["pids"])
        assert {p.pid for p in procs} == {c.pid for c in psutil.Process(driver.pid).children(recursive=True)}
        driver.stdin.write("go\n")
        driver.stdin.flush()
        if how in ("return", "raise"):  # at exit the driver waits for its unfinished fork (issue 14): let it end
            (tmp_path / "never").touch()
        code = driver.wait(30)
        expected = {"return": 0, "raise": 1, "os._exit": 0, "sigkill": -signal.SIGKILL}[how]
        assert code == expected, driver.stderr.read()
        _assert_cluster_gone(info, procs, f"after `{how}`")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


def _assert_cluster_gone(info: dict, procs: list, when: str) -> None:  # type: ignore[type-arg]
    """The driver's embedded cluster is gone: its processes, its ipc:// directory, its shared memory."""
    wait_until(lambda: all_gone(procs), 10, what=f"the driver's cluster to stop {when}")
    assert not _socket_dir(info).exists()  # nor the private directory of its ipc:// socket
    wait_until(
        lambda: not _segments(info), 10, what=f"the shared memory of the driver's cluster to go: {_segments(info)}"
    )


def test_driver_sigkilled_from_outside_leaves_nothing_behind(tmp_path: Path) -> None:
    script = write_script(tmp_path, DRIVER)
    driver = start_script(script, "return", str(tmp_path / "never"), env=cli_env(DISTFORK_HEARTBEAT_S="0.2"))
    try:
        info = LineReader(driver.stdout).next_json(30)
        procs = _ours(info["pids"])
        driver.kill()
        assert driver.wait(30) == -signal.SIGKILL
        _assert_cluster_gone(info, procs, "after the driver was killed")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
