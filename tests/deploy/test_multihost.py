"""Several hosts for real: a broker host and two worker hosts in network namespaces (tests/deploy/netns.py).

The broker (``--insecure``, bound to its host's address, ``--metrics-port``)
and the workers are started through the CLI, each worker host with its own
hostname, address and /dev/shm. A driver script and ``distfork loadtest``
run on the broker host against the broker's address. Every check compares
what the cluster reports (``status --json``, ``/metrics``, the loadtest
report) with what the test made it do.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import cli_env, wait_until

from .netns import Lan, unavailable
from .opsutil import Samples, check_report, delta, parse_metrics, value

pytestmark = pytest.mark.timeout(120)

DISTFORK = [sys.executable, "-m", "distfork"]
METRICS_PORT = 9340


@dataclass
class Cluster:
    lan: Lan
    address: str
    env: dict[str, str]

    @property
    def metrics_url(self) -> str:
        return f"http://{self.lan.broker.ip}:{METRICS_PORT}/metrics"

    def on_broker_host(self, *cmd: str, timeout_s: float = 60.0) -> str:
        done = self.lan.run(self.lan.broker, *cmd, timeout_s=timeout_s, env=self.env)
        assert done.returncode == 0, f"{cmd} failed ({done.returncode}): {done.stderr}"
        return done.stdout

    def status(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.on_broker_host(*DISTFORK, "status", "--address", self.address, "--json"))

    def metrics(self) -> Samples:
        # From the broker host: nothing outside these namespaces reaches their addresses.
        fetch = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
        return parse_metrics(self.on_broker_host(sys.executable, "-c", fetch, self.metrics_url))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    reason = unavailable()
    if reason:
        pytest.skip(f"the multi-host cluster {reason}")
    lan = Lan(workers=2).up()
    address = f"tcp://{lan.broker.ip}:7340"
    env = cli_env(DISTFORK_HEARTBEAT_S="0.2", DISTFORK_INSECURE="1")  # a private test network: no keys, every role
    try:
        lan.start(lan.broker, *DISTFORK, "broker", "--bind", address, "--insecure", "--metrics-port", str(METRICS_PORT),
                  env=env)
        for host in lan.worker_hosts:  # the production path: each worker under its nanny
            lan.start(host, *DISTFORK, "worker", "--connect", address, env=env)
        c = Cluster(lan, address, env)

        def both_registered() -> bool:
            try:
                return len(c.status()["workers"]) == 2
            except AssertionError:  # the broker is not up yet
                return False

        wait_until(both_registered, 40, interval_s=0.2, what="a worker on each worker host to register")
        yield c
    finally:
        lan.down()


DRIVER = """
    import hashlib, json, sys
    import numpy as np
    import distfork, tasks

    broker_ip = sys.argv[1]
    distfork.init(f"tcp://{broker_ip}:7340")
    where = distfork.wait_all([distfork.fork(tasks.where_am_i, broker_ip, 0.05) for _ in range(N_WHERE)], timeout=60)
    a = np.random.default_rng(7).standard_normal(2_500_000)  # 20 MB: crosses hosts as a ZeroMQ frame
    back = distfork.wait(distfork.fork(tasks.identity, a), timeout=60)
    try:
        distfork.wait(distfork.fork(tasks.fail, "boom"), timeout=60)
        raised = None
    except tasks.CustomError as exc:
        raised = str(exc)
    print(json.dumps({"where": where, "same": hashlib.sha256(back).hexdigest() == hashlib.sha256(a).hexdigest(),
                      "raised": raised, "local_workers": distfork.api._runtime.driver.welcome["local_workers"]}))
