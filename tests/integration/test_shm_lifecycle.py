"""Nothing of ours stays in /dev/shm: after results are consumed, after a worker or a driver is
SIGKILLed in the middle of a transfer, after the cluster stops; and a /dev/shm too small for a
transfer means ZeroMQ frames instead, said once in the log.

Segments are named ``df-<session>-<creator pid>-<n>``; a segment whose creator
died is unlinked by the next sweep of the broker or a worker, which happens
every 5 heartbeats: the clusters here heartbeat every 0.2 s, so a sweep runs
about every second, and every check allows ``DEADLINE_S``.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

import distfork
import tasks
from conftest import CliCluster, cli_env, free_port
from conftest import wait_until as _wait_until
from distfork import shm
from distfork.errors import WorkerLostError
from distfork.status import query_status

from .support import (
    LineReader,
    all_gone,
    embedded_cluster,
    embedded_ready,
    start_script,
    wait_for_workers,
    write_script,
)

pytestmark = pytest.mark.timeout(120)

DEADLINE_S = 15.0
HEARTBEAT_S = 0.2
MB = 1_000_000


def wait_until(predicate, timeout_s: float = DEADLINE_S, what: str = "condition"):  # type: ignore[no-untyped-def]
    return _wait_until(predicate, timeout_s, 0.05, what)


def segments(session: str, pid: int | None = None) -> dict[str, int]:
    """This session's segments in /dev/shm (of creator ``pid`` only), with their sizes."""
    prefix = f"df-{session}-" if pid is None else f"df-{session}-{pid}-"
    out = {}
    for name in os.listdir("/dev/shm"):
        if name.startswith(prefix):
            try:
                out[name] = os.stat(os.path.join("/dev/shm", name)).st_size
            except FileNotFoundError:
                pass  # unlinked while we looked
    return out


def bytes_by_creator(session: str) -> dict[int, int]:
    by_pid: dict[int, int] = defaultdict(int)
    for name, size in segments(session).items():
        by_pid[int(name.split("-")[2])] += size
    return dict(by_pid)


# -- results consumed ----------------------------------------------------------

SPARE_BYTES = 24 * MB  # Config.shm_spare_bytes: warm spares each process may keep


def test_after_results_are_consumed_only_bounded_warm_spares_remain() -> None:
    distfork.init(workers=2, heartbeat_s=HEARTBEAT_S, shm_spare_bytes=SPARE_BYTES)
    worker_pids = embedded_ready(2)
    session = embedded_cluster().session
    me = os.getpid()
    for _ in range(3):  # args and results of 4 MB, 16 of each per round: 128 MB went through /dev/shm
        sent = [np.full(500_000, float(i)) for i in range(8)]
        echoed = distfork.wait_all([distfork.fork(tasks.identity, a) for a in sent], timeout=60)
        made = distfork.wait_all([distfork.fork(tasks.ones, 500_000) for _ in range(8)], timeout=60)
        assert all((b == a).all() for a, b in zip(sent, echoed, strict=True))
        assert all((m == 1.0).all() for m in made)
    del sent, echoed, made

    def only_spares() -> dict[int, int] | None:
        held = bytes_by_creator(session)
        return held if set(held) <= {me, *worker_pids} and all(n <= SPARE_BYTES for n in held.values()) else None

    wait_until(only_spares, what=f"only warm spares (at most {SPARE_BYTES} bytes a process) to remain: "
                                 f"{bytes_by_creator(session)}")
    distfork.shutdown()
    assert segments(session) == {}  # the cluster's end takes its spares with it


# -- a worker SIGKILLed --------------------------------------------------------

