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

Each worker host may get a UTS namespace (its own hostname) and a mount
namespace with a private tmpfs on /dev/shm, so its processes share neither
a network, a name nor shared memory with the broker host: large arrays
travel as ZeroMQ frames, as between real machines. Only addresses inside
these namespaces are used; nothing is routed anywhere else.

The one place the tests make network namespaces::

    unavailable(...)   why they cannot be made here (skip with it), or None
    Namespace          one namespace of ours, loopback up: ip(), run(), prefix, delete()
    Lan                a broker host and N worker hosts on a bridge; a context manager
                       (up/down), with command(), start(), run() and set_link() for its hosts

Every veth pair is created with its ends already in their namespaces, so
deleting the namespaces a Lan made removes every link it made, and nothing else.

Used by tests/deploy/test_multihost.py, tests/integration/test_crosshost.py,
test_partition.py and secsupport.py; run by hand as root for a demo::

    python tests/deploy/netns.py     # builds the hosts, starts a cluster, runs a loadtest, cleans up
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

SUBNET_PREFIX = "10.253"


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def unavailable(*, bridge: bool = True, own_shm: bool = True, hostnames: bool = True) -> str | None:
    """Why network namespaces cannot be made here, or None.

    Always a namespace; with ``bridge`` a bridge in one, with ``own_shm`` a
    private /dev/shm and with ``hostnames`` a hostname of its own (in mount
    and UTS namespaces: nothing else changes). The defaults: what a default
    :class:`Lan` needs (:meth:`Lan.unavailable` asks for what its own needs).
    """
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns)"
    tools = ["ip", *(["unshare"] if own_shm or hostnames else []), *(["hostname"] if hostnames else [])]
    for tool in tools:
        if shutil.which(tool) is None:
            return f"needs {tool}(1/8), which is not installed"
    try:
        probe = Namespace(f"df-probe-{secrets.token_hex(3)}")
    except RuntimeError as exc:
        return f"`ip netns add` is not permitted here: {exc}"
    try:
        if bridge:
            probe.ip("link", "add", "br0", "type", "bridge")
    except RuntimeError as exc:
        return f"cannot create a bridge in a network namespace: {exc}"
    finally:
        probe.delete()
    if own_shm or hostnames:
        flags = [*(["--uts"] if hostnames else []), "--mount", "--propagation", "private"]
        setup = [*(["hostname df-probe"] if hostnames else []), "mount -t tmpfs tmpfs /dev/shm"]
        own = subprocess.run(["unshare", *flags, "sh", "-c", " && ".join(setup)], capture_output=True, text=True)
        if own.returncode != 0:
            return f"`unshare {' '.join(flags)}` with a private /dev/shm is not permitted here: {own.stderr.strip()}"
    return None


