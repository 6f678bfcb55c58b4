"""Nothing in /dev/shm outlives everything: with real processes killed the ways issue 12 found leaks.

Each case SIGKILLs or SIGTERMs real distfork processes (started through the
CLI or the embedded cluster) while 20 MB results are in flight or held, then
polls /dev/shm with a deadline until no segment they made is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import distfork
import tasks
from conftest import CliCluster, _made_by, _shm_segments, cli_env, free_port, stop_processes, wait_until
from distfork import shm

from .support import LineReader, all_gone, start_script, started_pid, wait_for_workers, write_script

pytestmark = pytest.mark.timeout(120)
np = pytest.importorskip("numpy")

N = 2_500_000  # float64 ones: 20 MB a result


def session_segments(session: str) -> list[str]:
    return sorted(n for n in _shm_segments() if n.startswith(f"df-{session}-"))


EMBEDDED_DRIVER = """
    import json, os, sys, time
    import distfork, tasks

    distfork.init(workers=2)
    cluster = distfork.api._runtime.cluster
    futures = [distfork.fork(tasks.ones, %(n)d, 1.0) for _ in range(8)]
    kept = []
    for f in distfork.as_completed(futures):
        kept.append(f.result())
        if len(kept) == 2:
            break
    print(json.dumps({"session": cluster.session, "pids": cluster.pids, "server": cluster.server_pid,
                      "progress": cluster._progress_dir}), flush=True)
    time.sleep(600)
"""


def test_embedded_driver_sigkilled_with_large_results_held_and_in_flight(tmp_path: Path) -> None:
    script = write_script(tmp_path, EMBEDDED_DRIVER % {"n": N})
    driver = start_script(script, env=cli_env(DISTFORK_HEARTBEAT_S="0.2"))
    try:
        info = LineReader(driver.stdout).next_json(60)
        procs = [psutil.Process(pid) for pid in [*info["pids"], info["server"]]]
        assert len(session_segments(info["session"])) >= 2  # the two results it keeps (and more on the way)
        driver.kill()
        assert driver.wait(10) == -signal.SIGKILL
        wait_until(lambda: all_gone(procs), 30, what="the embedded cluster to stop")
        wait_until(lambda: not session_segments(info["session"]), 30,
                   what=f"the dead driver's segments to go: {session_segments(info['session'])}")
        assert info["progress"] and not os.path.exists(info["progress"])  # its supervisor's directory too
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


HOLDING_DRIVER = """
    import json, os, sys
    import distfork, tasks

    distfork.init(sys.argv[1])
    held = distfork.wait_all([distfork.fork(tasks.ones, %(n)d) for _ in range(5)], timeout=60)
    print(json.dumps({"session": distfork.api._runtime.driver.welcome["session"], "pid": os.getpid()}), flush=True)
    sys.stdin.readline()
"""


def test_standalone_cluster_sigtermed_with_a_driver_holding_large_results(cli_cluster: CliCluster,
                                                                          tmp_path: Path) -> None:
    script = write_script(tmp_path, HOLDING_DRIVER % {"n": N})
    driver = start_script(script, cli_cluster.address, env=cli_cluster.env)
    try:
        info = LineReader(driver.stdout).next_json(60)
        assert len(session_segments(info["session"])) >= 5
        for p in (driver, cli_cluster.broker, *cli_cluster.workers):  # all at once, as a shutdown does
            p.send_signal(signal.SIGTERM)
        for p in (driver, cli_cluster.broker, *cli_cluster.workers):
            p.wait(20)
        wait_until(lambda: not session_segments(info["session"]), 10,
                   what=f"the held results to go: {session_segments(info['session'])}")
    finally:
        stop_processes([driver])


RESTART_DRIVER = """
    import os, sys
    import distfork, tasks

    distfork.init(sys.argv[1])
    futures = [distfork.fork(tasks.ones, %(n)d, 0.1) for _ in range(30)]
    print(os.getpid(), flush=True)
    for i, f in enumerate(distfork.as_completed(futures, timeout=90)):
        assert f.result().sum() == %(n)d
        print(i, flush=True)
