"""A cluster started through the CLI as separate processes, and a driver script connecting by address."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import CliCluster, cli_env, free_port, wait_until
from distfork.status import query_status

from .support import LineReader, all_gone, write_script

pytestmark = pytest.mark.timeout(90)

DRIVER = """
    import json, os
    import distfork, tasks

    def triple(x):  # defined in the script's __main__: travels by value
        return 3 * x

    overlap = [distfork.fork(tasks.timed_sleep, 0.3) for _ in range(2)]
    values = distfork.wait_all([distfork.fork(tasks.add, i, 1) for i in range(N_ADDS)], timeout=60)
    tripled = distfork.wait(distfork.fork(triple, 14), timeout=60)
    runs = distfork.wait_all(overlap, timeout=60)
    try:
        distfork.wait(distfork.fork(tasks.fail, "remote boom"), timeout=60)
    except tasks.CustomError as exc:
        error = [type(exc).__name__, str(exc), type(exc.__cause__).__name__]
    print(json.dumps({"values": values, "tripled": tripled, "runs": runs, "error": error, "pid": os.getpid()}))
"""
N_ADDS = 50
N_TASKS = 2 + N_ADDS + 1 + 1  # every task the driver forks


def run_driver(tmp_path: Path, env: dict[str, str], address: str) -> dict:  # type: ignore[type-arg]
    script = write_script(tmp_path, DRIVER.replace("N_ADDS", str(N_ADDS)))
    done = subprocess.run([sys.executable, str(script)], env={**env, "DISTFORK_ADDRESS": address},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def check_driver_output(out: dict, worker_pids: set[int]) -> None:  # type: ignore[type-arg]
    assert out["values"] == [i + 1 for i in range(N_ADDS)]
    assert out["tripled"] == 42
    assert out["error"] == ["CustomError", "remote boom", "RemoteTraceback"]
    (pid_a, start_a, end_a), (pid_b, start_b, end_b) = out["runs"]
    assert {pid_a, pid_b} == worker_pids  # the two sleeps ran on both workers ...
    assert max(start_a, start_b) < min(end_a, end_b)  # ... at the same time


def status_json(address: str) -> dict:  # type: ignore[type-arg]
    done = subprocess.run([sys.executable, "-m", "distfork", "status", "--address", address, "--json"],
                          env=cli_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_driver_script_on_a_cli_cluster(cli_cluster: CliCluster, tmp_path: Path) -> None:
    worker_pids = {p.pid for p in cli_cluster.workers}
    out = run_driver(tmp_path, cli_cluster.env, cli_cluster.address)
    check_driver_output(out, worker_pids)
    assert out["pid"] not in worker_pids | {cli_cluster.broker.pid}


def test_status_lists_the_workers_and_what_they_did(cli_cluster: CliCluster, tmp_path: Path) -> None:
    worker_pids = {p.pid for p in cli_cluster.workers}
    run_driver(tmp_path, cli_cluster.env, cli_cluster.address)
    snap = status_json(cli_cluster.address)
    assert len(snap["workers"]) == 2
    assert {w["pid"] for w in snap["workers"]} == worker_pids
    assert all(w["done"] > 0 for w in snap["workers"])  # tasks ran on both workers
    assert sum(w["done"] for w in snap["workers"]) == N_TASKS - 1  # all but the raising one succeeded
    assert sum(w["failed"] for w in snap["workers"]) == 1
    assert snap["queued"] == 0 and snap["running"] == 0
    # the driver is gone once it exited (it says goodbye; at worst its heartbeats stop)
    wait_until(lambda: query_status(cli_cluster.address)["drivers"] == [], 10, what="the driver to be dropped")


def test_status_table(cli_cluster: CliCluster) -> None:
    done = subprocess.run([sys.executable, "-m", "distfork", "status", "--address", cli_cluster.address],
                          env=cli_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert cli_cluster.address in done.stdout
    for p in cli_cluster.workers:
        assert str(p.pid) in done.stdout


def test_status_with_no_broker_fails_clearly() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    done = subprocess.run([sys.executable, "-m", "distfork", "status", "--address", address, "--timeout", "0.5"],
                          env=cli_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert address in done.stderr


def test_sigterm_stops_a_worker_and_the_broker_drops_it(cli_cluster: CliCluster, tmp_path: Path) -> None:
    leaving, staying = cli_cluster.workers
    leaving.send_signal(signal.SIGTERM)
    assert leaving.wait(15) == 0
    wait_until(lambda: [w["pid"] for w in query_status(cli_cluster.address)["workers"]] == [staying.pid],
               10, what="the broker to drop the stopped worker")
    # the cluster goes on with the one left
    script = write_script(tmp_path, """
        import distfork, tasks
        print(distfork.wait_all([distfork.fork(tasks.getpid) for _ in range(5)], timeout=60))
    """)
    done = subprocess.run([sys.executable, str(script)],
                          env={**cli_cluster.env, "DISTFORK_ADDRESS": cli_cluster.address},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([staying.pid] * 5)


def test_sigterm_stops_the_broker(cli_cluster: CliCluster) -> None:
    cli_cluster.broker.send_signal(signal.SIGTERM)
    assert cli_cluster.broker.wait(15) == 0


def test_up_prints_its_address_serves_a_driver_and_stops_on_sigterm(tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    env = cli_env(DISTFORK_HEARTBEAT_S="0.2")
    up = subprocess.Popen([sys.executable, "-m", "distfork", "up", "--workers", "2", "--bind", address],
                          env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert LineReader(up.stdout).next(30) == address
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) == 4  # the fork server, and forked by it a broker and two workers
        status = wait_until(lambda: s if len((s := query_status(address))["workers"]) == 2 else None,
                            20, what="2 workers to register")
        worker_pids = {w["pid"] for w in status["workers"]}
        assert worker_pids < {c.pid for c in children}
        check_driver_output(run_driver(tmp_path, env, address), worker_pids)

        up.send_signal(signal.SIGTERM)
        assert up.wait(20) == 0
        wait_until(lambda: all_gone(children), 10, what="the processes of `distfork up` to exit")
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_broker_refuses_a_public_bind_without_insecure() -> None:
    # DISTFORK_DEFAULT_KEYS=0: no keys at all (by default, the user's own keys make the bind safe)
    done = subprocess.run([sys.executable, "-m", "distfork", "broker", "--bind", f"tcp://0.0.0.0:{free_port()}"],
                          env=cli_env(DISTFORK_DEFAULT_KEYS="0"), capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "loopback" in done.stderr
    assert "--insecure" in done.stderr


def test_up_refuses_a_public_bind_without_insecure() -> None:
    done = subprocess.run([sys.executable, "-m", "distfork", "up", "--workers", "1", "--bind",
                           f"tcp://0.0.0.0:{free_port()}"], env=cli_env(DISTFORK_DEFAULT_KEYS="0"),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "loopback" in done.stderr and "--insecure" in done.stderr
