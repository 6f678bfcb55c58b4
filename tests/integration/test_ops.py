"""Operating a cluster on this machine: ``/metrics``, ``distfork status``, ``distfork loadtest``, ``up --metrics-port``.

Each check compares what the cluster reports with what the test made it do.
The same on several hosts: tests/deploy/test_multihost.py.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import distfork
from conftest import CliCluster, cli_env, free_port, wait_until
from deploy.opsutil import Samples, check_report, delta, scrape, value
from distfork.metrics import BrokerMetrics, classify
from distfork.protocol import Entry, ResultEntry, TaskEntry
from distfork.status import query_status

from .support import LineReader, write_script

pytestmark = pytest.mark.timeout(90)

DISTFORK = [sys.executable, "-m", "distfork"]


class MetricsCluster(CliCluster):
    metrics_url: str = ""

    def metrics(self) -> Samples:
        return scrape(self.metrics_url)


@pytest.fixture
def cluster() -> Iterator[MetricsCluster]:
    """``distfork broker --metrics-port`` and two ``distfork worker`` processes, fresh for each test."""
    address, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    env = cli_env(DISTFORK_HEARTBEAT_S="0.2")
    broker = subprocess.Popen([*DISTFORK, "broker", "--bind", address, "--metrics-port", str(port)], env=env)
    c = MetricsCluster(address, broker, env=env)
    c.metrics_url = f"http://127.0.0.1:{port}/metrics"
    try:
        c.start_worker()
        c.start_worker()
        c.wait_for_workers(2)
        yield c
    finally:
        c.stop()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DISTFORK, *args], env=env or cli_env(), capture_output=True, text=True, timeout=timeout_s)


def status_json(address: str) -> dict:  # type: ignore[type-arg]
    done = run_cli("status", "--address", address, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


DRIVER = """
    import json
    import numpy as np
    import distfork, tasks

    adds = distfork.wait_all([distfork.fork(tasks.add, i, 1) for i in range(N_ADDS)], timeout=60)
    a = np.ones(1_000_000)  # 8 MB: through shared memory, both ways (same host)
    total = distfork.wait(distfork.fork(tasks.fill_and_sum, a, 2.0), timeout=60)
    back = distfork.wait(distfork.fork(tasks.identity, a), timeout=60)
    try:
        distfork.wait(distfork.fork(tasks.fail, "boom"), timeout=60)
    except tasks.CustomError:
        pass
    print(json.dumps({"adds": adds, "total": total, "back": float(back.sum())}))