"""


def test_broker_sigkilled_and_restarted_with_large_results_in_flight_leaves_nothing(cli_cluster: CliCluster,
                                                                                     tmp_path: Path) -> None:
    script = write_script(tmp_path, RESTART_DRIVER % {"n": N})
    driver = start_script(script, cli_cluster.address, env=cli_cluster.env)
    try:
        lines = LineReader(driver.stdout)
        pids = {int(lines.next(60)), *(w.pid for w in cli_cluster.workers)}
        lines.next(60)  # results flow
        cli_cluster.kill_broker()
        cli_cluster.restart_broker()
        for i in range(1, 30):
            assert int(lines.next(90)) == i
        assert driver.wait(30) == 0
        cli_cluster.stop()
        wait_until(lambda: not _made_by(_shm_segments(), pids), 10,
                   what=f"the in-flight results to go: {sorted(_made_by(_shm_segments(), pids))}")
    finally:
        stop_processes([driver])


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_new_distfork_process_sweeps_garbage_of_other_sessions_and_skips_other_users(tmp_path: Path) -> None:
    dead, me = _dead_pid(), os.getpid()
    garbage = [f"df-0ddba11-{dead}-42-{os.urandom(8).hex()}", f"df-0ddba11-{me}-1-{os.urandom(8).hex()}"]
    foreign = [f"df-0ddba11-{dead}-42-{os.urandom(8).hex()}", "df-0ddba11-999999-0"] if os.geteuid() == 0 else []
    for name in garbage + foreign:
        fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, 4096)
        if name in foreign:
            os.fchown(fd, 65534, 65534)  # nobody's: another user of this machine
        os.close(fd)
    address = f"tcp://127.0.0.1:{free_port()}"
    env = cli_env(DISTFORK_HEARTBEAT_S="0.2")
    broker = subprocess.Popen([sys.executable, "-m", "distfork", "broker", "--bind", address], env=env,
                              stderr=subprocess.PIPE, text=True)
    procs = [broker]
    try:
        wait_until(lambda: not [n for n in garbage if os.path.exists(f"/dev/shm/{n}")], 20,
                   what="the new broker to sweep the dead processes' segments")
        procs.append(subprocess.Popen([sys.executable, "-m", "distfork", "worker", "--connect", address,
                                       "--no-nanny"], env=env))
        wait_for_workers(address, 1)
        distfork.init(address)
        big = distfork.wait(distfork.fork(tasks.ones, N), timeout=30)  # through shared memory, sweeps all along
        assert big.sum() == N and broker.poll() is None and procs[1].poll() is None
        distfork.shutdown()
        del big  # after shutdown: its segment is unlinked here, not recycled to a worker that is stopping
        assert all(os.path.exists(f"/dev/shm/{n}") for n in foreign)  # untouched, and nothing crashed
    finally:
        stop_processes(procs)
        for name in garbage + foreign:
            try:
                os.unlink(f"/dev/shm/{name}")
            except FileNotFoundError:
                pass
    assert broker.returncode == 0
    stderr = broker.stderr.read() if broker.stderr else ""
    assert "Traceback" not in stderr
    if foreign:
        assert f"skipping shared-memory segment /dev/shm/{foreign[0]}" in stderr


def test_a_late_result_of_a_sigstopped_worker_is_freed_while_its_driver_lives(cli_cluster: CliCluster,
                                                                             tmp_path: Path) -> None:
    from distfork.status import query_status

    distfork.init(cli_cluster.address, heartbeat_s=0.2)
    started, gate = tmp_path / "started", tmp_path / "gate"
    fut = distfork.fork(tasks.announce_wait_and_make, str(started), str(gate), N)
    stopped = started_pid(started)
    os.kill(stopped, signal.SIGSTOP)  # a worker this test started
    try:
        wait_until(lambda: stopped not in [w["pid"] for w in query_status(cli_cluster.address)["workers"]], 20,
                   what="the broker to give up on the stopped worker")
        started_pid(started, other_than=stopped)  # the task runs again on the other worker
        gate.touch()
        value = distfork.wait(fut, timeout=30)
        assert value.sum() == N
    finally:
        os.kill(stopped, signal.SIGCONT)
    # Resumed, it finishes the task and sends its (stale) 20 MB result to a broker that no longer
    # knows it: that segment is named after us, and we are alive, so only the broker can free it.
    wait_until(lambda: stopped in [w["pid"] for w in query_status(cli_cluster.address)["workers"]], 20,
               what="the resumed worker to say hello again")

    def late_results() -> list[str]:
        return [n for n in _shm_segments() if (p := shm.parse(n)) is not None and p.pid == stopped
                and p.owner == os.getpid()]

    wait_until(lambda: not late_results(), 10, what=f"the late result to be freed: {late_results()}")
    del value
    distfork.shutdown()


@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's segment needs root")
def test_another_users_segments_named_after_our_session_are_left_alone_and_break_nothing() -> None:
    """Issue 11: an empty /dev/shm/df-<session>-999999-0 of another user made sweeps raise and the
    cluster loop. Ours run as root here, which could even remove it: they must not."""
    distfork.init(workers=1, heartbeat_s=0.2)
    session = distfork.api._runtime.cluster.session  # type: ignore[union-attr]
    foreign = [f"df-{session}-999999-0", f"df-{session}-{_dead_pid()}-1-{os.urandom(8).hex()}"]
    try:
        for name in foreign:
            fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            os.fchown(fd, 65534, 65534)
            os.close(fd)
        for _ in range(3):  # sweeps run meanwhile (every second here), in the worker and the broker
            assert distfork.wait(distfork.fork(tasks.ones, N, 0.5), timeout=30).sum() == N
        distfork.shutdown()  # sweeps the whole session, dead or not
        assert all(os.path.exists(f"/dev/shm/{n}") for n in foreign)
    finally:
        for name in foreign:
            try:
                os.unlink(f"/dev/shm/{name}")
            except FileNotFoundError:
                pass
