"""A network partition for real: one worker host's link cut mid-run, then restored.

Three network namespaces stand for three hosts: the broker's (with a bridge)
and two worker hosts, each on a veth pair plugged into that bridge, all on
10.252.N.0/24. The broker binds its host's address (``--insecure``: a
private test network), one ``distfork worker --no-nanny`` runs on each worker
host, and a driver script runs on the broker's host. Mid-run the test takes
one worker host's link down: the task in flight there finishes on the other
host, and every future completes. With the link up again, the cut worker
says hello again, shows in ``distfork status``, and runs tasks.

Needs root and ``ip netns`` (skipped elsewhere, with the reason).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import cli_env, stop_processes, wait_until

from .support import LineReader, write_script

pytestmark = pytest.mark.timeout(150)

N_TASKS = 12
TASK_S = 0.4


def _netns_unavailable() -> str | None:
    """Why network namespaces joined by a bridge cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs ip(8) (iproute2)"
    probe = f"dfp-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    try:
        bridge = subprocess.run(["ip", "-n", probe, "link", "add", "br0", "type", "bridge"],
                                capture_output=True, text=True)
        if bridge.returncode != 0:
            return f"cannot create a bridge in a network namespace: {bridge.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Net:
    """The broker host and two worker hosts, and the processes started in them."""

    tag: str
    subnet: str
    broker_ns: str
    worker_ns: dict[str, str]  # host name ("w1", "w2") -> its namespace
    links: dict[str, str]  # host name -> its end of the veth pair (inside its namespace)
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def broker_ip(self) -> str:
        return f"{self.subnet}.1"

    def run_in(self, ns: str, *cmd: str, env: dict[str, str], **kwargs: Any) -> subprocess.Popen[Any]:
        # `ip netns exec` execs the command: the pid we get is the command's own.
        p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], env=env, **kwargs)
        self.procs.append(p)
        return p

    def set_link(self, host: str, state: str) -> None:
        ip("-n", self.worker_ns[host], "link", "set", self.links[host], state)