class Namespace:
    """A network namespace of our own, made here with its loopback up; :meth:`delete` removes it
    and every link in it."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"df-{secrets.token_hex(3)}"
        self.prefix = ("ip", "netns", "exec", self.name)  # put before a command to run it inside
        _ip("netns", "add", self.name)
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise

    def ip(self, *args: str) -> None:
        """``ip -n NAME ARGS``; RuntimeError with its message if it fails."""
        _ip("-n", self.name, *args)

    def run(self, *cmd: str) -> None:
        """Run ``cmd`` inside to its end; RuntimeError with its message if it fails."""
        _ip("netns", "exec", self.name, *cmd)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)


@dataclass
class Host:
    name: str  # "b" for the broker host, "w1", "w2", ... for the worker hosts
    ns: str  # its network namespace
    ip: str  # its address on the LAN
    link: str  # its interface on the LAN, in its namespace (br0 on the broker host)
    hostname: str | None = None  # None: keep the machine's
    own_shm: bool = False  # a private tmpfs on /dev/shm


@dataclass
class Lan:
    """A broker host and ``workers`` worker hosts on one bridged segment.

    ``own_shm``: each worker host has a /dev/shm of its own; ``hostnames``: and
    a hostname of its own (worker-a, worker-b, ...). The broker host has neither.
    """

    workers: int = 2
    own_shm: bool = True
    hostnames: bool = True
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: str = field(default_factory=lambda: f"{SUBNET_PREFIX}.{secrets.randbelow(250) + 1}")
    broker: Host = field(init=False)
    worker_hosts: list[Host] = field(init=False, default_factory=list)
    procs: list[subprocess.Popen[Any]] = field(init=False, default_factory=list)
    _made: list[Namespace] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.broker = Host("b", f"df-{self.tag}-b", f"{self.subnet}.1", "br0")
        self.worker_hosts = [
            Host(f"w{i + 1}", f"df-{self.tag}-w{i + 1}", f"{self.subnet}.{i + 2}", "eth0",
                 f"worker-{chr(ord('a') + i)}" if self.hostnames else None, self.own_shm)
            for i in range(self.workers)
        ]

    def unavailable(self) -> str | None:
        """Why this LAN cannot be made here, or None."""
        return unavailable(bridge=True, own_shm=self.own_shm, hostnames=self.hostnames)

    def up(self) -> Lan:
        """Make the namespaces, the bridge in the broker host and a veth pair to each worker host."""
        try:
            b = self._namespace(self.broker)
            b.ip("link", "add", "br0", "type", "bridge")
            b.ip("addr", "add", f"{self.broker.ip}/24", "dev", "br0")
            b.ip("link", "set", "br0", "up")
            for i, h in enumerate(self.worker_hosts):
                w = self._namespace(h)
                near = f"veth{i}"  # the bridge's end; each end made in its namespace, never in ours
                _ip("link", "add", near, "netns", b.name, "type", "veth", "peer", "name", h.link, "netns", w.name)
                b.ip("link", "set", near, "master", "br0")
                b.ip("link", "set", near, "up")
                w.ip("addr", "add", f"{h.ip}/24", "dev", h.link)
                w.ip("link", "set", h.link, "up")
        except BaseException:
            self.down()
            raise
        return self

    def _namespace(self, host: Host) -> Namespace:
        ns = Namespace(host.ns)
        self._made.append(ns)
        return ns

    def __enter__(self) -> Lan:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def command(self, host: Host, *cmd: str) -> list[str]:
        """``cmd`` as run on ``host``: in its network namespace, and with its own hostname and
        /dev/shm if it has them. The process started is ``cmd`` itself (each step execs the next)."""
        flags: list[str] = []
        setup: list[str] = []
        if host.hostname is not None:
            flags.append("--uts")
            setup.append(f"hostname {shlex.quote(host.hostname)}")
        if host.own_shm:
            flags += ["--mount", "--propagation", "private"]
            setup.append("mount -t tmpfs -o size=512m tmpfs /dev/shm")
        if not setup:
            return ["ip", "netns", "exec", host.ns, *cmd]
        return ["ip", "netns", "exec", host.ns, "unshare", *flags, "sh", "-c", " && ".join([*setup, 'exec "$0" "$@"']),
                *cmd]

    def start(self, host: Host, *cmd: str, **popen: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` on ``host`` (stdin: /dev/null unless given); :meth:`down` stops it."""
        popen.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(self.command(host, *cmd), **popen)
        self.procs.append(p)
        return p

    def run(self, host: Host, *cmd: str, timeout_s: float = 60.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` on ``host`` to its end (killed after ``timeout_s``)."""
        return subprocess.run(self.command(host, *cmd), capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL, **kwargs)

    def set_link(self, host: Host, state: str) -> None:
        """Take ``host``'s link to the LAN "down" (it is cut off) or "up" again."""
        _ip("-n", host.ns, "link", "set", host.link, state)

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
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None:
                    stream.close()
        self.procs.clear()
        for ns in reversed(self._made):
            ns.delete()
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
    os.environ["DISTFORK_INSECURE"] = "1"  # the broker's --insecure: its clients use no keys either
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
