"""Hosts for real on one machine: network namespaces on veth pairs (deploy/README.md, "Several hosts").

::

    namespace df-<tag>-b  "broker host"          namespace df-<tag>-w1  "worker-a"
    ┌────────────────────────────┐                ┌──────────────────────────────┐
    │ bridge br0 10.253.N.1/24   │── veth pair ──│ eth0 10.253.N.2/24            │
    │ distfork broker --bind     │                │ own hostname, own /dev/shm    │
    │   tcp://10.253.N.1:7340    │                │ distfork worker --connect ... │
    │ driver script, loadtest    │                └──────────────────────────────┘
    │                            │── veth pair ──  namespace df-<tag>-w2  "worker-b", 10.253.N.3
    └────────────────────────────┘

Each worker host gets a UTS namespace (its own hostname) and a mount
namespace with a private tmpfs on /dev/shm, so its processes share neither
a network, a name nor shared memory with the broker host: large arrays
travel as ZeroMQ frames, as between real machines. Only addresses inside
these namespaces are used; nothing is routed anywhere else.

Used by tests/deploy/test_multihost.py; run by hand as root for a demo::

    python tests/deploy/netns.py     # builds the hosts, starts a cluster, runs a loadtest, cleans up
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

SUBNET_PREFIX = "10.253"


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns) and mount a private /dev/shm"
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            return f"needs {tool}(1/8), which is not installed"
    probe = f"df-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    # a worker host's own hostname and /dev/shm (in namespaces of its own: nothing else changes)
    own = subprocess.run(["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c",
                          "hostname df-probe && mount -t tmpfs tmpfs /dev/shm"], capture_output=True, text=True)
    if own.returncode != 0:
        return f"`unshare --mount --uts` with a private /dev/shm is not permitted here: {own.stderr.strip()}"
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Host:
    ns: str
    ip: str
    hostname: str | None  # None: keep the machine's (the broker host)


@dataclass
class Lan:
    """A broker host and ``workers`` worker hosts on one bridged segment."""

    workers: int = 2
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: str = field(default_factory=lambda: f"{SUBNET_PREFIX}.{secrets.randbelow(250) + 1}")
    broker: Host = field(init=False)
    worker_hosts: list[Host] = field(init=False, default_factory=list)
    procs: list[subprocess.Popen[Any]] = field(init=False, default_factory=list)
    _made: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.broker = Host(f"df-{self.tag}-b", f"{self.subnet}.1", None)
        self.worker_hosts = [
            Host(f"df-{self.tag}-w{i + 1}", f"{self.subnet}.{i + 2}", f"worker-{chr(ord('a') + i)}")
            for i in range(self.workers)
        ]

    def up(self) -> Lan:
        """Make the namespaces, the bridge in the broker host and a veth pair to each worker host."""
        try:
            b = self.broker.ns
            _ip("netns", "add", b)
            self._made.append(b)
            _ip("-n", b, "link", "add", "br0", "type", "bridge")
            _ip("-n", b, "addr", "add", f"{self.broker.ip}/24", "dev", "br0")
            _ip("-n", b, "link", "set", "br0", "up")
            _ip("-n", b, "link", "set", "lo", "up")
            for i, h in enumerate(self.worker_hosts):
                _ip("netns", "add", h.ns)
                self._made.append(h.ns)
                near, far = f"dfb{self.tag}{i}", f"dfw{self.tag}{i}"  # unique names while still in our namespace
                _ip("link", "add", near, "type", "veth", "peer", "name", far)
                _ip("link", "set", near, "netns", b)
                _ip("link", "set", far, "netns", h.ns)
                _ip("-n", b, "link", "set", near, "master", "br0")
                _ip("-n", b, "link", "set", near, "up")
                _ip("-n", h.ns, "link", "set", far, "name", "eth0")
                _ip("-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
                _ip("-n", h.ns, "link", "set", "eth0", "up")
                _ip("-n", h.ns, "link", "set", "lo", "up")
        except BaseException:
            self.down()
            raise
        return self

    def command(self, host: Host, *cmd: str) -> list[str]:
        """``cmd`` as run on ``host``: in its network namespace, and for a worker host with its
        own hostname and a private /dev/shm."""
        if host.hostname is None:
            return ["ip", "netns", "exec", host.ns, *cmd]
        setup = 'hostname "$1" && mount -t tmpfs -o size=512m tmpfs /dev/shm && shift && exec "$@"'
        return ["ip", "netns", "exec", host.ns, "unshare", "--mount", "--uts", "--propagation", "private",
                "sh", "-c", setup, "sh", host.hostname, *cmd]

    def start(self, host: Host, *cmd: str, **popen: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` on ``host``; :meth:`down` stops it."""
        p = subprocess.Popen(self.command(host, *cmd), stdin=subprocess.DEVNULL, **popen)
        self.procs.append(p)
        return p

    def run(self, host: Host, *cmd: str, timeout_s: float = 60.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` on ``host`` to its end (killed after ``timeout_s``)."""
        return subprocess.run(self.command(host, *cmd), capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL, **kwargs)

    def down(self, stop_timeout_s: float = 15.0) -> None:
        """SIGTERM what we started (SIGKILL if it lingers), then delete the namespaces (and their links)."""
        for p in self.procs:  # only the processes started here
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(stop_timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()


def main() -> int:
    """A demo: three hosts, a broker and two workers through the CLI, a loadtest, then clean up."""
    reason = unavailable()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    lan = Lan().up()
    address = f"tcp://{lan.broker.ip}:7340"
    py = [sys.executable, "-m", "distfork"]
    try:
        lan.start(lan.broker, *py, "broker", "--bind", address, "--insecure", "--metrics-port", "9340")
        for h in lan.worker_hosts:
            lan.start(h, *py, "worker", "--connect", address)
        done = lan.run(lan.broker, *py, "loadtest", "--address", address, "--workers", str(len(lan.worker_hosts)),
                       "--tasks", "2000", "--payload-bytes", "100000", timeout_s=300, env=os.environ)
        print(done.stdout, done.stderr, sep="\n")
        status = lan.run(lan.broker, *py, "status", "--address", address)
        print(status.stdout, status.stderr, sep="\n")
        return done.returncode
    finally:
        lan.down()


if __name__ == "__main__":
    sys.exit(main())