def test_worker_sigkilled_while_large_results_flow() -> None:
    distfork.init(workers=2, heartbeat_s=HEARTBEAT_S)
    worker_pids = embedded_ready(2)
    session = embedded_cluster().session
    victim_pid = worker_pids[0]
    victim = psutil.Process(victim_pid)
    n = 1_000_000  # 8 MB results, each through a segment the worker creates
    futures = [distfork.fork(tasks.ones, n, 0.05) for _ in range(30)]
    wait_until(lambda: sum(f.done() for f in futures) >= 2 and segments(session, victim_pid),
               what="large results to flow, with a segment of the victim in /dev/shm")
    os.kill(victim_pid, signal.SIGKILL)  # a worker of the cluster this test started
    wait_until(lambda: all_gone([victim]), what="the killed worker to be gone")
    outcomes = []
    for f in futures:
        try:
            outcomes.append(bool((distfork.wait(f, timeout=60) == 1.0).all()))
        except WorkerLostError as exc:
            outcomes.append(repr(exc))  # out of retries: failed, not hung (but it had retries left)
    assert all(o is True for o in outcomes), outcomes  # the task it was running was retried elsewhere
    # Results it handed out live on the driver's mappings; once the driver drops them, they are unlinked.
    futures.clear()
    gc.collect()
    wait_until(lambda: not segments(session, victim_pid),
               what=f"the killed worker's segments to be swept: {segments(session, victim_pid)}")


# -- a driver SIGKILLed --------------------------------------------------------

KILLED_DRIVER = """
    import json, os, sys
    import numpy as np
    import distfork, tasks

    distfork.init(sys.argv[1])
    # 4 tasks holding 8 MB arguments until the gate opens: 2 running, 2 queued.
    futures = [distfork.fork(tasks.wait_for_path_holding, sys.argv[2], np.full(1_000_000, float(i)), 60)
               for i in range(4)]
    print(json.dumps({"pid": os.getpid(), "session": distfork.api._runtime.driver.welcome["session"]}), flush=True)
    sys.stdin.readline()
"""


def _driver_holding_large_arguments(cli_cluster: CliCluster, tmp_path: Path, gate: Path) -> tuple[Any, str, int]:
    """Start KILLED_DRIVER; return it, its session and pid once the broker holds its 4 tasks."""
    script = write_script(tmp_path, KILLED_DRIVER)
    driver = start_script(script, cli_cluster.address, str(gate), env=cli_cluster.env)
    info = LineReader(driver.stdout).next_json(30)
    session, pid = info["session"], info["pid"]
    wait_until(lambda: len(segments(session, pid)) >= 4, what="the driver's 4 argument segments (and spares)")
    wait_until(lambda: driver_tasks(cli_cluster.address, pid) == [4], what="the broker to hold the driver's 4 tasks")
    return driver, session, pid


def driver_tasks(address: str, pid: int) -> list[int]:
    """Unfinished tasks of the driver with ``pid``, as the broker sees it ([]: it does not know that driver)."""
    return [d["unfinished"] for d in query_status(address)["drivers"] if d["pid"] == pid]


def at_most_a_spare_each(session: str, worker_pids: set[int]) -> dict[int, int] | None:
    """The workers' segments if each holds at most one (its warm spare) and nobody else holds any."""
    held = defaultdict(int)
    for name in segments(session):
        held[int(name.split("-")[2])] += 1
    return dict(held) if set(held) <= worker_pids and all(n <= 1 for n in held.values()) else None