@pytest.fixture
def net() -> Iterator[Net]:
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    tag = secrets.token_hex(3)
    n = Net(tag, f"10.252.{secrets.randbelow(250) + 1}", f"dfp-b-{tag}",
            {h: f"dfp-{h}-{tag}" for h in ("w1", "w2")}, {})
    made: list[str] = []
    try:
        ip("netns", "add", n.broker_ns)
        made.append(n.broker_ns)
        ip("-n", n.broker_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", n.broker_ns, "addr", "add", f"{n.broker_ip}/24", "dev", "br0")
        ip("-n", n.broker_ns, "link", "set", "br0", "up")
        ip("-n", n.broker_ns, "link", "set", "lo", "up")
        for i, (host, ns) in enumerate(n.worker_ns.items(), start=2):
            ip("netns", "add", ns)
            made.append(ns)
            bridge_end, host_end = f"dfpb{host}{tag}", f"dfph{host}{tag}"
            ip("link", "add", bridge_end, "type", "veth", "peer", "name", host_end)
            ip("link", "set", bridge_end, "netns", n.broker_ns)
            ip("link", "set", host_end, "netns", ns)
            ip("-n", n.broker_ns, "link", "set", bridge_end, "master", "br0")
            ip("-n", n.broker_ns, "link", "set", bridge_end, "up")
            ip("-n", ns, "addr", "add", f"{n.subnet}.{i}/24", "dev", host_end)
            ip("-n", ns, "link", "set", host_end, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            n.links[host] = host_end
        yield n
    finally:
        stop_processes(n.procs)  # only the processes this fixture started
        for p in n.procs:
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None:
                    stream.close()
        for ns in made:  # takes the veth pairs and the bridge with it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


DRIVER = """
    import json, sys, time
    import distfork, tasks
    from distfork.status import query_status

    address, marker_dir, n, task_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])

    def say(**facts):
        print(json.dumps(facts), flush=True)

    def worker_pids():
        return sorted(w["pid"] for w in query_status(address)["workers"])

    def wait_for(predicate, what, timeout_s=60.0):
        deadline = time.monotonic() + timeout_s
        while not (value := predicate()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.05)
        return value

    wait_for(lambda: len(worker_pids()) == 2, "two workers")
    distfork.init(address)
    futs = [distfork.fork(tasks.host_identity, i, task_s, marker_dir) for i in range(n)]
    say(event="forked")
    results = distfork.wait_all(futs, timeout=90)  # the test cuts a link meanwhile
    say(event="finished", results=results, workers=worker_pids())

    cut_pid = int(sys.stdin.readline())  # the test restored the link of this worker
    wait_for(lambda: cut_pid in worker_pids(), "the cut worker to say hello again")
    rejoined = worker_pids()
    ran_there = []
    deadline = time.monotonic() + 60
    while not any(pid == cut_pid for _, _, pid in ran_there) and time.monotonic() < deadline:
        batch = [distfork.fork(tasks.host_identity, 1000 + i, 0.05, marker_dir) for i in range(6)]
        ran_there += distfork.wait_all(batch, timeout=60)
    say(event="rejoined", workers=rejoined, results=ran_there)
    distfork.shutdown()
"""


def test_a_cut_worker_host_loses_its_tasks_to_the_other_and_rejoins_when_restored(net: Net, tmp_path: Path) -> None:
    address = f"tcp://{net.broker_ip}:7340"
    env = cli_env(DISTFORK_HEARTBEAT_S="0.2")
    net.run_in(net.broker_ns, sys.executable, "-m", "distfork", "broker", "--bind", address, "--insecure", env=env,
               stderr=subprocess.DEVNULL)
    workers = {
        host: net.run_in(ns, sys.executable, "-m", "distfork", "worker", "--connect", address, "--no-nanny",
                         env={**env, "DISTFORK_TEST_HOST": host})
        for host, ns in net.worker_ns.items()
    }
    markers = tmp_path / "markers"
    markers.mkdir()
    script = write_script(tmp_path, DRIVER)
    driver = net.run_in(net.broker_ns, sys.executable, str(script), address, str(markers), str(N_TASKS), str(TASK_S),
                        env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = LineReader(driver.stdout)
    assert out.next_json(60) == {"event": "forked"}

    def in_flight_on_w1() -> set[int]:
        names = set(os.listdir(markers))
        return {int(name.split("-")[1]) for name in names
                if name.startswith("start-") and name.endswith("-w1") and f"done-{name[6:]}" not in names}

    wait_until(in_flight_on_w1, 30, interval_s=0.005, what="a task to start on host w1")
    net.set_link("w1", "down")  # host w1 is cut off mid-task
    cut_at = in_flight_on_w1()  # started on w1, not finished there when it was cut off
    assert cut_at

    finished = out.next_json(90)
    assert finished["event"] == "finished"
    results = {i: (host, pid) for i, host, pid in finished["results"]}
    assert sorted(results) == list(range(N_TASKS))  # every future completed, with its own value
    for i in cut_at:
        assert results[i] == ("w2", workers["w2"].pid), f"task {i}, in flight on the cut host, finished {results[i]}"
    assert finished["workers"] == [workers["w2"].pid]  # the cut worker was given up on
    assert workers["w1"].poll() is None  # though it still runs, cut off

    net.set_link("w1", "up")
    assert driver.stdin is not None
    driver.stdin.write(f"{workers['w1'].pid}\n")
    driver.stdin.flush()
    rejoined = out.next_json(90)
    assert rejoined["event"] == "rejoined"
    assert rejoined["workers"] == sorted(p.pid for p in workers.values())  # status shows it again ...
    assert ["w1", workers["w1"].pid] in [[host, pid] for _, host, pid in rejoined["results"]]  # ... and it runs tasks
    assert driver.wait(30) == 0
    assert all(p.poll() is None for p in workers.values())