"""
N_ADDS = 30
ARRAY_BYTES = 8_000_000


def test_metrics_and_status_count_what_a_driver_did(cluster: MetricsCluster, tmp_path: Path) -> None:
    before = cluster.metrics()
    assert value(before, "distfork_workers_alive") == 2
    assert value(before, "distfork_tasks_submitted_total") == 0

    script = write_script(tmp_path, DRIVER.replace("N_ADDS", str(N_ADDS)))
    done = subprocess.run([sys.executable, str(script)], env={**cluster.env, "DISTFORK_ADDRESS": cluster.address},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out == {"adds": [i + 1 for i in range(N_ADDS)], "total": 2_000_000.0, "back": 1_000_000.0}

    n = N_ADDS + 3
    m = wait_until(lambda: s if value(s := cluster.metrics(), "distfork_drivers_connected") == 0 else None, 10,
                   what="the driver to leave")
    assert value(m, "distfork_tasks_submitted_total") == n
    assert value(m, "distfork_tasks_started_total") == n  # nothing lost, nothing stolen: once each
    assert value(m, "distfork_tasks_succeeded_total") == n - 1
    assert value(m, "distfork_tasks_failed_total", reason="raised") == 1
    for reason in ("lost", "timed_out", "failed"):
        assert value(m, "distfork_tasks_failed_total", reason=reason) == 0
    assert value(m, "distfork_tasks_retried_total") == 0
    assert value(m, "distfork_queue_depth") == 0 and value(m, "distfork_tasks_running") == 0
    assert value(m, "distfork_workers_alive") == 2 and value(m, "distfork_worker_slots") == 2
    assert value(m, "distfork_task_latency_seconds_count") == n
    assert value(m, "distfork_task_run_seconds_count") == n
    assert value(m, "distfork_task_latency_seconds_bucket", le="+Inf") == n
    assert value(m, "distfork_task_latency_seconds_sum") >= value(m, "distfork_task_run_seconds_sum") > 0
    # two arguments and one result of 8 MB went through shared memory; nothing as frames
    assert value(m, "distfork_payload_bytes_total", direction="task", path="shm") == 2 * ARRAY_BYTES
    assert value(m, "distfork_payload_transfers_total", direction="task", path="shm") == 2
    assert value(m, "distfork_payload_bytes_total", direction="result", path="shm") == ARRAY_BYTES
    assert value(m, "distfork_payload_transfers_total", direction="result", path="shm") == 1
    assert value(m, "distfork_payload_transfers_total", direction="task", path="inline") == n - 2
    for direction in ("task", "result"):
        assert value(m, "distfork_payload_bytes_total", direction=direction, path="frames") == 0

    snap = status_json(cluster.address)
    assert sum(w["done"] for w in snap["workers"]) == n - 1
    assert sum(w["failed"] for w in snap["workers"]) == 1
    assert snap["counters"]["tasks_succeeded"] == n - 1 and snap["counters"]["tasks_failed_raised"] == 1
    # status and /metrics are two views of the same numbers
    assert snap["metrics"]["tasks_started"] == n
    assert snap["metrics"]["payload_bytes"]["task"]["shm"] == 2 * ARRAY_BYTES
    assert snap["metrics"]["latency"]["count"] == n
    assert snap["metrics_url"] == cluster.metrics_url
    assert delta(m, before, "distfork_tasks_succeeded_total") == n - 1


def test_status_shows_each_drivers_queue_and_the_workers_memory(cluster: MetricsCluster, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    distfork.init(cluster.address)
    futs = [distfork.fork(__import__("tasks").wait_for_path, str(gate)) for _ in range(5)]
    snap = wait_until(lambda: s if (s := status_json(cluster.address))["running"] == 2 else None, 20,
                      what="both workers to take a gated task")
    (driver,) = snap["drivers"]
    assert (driver["queued"], driver["running"], driver["unfinished"], driver["done"]) == (3, 2, 5, 0)
    assert snap["queued"] == 3 and all(w["busy"] == 1 for w in snap["workers"])
    m = cluster.metrics()
    assert value(m, "distfork_queue_depth") == 3 and value(m, "distfork_tasks_running") == 2
    assert value(m, "distfork_drivers_connected") == 1

    wait_until(lambda: all(w["rss_bytes"] for w in status_json(cluster.address)["workers"]), 10,
               what="both workers to report their memory")
    table = run_cli("status", "--address", cluster.address)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    for header in ("worker", "host", "pid", "slots", "busy", "done", "failed", "rss", "heartbeat",
                   "driver", "queued", "waiting", "running", "held", "received"):
        assert any(header in line.split() for line in lines), (header, table.stdout)
    for p in cluster.workers:
        (row,) = [line for line in lines if str(p.pid) in line.split()]
        assert "MiB" in row and "ago" in row
    (row,) = [line for line in lines if driver["name"] in line]
    cells = [cell for cell in row.split() if cell != "│"]
    # queued, waiting, running, done, failed, held, received ("0 B")
    assert cells[-8:] == ["3", "0", "2", "0", "0", "0", "0", "B"]

    gate.touch()
    assert distfork.wait_all(futs, timeout=30) == ["released"] * 5
    after = wait_until(lambda: s if (s := status_json(cluster.address))["drivers"][0]["done"] == 5 else None, 10,
                       what="the broker to count the results")
    assert (after["drivers"][0]["queued"], after["drivers"][0]["running"], after["drivers"][0]["failed"]) == (0, 0, 0)


def test_status_exit_codes_for_health_checks(cluster: MetricsCluster) -> None:
    me = socket.gethostname()
    ok = run_cli("status", "--address", cluster.address, "--expect-worker-host", me)
    assert ok.returncode == 0, ok.stderr
    missing = run_cli("status", "--address", cluster.address, "--expect-worker-host", "no-such-host")
    assert missing.returncode == 3 and "no-such-host" in missing.stderr
    nobody = run_cli("status", "--address", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.5",
                     "--expect-worker-host", me)
    assert nobody.returncode == 1


def test_loadtest_report_matches_what_the_broker_counted(cluster: MetricsCluster) -> None:
    before = cluster.metrics()
    tasks, payload = 400, 100_000
    done = run_cli("loadtest", "--address", cluster.address, "--tasks", str(tasks), "--concurrency", "32",
                   "--payload-bytes", str(payload), "--result-bytes", "1000", "--warmup", "10", "--json",
                   env=cluster.env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    check_report(report, tasks, workers=2)
    assert set(report["by_worker"]) == {f"{socket.gethostname()}/{p.pid}" for p in cluster.workers}
    assert report["bytes"]["broker"]["task"]["shm"] == tasks * payload  # same host: shared memory
    assert report["bytes"]["broker"]["task"]["frames"] == 0
    assert "loadtest" in done.stderr  # the progress bar went to stderr

    after = cluster.metrics()
    assert delta(after, before, "distfork_tasks_submitted_total") == tasks + 10
    assert delta(after, before, "distfork_tasks_succeeded_total") == tasks + 10
    assert delta(after, before, "distfork_task_latency_seconds_count") == tasks + 10
    assert delta(after, before, "distfork_payload_bytes_total", direction="task", path="shm") == (tasks + 10) * payload
    snap = status_json(cluster.address)
    assert sum(w["done"] for w in snap["workers"]) == tasks + 10
    for w in snap["workers"]:  # each worker's count: its share of the report, and of the warm-up
        assert w["done"] >= report["by_worker"][f"{w['host']}/{w['pid']}"]


def test_loadtest_on_an_embedded_cluster_counts_injected_failures_and_plots(tmp_path: Path) -> None:
    png = tmp_path / "load.png"
    done = run_cli("loadtest", "--workers", "2", "--tasks", "200", "--fail-fraction", "0.1", "--concurrency", "16",
                   "--json", "--quiet", "--plot", str(png), env=cli_env(DISTFORK_HEARTBEAT_S="0.2"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["address"].startswith("ipc://") and report["workers"] == 2
    assert report["finished"] == report["submitted"] == 200
    assert report["failures"] == {"LoadTestError": 20} and report["succeeded"] == 180
    assert sum(report["by_worker"].values()) == 180
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_loadtest_for_a_duration_prints_a_report(tmp_path: Path) -> None:
    done = run_cli("loadtest", "--workers", "1", "--duration", "1", "--task-seconds", "0.01", "--concurrency", "2",
                   "--warmup", "0", env=cli_env(DISTFORK_HEARTBEAT_S="0.2"))
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for word in ("throughput", "tasks/s", "p50", "p90", "p99", "max", "failures", "none", "bytes"):
        assert word in text, (word, text)
    finished = int(text.split(" finished of ")[0].split()[-1])
    # one worker, 10 ms tasks, forking for 1 s: about 100, and never more than the time allows
    assert 20 <= finished <= 110, text


def test_up_serves_metrics_and_stops_on_sigterm() -> None:
    address, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    up = subprocess.Popen([*DISTFORK, "up", "--workers", "1", "--bind", address, "--metrics-port", str(port)],
                          env=cli_env(DISTFORK_HEARTBEAT_S="0.2"), stdout=subprocess.PIPE, text=True)
    try:
        assert LineReader(up.stdout).next(30) == address
        m = wait_until(lambda: s if value(s := scrape(f"http://127.0.0.1:{port}/metrics"),
                                          "distfork_workers_alive") == 1 else None, 20, what="the worker to register")
        assert value(m, "distfork_tasks_submitted_total") == 0
        assert query_status(address)["metrics_url"] == f"http://127.0.0.1:{port}/metrics"
        up.send_signal(signal.SIGTERM)
        assert up.wait(20) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_broker_reports_a_metrics_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("broker", "--bind", f"tcp://127.0.0.1:{free_port()}", "--metrics-port", str(port),
                       timeout_s=30)
    assert done.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr


# -- the accounting itself, without sockets ------------------------------------------

def _entry(*frames: bytes) -> Entry:
    return TaskEntry(1, 0, 0.0, list(frames))


def test_payload_paths_are_told_by_frame_layout_alone() -> None:
    manifest = json.dumps({"shm": "df-x-1-1", "size": 1 << 20, "bufs": [[0, 1000], [1024, 500]]}).encode()
    nbytes, transfers = classify([
        _entry(b"s" * 10),                                  # inline
        _entry(b"s" * 20, manifest),                        # shared memory: the manifest's buffer lengths
        _entry(b"s" * 30, b'{"bufs": [7, 9]}', b"x" * 7, b"y" * 9),  # frames
        _entry(b"s" * 5, b"not json"),                      # a bad manifest: counted, no bytes, no error
        _entry(b"s" * 5, b"[" * 70_000),                    # a huge one is not parsed at all
    ])
    assert nbytes == [70, 1500, 16]
    assert transfers == [1, 3, 1]


def test_histograms_take_each_result_once_and_latency_from_submission() -> None:
    from distfork.broker_instructions import SendTasks
    from distfork.broker_state import BrokerState
    from distfork.config import Config

    state = BrokerState(Config(), 0.0)
    metrics = BrokerMetrics(state)
    driver = state.hello(b"D1", {"role": "driver"}, 0.0)
    worker = state.hello(b"W1", {"role": "worker", "slots": 2}, 0.0)
    entries = [TaskEntry(1, 255, 0.0, [b"call"]), TaskEntry(2, 255, 0.0, [b"call"])]
    state.submit(driver, entries, now=10.0)
    metrics.tasks_in(entries)
    state.dispatch(10.0)
    (tasks,) = [ins.tasks for ins in state.take_instructions() if isinstance(ins, SendTasks)]
    assert len(tasks) == 2
    results = [ResultEntry(t.key, 0, 0.25, [b"value"]) for t in tasks]
    metrics.results_in(worker, results, now=11.5)
    state.results(worker, results, now=11.5)
    assert metrics.latency_sum_s == pytest.approx(1.5 * len(results))
    assert metrics.run_sum_s == pytest.approx(0.25 * len(results))
    assert sum(metrics.latency_buckets) == len(results) == sum(metrics.run_buckets)
    assert metrics.snapshot()["payload_bytes"]["task"]["inline"] == 8


@pytest.mark.parametrize("run_s", [float("nan"), float("inf"), -1.0])
def test_a_run_time_from_a_broken_worker_leaves_the_run_time_metric_finite(run_s: float) -> None:
    from distfork.broker_state import BrokerState
    from distfork.config import Config

    state = BrokerState(Config(), 0.0)
    metrics = BrokerMetrics(state)
    worker = state.hello(b"W1", {"role": "worker", "slots": 1}, 0.0)
    metrics.results_in(worker, [ResultEntry(1, 0, 0.5, [b"v"]), ResultEntry(2, 0, run_s, [b"v"])], now=1.0)
    assert metrics.run_sum_s == 0.5 and sum(metrics.run_buckets) == 1
