"""A network partition for real: one worker host's link cut mid-run, then restored.

Three network namespaces stand for three hosts (tests/deploy/netns.py): the
broker's (with a bridge) and two worker hosts, each on a veth pair plugged
into that bridge, all on one /24. The broker binds its host's address
(``--insecure``: a private test network), one ``distfork worker --no-nanny``
runs on each worker host, and a driver script runs on the broker's host. Mid-run the test takes
one worker host's link down: the task in flight there finishes on the other
host, and every future completes. With the link up again, the cut worker
says hello again, shows in ``distfork status``, and runs tasks.

Needs root and ``ip netns`` (skipped elsewhere, with the reason).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import cli_env, wait_until
from deploy.netns import Lan

from .support import LineReader, write_script

pytestmark = pytest.mark.timeout(150)

N_TASKS = 12
TASK_S = 0.4


@pytest.fixture
def lan() -> Iterator[Lan]:
    """The broker host and worker hosts w1 and w2 (sharing the machine's hostname and /dev/shm)."""
    hosts = Lan(workers=2, own_shm=False, hostnames=False)
    reason = hosts.unavailable()
    if reason:
        pytest.skip(reason)
    with hosts:  # stops the processes it started, deletes the namespaces (and links) it made
        yield hosts


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


def test_a_cut_worker_host_loses_its_tasks_to_the_other_and_rejoins_when_restored(lan: Lan, tmp_path: Path) -> None:
    address = f"tcp://{lan.broker.ip}:7340"
    env = cli_env(DISTFORK_HEARTBEAT_S="0.2", DISTFORK_INSECURE="1")  # a private test network: no keys, every role
    lan.start(lan.broker, sys.executable, "-m", "distfork", "broker", "--bind", address, "--insecure", env=env,
              stderr=subprocess.DEVNULL)
    hosts = {host.name: host for host in lan.worker_hosts}  # "w1", "w2"
    workers = {
        name: lan.start(host, sys.executable, "-m", "distfork", "worker", "--connect", address, "--no-nanny",
                        env={**env, "DISTFORK_TEST_HOST": name})
        for name, host in hosts.items()
    }
    markers = tmp_path / "markers"
    markers.mkdir()
    script = write_script(tmp_path, DRIVER)
    driver = lan.start(lan.broker, sys.executable, str(script), address, str(markers), str(N_TASKS), str(TASK_S),
                       env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = LineReader(driver.stdout)
    assert out.next_json(60) == {"event": "forked"}

    def in_flight_on_w1() -> set[int]:
        names = set(os.listdir(markers))
        return {int(name.split("-")[1]) for name in names
                if name.startswith("start-") and name.endswith("-w1") and f"done-{name[6:]}" not in names}

    wait_until(in_flight_on_w1, 30, interval_s=0.005, what="a task to start on host w1")
    lan.set_link(hosts["w1"], "down")  # host w1 is cut off mid-task
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

    lan.set_link(hosts["w1"], "up")
    assert driver.stdin is not None
    driver.stdin.write(f"{workers['w1'].pid}\n")
    driver.stdin.flush()
    rejoined = out.next_json(90)
    assert rejoined["event"] == "rejoined"
    assert rejoined["workers"] == sorted(p.pid for p in workers.values())  # status shows it again ...
    assert ["w1", workers["w1"].pid] in [[host, pid] for _, host, pid in rejoined["results"]]  # ... and it runs tasks
    assert driver.wait(30) == 0
    assert all(p.poll() is None for p in workers.values())
