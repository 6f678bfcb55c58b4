"""The other-host path: large buffers as ZeroMQ frames when driver and worker do not share /dev/shm.

Forced with ``DISTFORK_SHM=0``, and for real: a broker and a driver in one
network namespace, a worker in another one (on a veth pair) with a /dev/shm
of its own. The hostname and boot id are the same in both, so only the
/dev/shm "domain" (its device and inode) tells them apart.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import distfork
import tasks
from conftest import cli_env, stop_processes, wait_until

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

def _netns_unavailable() -> str | None:
    """Why two network namespaces with a private /dev/shm cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces and mount a private /dev/shm"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool}(8)"
    probe = f"df-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Hosts:
    """Two network namespaces on a veth pair: a broker "host" and a worker "host"."""

    broker_ns: str
    worker_ns: str
    broker_ip: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run_in(self, ns: str, *cmd: str, env: dict[str, str], **kwargs: object) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], env=env, **kwargs)  # type: ignore[call-overload]
        self.procs.append(p)
        return p  # type: ignore[no-any-return]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    tag = secrets.token_hex(3)
    subnet = f"10.251.{secrets.randbelow(250) + 1}"
    h = Hosts(f"df-b-{tag}", f"df-w-{tag}", f"{subnet}.1")
    made: list[str] = []
    try:
        for ns in (h.broker_ns, h.worker_ns):
            _ip("netns", "add", ns)
            made.append(ns)
        veth_b, veth_w = f"dfb{tag}", f"dfw{tag}"
        _ip("link", "add", veth_b, "type", "veth", "peer", "name", veth_w)
        _ip("link", "set", veth_b, "netns", h.broker_ns)
        _ip("link", "set", veth_w, "netns", h.worker_ns)
        for ns, dev, addr in ((h.broker_ns, veth_b, f"{subnet}.1/24"), (h.worker_ns, veth_w, f"{subnet}.2/24")):
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield h
    finally:
        stop_processes(h.procs)  # only the processes this fixture started
        for ns in made:  # takes the veth pair with it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


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


def test_worker_on_another_host_gets_and_returns_a_large_array_as_frames(hosts: Hosts, tmp_path: Path) -> None:
    address = f"tcp://{hosts.broker_ip}:7340"
    env = cli_env(DISTFORK_HEARTBEAT_S="0.2")
    hosts.run_in(hosts.broker_ns, sys.executable, "-m", "distfork", "broker", "--bind", address, "--insecure", env=env,
                 stderr=subprocess.DEVNULL)
    # The worker's "host": another network namespace, and a /dev/shm of its own.
    worker = hosts.run_in(hosts.worker_ns, "unshare", "--mount", "--propagation", "private", "sh", "-c",
                          'mount -t tmpfs tmpfs /dev/shm && exec "$0" "$@"',
                          sys.executable, "-m", "distfork", "worker", "--connect", address, "--no-nanny", env=env)

    def status() -> dict | None:  # type: ignore[type-arg]
        done = subprocess.run(["ip", "netns", "exec", hosts.broker_ns, sys.executable, "-m", "distfork", "status",
                               "--address", address, "--json", "--timeout", "2"],
                              env=env, capture_output=True, text=True, timeout=30)
        return json.loads(done.stdout) if done.returncode == 0 else None

    snap = wait_until(lambda: s if (s := status()) and s["workers"] else None, 30,
                      interval_s=0.2, what="the worker in the other namespace to register")
    assert [w["pid"] for w in snap["workers"]] == [worker.pid]

    script = write_script(tmp_path, CROSS_HOST_DRIVER)
    done = subprocess.run(["ip", "netns", "exec", hosts.broker_ns, sys.executable, str(script), address],
                          env=env, capture_output=True, text=True, timeout=90)
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