def test_driver_sigkilled_with_large_arguments_in_flight(cli_cluster: CliCluster, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    driver, session, pid = _driver_holding_large_arguments(cli_cluster, tmp_path, gate)
    try:
        driver.kill()
        assert driver.wait(30) == -signal.SIGKILL
        wait_until(lambda: not segments(session, pid),
                   what=f"the killed driver's segments to be swept: {segments(session, pid)}")
        wait_until(lambda: driver_tasks(cli_cluster.address, pid) == [], what="the broker to drop the dead driver")
    finally:
        gate.touch()  # the two running tasks end; their results (8 MB segments) have nowhere to go
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    workers = {w.pid for w in cli_cluster.workers}

    def orphans_over() -> bool:
        """Both running tasks gave their results to the broker (or their worker ended itself to stop them)."""
        stale = query_status(cli_cluster.address)["counters"].get("results_stale", 0)
        return stale + sum(w.poll() is not None for w in cli_cluster.workers) >= 2

    wait_until(orphans_over, what="the orphaned tasks to end")
    wait_until(lambda: at_most_a_spare_each(session, workers),
               what=f"the undeliverable results to be freed: {segments(session)}")


def test_driver_sigkilled_just_before_its_large_results_arrive(cli_cluster: CliCluster, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    driver, session, pid = _driver_holding_large_arguments(cli_cluster, tmp_path, gate)
    workers = {w.pid for w in cli_cluster.workers}
    try:
        driver.kill()
        assert driver.wait(30) == -signal.SIGKILL
        gate.touch()  # the results are on their way before the broker knows the driver is gone
        wait_until(lambda: driver_tasks(cli_cluster.address, pid) == [], what="the broker to drop the dead driver")
        wait_until(lambda: at_most_a_spare_each(session, workers), 5.0,
                   what=f"the results sent to the dead driver to be freed: {segments(session)}")
    finally:
        gate.touch()
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for name in segments(session):  # what the bug leaves behind: this test cleans up after it
            shm.unlink(name)


# -- the cluster stops ---------------------------------------------------------

def test_embedded_cluster_shutdown_with_transfers_in_flight(tmp_path: Path) -> None:
    distfork.init(workers=2, heartbeat_s=HEARTBEAT_S)
    worker_pids = embedded_ready(2)
    session = embedded_cluster().session
    made = distfork.wait_all([distfork.fork(tasks.ones, 1_000_000) for _ in range(4)], timeout=60)
    assert all((m == 1.0).all() for m in made)
    busy = distfork.fork(tasks.wait_for_path_holding, str(tmp_path / "never"), np.ones(1_000_000), 60)
    queued = distfork.fork(tasks.wait_for_path_holding, str(tmp_path / "never"), np.ones(1_000_000), 60)
    wait_until(lambda: set(bytes_by_creator(session)) & set(worker_pids) and segments(session, os.getpid()),
               what="segments of the driver and of a worker")
    distfork.shutdown()
    assert busy.cancelled() and queued.cancelled()
    assert segments(session) == {}


UP_DRIVER = """
    import json, sys
    import numpy as np
    import distfork, tasks

    distfork.init(sys.argv[1])
    made = distfork.wait_all([distfork.fork(tasks.ones, 1_000_000) for _ in range(4)], timeout=60)
    echoed = distfork.wait(distfork.fork(tasks.identity, np.arange(1_000_000.0)), timeout=60)
    assert all((m == 1.0).all() for m in made) and (echoed == np.arange(1_000_000.0)).all()
    print(json.dumps({"session": distfork.api._runtime.driver.welcome["session"]}), flush=True)
"""


def test_distfork_up_sigtermed_leaves_nothing(tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    env = cli_env(DISTFORK_HEARTBEAT_S=str(HEARTBEAT_S))
    up = subprocess.Popen([sys.executable, "-m", "distfork", "up", "--bind", address, "--workers", "2"],
                          env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert LineReader(up.stdout).next(30) == address
        status = wait_for_workers(address, 2)
        worker_pids = {w["pid"] for w in status["workers"]}
        procs = psutil.Process(up.pid).children(recursive=True)
        script = write_script(tmp_path, UP_DRIVER)
        done = subprocess.run([sys.executable, str(script), address], env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        session = json.loads(done.stdout)["session"]
        # The driver is gone; the workers keep warm spares for the next results.
        wait_until(lambda: set(bytes_by_creator(session)) & worker_pids, what="the workers' warm spares")
        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0
        assert all_gone(procs)
        assert segments(session) == {}
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


# -- /dev/shm too small --------------------------------------------------------

def _can_unshare_mount() -> str | None:
    """Why a private /dev/shm cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to mount a private tmpfs on /dev/shm"
    if shutil.which("unshare") is None:
        return "needs unshare(1) from util-linux"
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare --mount is not permitted here: {probe.stderr.strip()}"
    return None


TINY_SHM_DRIVER = """
    import json, logging, os, time
    import numpy as np
    import distfork, tasks

    logging.basicConfig(level=logging.WARNING, format="distfork[%(process)d] %(name)s: %(message)s")
    st = os.statvfs("/dev/shm")
    distfork.init(workers=2)
    cluster = distfork.api._runtime.cluster
    deadline = time.monotonic() + 30
    while True:  # until the driver knows its workers share its /dev/shm: a small argument goes there
        small = distfork.wait(distfork.fork(tasks.describe_data, np.ones(20_000)), timeout=60)  # 160 kB: fits
        if small["backing"].startswith("/dev/shm/") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    a = np.arange(2_500_000, dtype=np.float64)  # 20 MB: more than this /dev/shm holds
    got = [distfork.wait(distfork.fork(tasks.describe_data, a * k), timeout=60) for k in (1, 2)]
    back = distfork.wait(distfork.fork(tasks.identity, a), timeout=60)
    made = distfork.wait(distfork.fork(tasks.ones, 2_500_000), timeout=60)
    back[0] = -1.0  # writable
    made[-1] = -1.0
    print(json.dumps({
        "shm_bytes": st.f_blocks * st.f_frsize,
        "pid": os.getpid(),
        "worker_pids": cluster.pids[1:],
        "arg_ok": [g["sha256"] == tasks.describe_data(a * k)["sha256"] for g, k in zip(got, (1, 2))],
        "arg_backing": [g["backing"] for g in got],
        "echo_ok": bool((back[1:] == a[1:]).all()),
        "echo_backing": tasks.mapping_of(back.ctypes.data),
        "made_ok": bool((made[:-1] == 1.0).all()) and made.size == 2_500_000,
        "small_backing": small["backing"],
    }), flush=True)
"""


def test_dev_shm_too_small_falls_back_to_frames_and_says_so_once(tmp_path: Path) -> None:
    reason = _can_unshare_mount()
    if reason:
        pytest.skip(reason)
    script = write_script(tmp_path, TINY_SHM_DRIVER)
    # A mount namespace of its own with a 1 MB /dev/shm, inherited by the
    # driver's embedded cluster; the real /dev/shm is not touched.
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
           'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec "$0" "$@"', sys.executable, str(script)]
    done = subprocess.run(cmd, env=cli_env(DISTFORK_HEARTBEAT_S=str(HEARTBEAT_S)), capture_output=True, text=True,
                          timeout=90)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["shm_bytes"] == 1024 * 1024  # the driver and its cluster ran on the tiny /dev/shm
    assert out["arg_ok"] == [True, True] and out["echo_ok"] and out["made_ok"]
    assert not any(b.startswith("/dev/shm/") for b in out["arg_backing"]), out["arg_backing"]  # frames
    assert not out["echo_backing"].startswith("/dev/shm/"), out["echo_backing"]
    assert out["small_backing"].startswith("/dev/shm/df-"), out["small_backing"]  # what fits still goes there
    said = [line for line in done.stderr.splitlines() if "shared memory unavailable" in line]
    by_process = defaultdict(int)
    for line in said:
        by_process[int(line.split("distfork[", 1)[1].split("]", 1)[0])] += 1
    assert by_process.get(out["pid"]) == 1, said  # the driver: once, for its two large arguments
    assert set(by_process) - {out["pid"]} <= set(out["worker_pids"]), said
    assert all(n == 1 for n in by_process.values()), said
    assert len(by_process) >= 2, said  # and the worker whose result did not fit
