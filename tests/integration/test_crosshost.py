"""The other-host path: large buffers as ZeroMQ frames when driver and worker do not share /dev/shm.

Forced with ``DISTFORK_SHM=0``, and for real: a broker and a driver in one
network namespace, a worker in another one (on a veth pair: tests/deploy/netns.py)
with a /dev/shm of its own. The hostname and boot id are the same in both, so
only the /dev/shm "domain" (its device and inode) tells them apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import distfork
import tasks
from conftest import cli_env, wait_until
from deploy.netns import Lan

from .support import embedded_cluster, embedded_ready, write_script

pytestmark = pytest.mark.timeout(120)


def session_segments(session: str) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"df-{session}-"))


# -- forced: DISTFORK_SHM=0 ------------------------------------------------------

def test_shm_disabled_large_arguments_and_results_travel_as_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTFORK_SHM", "0")  # the driver and the cluster it starts read it
    distfork.init(workers=2)
    embedded_ready(2)
    session = embedded_cluster().session
    a = np.random.default_rng(3).standard_normal(2_500_000)  # 20 MB
    sent = tasks.describe_data(a)

    got = distfork.wait(distfork.fork(tasks.describe_data, a), timeout=60)
    assert got["sha256"] == sent["sha256"] and got["shape"] == (2_500_000,)
    assert not got["backing"].startswith("/dev/shm/"), got["backing"]  # the worker read a frame
    assert got["writeable"]

    back = distfork.wait(distfork.fork(tasks.identity, a), timeout=60)
    made = distfork.wait(distfork.fork(tasks.ones, 2_500_000), timeout=60)
    assert tasks.describe_data(back)["sha256"] == sent["sha256"]
    assert (made == 1.0).all() and made.shape == (2_500_000,)
    for r in (back, made):
        backing = tasks.mapping_of(r.ctypes.data)
        assert backing is not None and not backing.startswith("/dev/shm/"), backing
        assert r.flags.writeable
    back[:10] = 0.0  # writable in place, and ours alone
    made[-10:] = 2.0
    assert back[10] == a[10] and made.sum() == 2_500_000 + 10
    assert session_segments(session) == []  # nothing of this cluster was ever in /dev/shm


# -- for real: network namespaces ------------------------------------------------

@pytest.fixture
def lan() -> Iterator[Lan]:
    """A broker "host" and one worker "host" with a /dev/shm of its own (and the machine's hostname)."""
    hosts = Lan(workers=1, hostnames=False)
    reason = hosts.unavailable()
    if reason:
        pytest.skip(reason)
    with hosts:  # stops the processes it started, deletes the namespaces it made
        yield hosts


CROSS_HOST_DRIVER = """
    import json, os, sys
    import numpy as np
    import distfork, tasks

    distfork.init(sys.argv[1])
    driver = distfork.api._runtime.driver
    session = driver.welcome["session"]
    a = np.random.default_rng(5).standard_normal(6_250_000)  # 50 MB
    got = distfork.wait(distfork.fork(tasks.describe_data, a), timeout=60)
    back = distfork.wait(distfork.fork(tasks.identity, a), timeout=60)
    out = {
        "local_workers": driver.welcome["local_workers"],
        "sent": tasks.describe_data(a)["sha256"],
        "got": got["sha256"],
        "worker_pid": got["pid"],
        "worker_backing": got["backing"],
        "back": tasks.describe_data(back)["sha256"],
        "back_backing": tasks.mapping_of(back.ctypes.data),
        "back_writeable": bool(back.flags.writeable),
        "segments": sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"df-{session}-")),
    }
    distfork.shutdown()
    print(json.dumps(out), flush=True)
"""


def test_worker_on_another_host_gets_and_returns_a_large_array_as_frames(lan: Lan, tmp_path: Path) -> None:
    address = f"tcp://{lan.broker.ip}:7340"
    env = cli_env(DISTFORK_HEARTBEAT_S="0.2", DISTFORK_INSECURE="1")  # a private test network: no keys, every role
    lan.start(lan.broker, sys.executable, "-m", "distfork", "broker", "--bind", address, "--insecure", env=env,
              stderr=subprocess.DEVNULL)
    # The worker's "host": another network namespace, and a /dev/shm of its own.
    (worker_host,) = lan.worker_hosts
    worker = lan.start(worker_host, sys.executable, "-m", "distfork", "worker", "--connect", address, "--no-nanny",
                       env=env)

    def status() -> dict | None:  # type: ignore[type-arg]
        done = lan.run(lan.broker, sys.executable, "-m", "distfork", "status", "--address", address, "--json",
                       "--timeout", "2", env=env, timeout_s=30)
        return json.loads(done.stdout) if done.returncode == 0 else None

    snap = wait_until(lambda: s if (s := status()) and s["workers"] else None, 30,
                      interval_s=0.2, what="the worker in the other namespace to register")
    assert [w["pid"] for w in snap["workers"]] == [worker.pid]

    script = write_script(tmp_path, CROSS_HOST_DRIVER)
    done = lan.run(lan.broker, sys.executable, str(script), address, env=env, timeout_s=90)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["local_workers"] == 0  # same hostname and boot, another /dev/shm: not "local"
    assert out["worker_pid"] == worker.pid
    assert out["got"] == out["sent"] and out["back"] == out["sent"]
    assert not out["worker_backing"].startswith("/dev/shm/"), out["worker_backing"]
    assert not out["back_backing"].startswith("/dev/shm/"), out["back_backing"]
    assert out["back_writeable"]
    assert out["segments"] == []

    after = status()
    assert after is not None
    assert [(w["pid"], w["done"]) for w in after["workers"]] == [(worker.pid, 2)]