"""
N_WHERE = 12
ARRAY_BYTES = 2_500_000 * 8


def test_a_driver_script_runs_forks_on_both_worker_hosts(cluster: Cluster, tmp_path: Path) -> None:
    before = cluster.metrics()
    script = tmp_path / "driver.py"
    script.write_text(__import__("textwrap").dedent(DRIVER).replace("N_WHERE", str(N_WHERE)))
    out = json.loads(cluster.on_broker_host(sys.executable, str(script), cluster.lan.broker.ip))

    hosts = {(w.hostname, w.ip) for w in cluster.lan.worker_hosts}
    ran_on = {(r["host"], r["ip"]) for r in out["where"]}
    assert ran_on == hosts  # both worker hosts, each from its own address
    assert out["local_workers"] == 0  # no worker shares the driver's /dev/shm
    assert out["same"] and out["raised"] == "boom"

    after = cluster.metrics()
    n = N_WHERE + 2
    assert delta(after, before, "distfork_tasks_submitted_total") == n
    assert delta(after, before, "distfork_tasks_succeeded_total") == n - 1
    assert delta(after, before, "distfork_tasks_failed_total", reason="raised") == 1
    assert delta(after, before, "distfork_task_latency_seconds_count") == n
    # the array went out and came back as frames, between hosts; nothing through shared memory
    assert delta(after, before, "distfork_payload_bytes_total", direction="task", path="frames") == ARRAY_BYTES
    assert delta(after, before, "distfork_payload_bytes_total", direction="result", path="frames") == ARRAY_BYTES
    for direction in ("task", "result"):
        assert delta(after, before, "distfork_payload_transfers_total", direction=direction, path="shm") == 0
    assert value(after, "distfork_workers_alive") == 2
    assert value(after, "distfork_queue_depth") == 0

    # status: every worker host's tasks, counted per worker
    snap = cluster.status()
    assert {w["host"] for w in snap["workers"]} == {h for h, _ in hosts}
    done = {w["host"]: w["done"] for w in snap["workers"]}
    ran = {h: sum(1 for r in out["where"] if r["host"] == h) for h, _ in hosts}
    assert all(done[h] >= ran[h] > 0 for h in done), (done, ran)
    assert sum(w["done"] for w in snap["workers"]) == value(after, "distfork_tasks_succeeded_total")


def test_loadtest_against_the_broker_address(cluster: Cluster) -> None:
    before = cluster.metrics()
    tasks, payload = 300, 100_000
    report = json.loads(cluster.on_broker_host(
        *DISTFORK, "loadtest", "--address", cluster.address, "--workers", "2", "--tasks", str(tasks),
        "--concurrency", "16", "--payload-bytes", str(payload), "--warmup", "8", "--json", "--quiet", timeout_s=90,
    ))
    check_report(report, tasks, workers=2)
    assert {key.split("/")[0] for key in report["by_worker"]} == {h.hostname for h in cluster.lan.worker_hosts}
    assert report["workers"] == 2 and report["address"] == cluster.address
    # the broker's count of the measured run's argument bytes: all frames, all of them
    assert report["bytes"]["broker"]["task"]["frames"] == tasks * payload
    assert report["bytes"]["broker"]["task"]["shm"] == 0

    after = cluster.metrics()
    assert delta(after, before, "distfork_tasks_succeeded_total") == tasks + 8  # and the warm-up
    assert delta(after, before, "distfork_tasks_failed_total", reason="raised") == 0
    frames = delta(after, before, "distfork_payload_bytes_total", direction="task", path="frames")
    assert frames == (tasks + 8) * payload


def test_status_table_names_the_worker_hosts(cluster: Cluster) -> None:
    table = cluster.on_broker_host(*DISTFORK, "status", "--address", cluster.address)
    assert cluster.address in table
    for host in cluster.lan.worker_hosts:
        assert host.hostname in table
    wait_until(lambda: all(w["rss_bytes"] for w in cluster.status()["workers"]), 10, interval_s=0.2,
               what="both workers to report their memory")
    assert "MiB" in cluster.on_broker_host(*DISTFORK, "status", "--address", cluster.address)
