"""Fixtures shared by every test: leak checks, a CLI-started cluster, the embedded runtime.

Every multi-process test cleans up after itself; ``no_leaks`` (autouse) fails
a test that leaves a child process or a /dev/shm segment of ours behind.
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

import distfork
from distfork.status import query_status

# The tests' own default credentials (distfork makes a user's keys on first use under
# $XDG_CONFIG_HOME/distfork): one private directory per test session, never root's real
# ~/.config. Set here, so the driver in this process and every process a test starts see it.
CONFIG_HOME = tempfile.mkdtemp(prefix="distfork-test-config-")
os.environ["XDG_CONFIG_HOME"] = CONFIG_HOME


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(CONFIG_HOME, ignore_errors=True)


ROOT = Path(__file__).resolve().parent.parent
# Task functions live in tests/tasks.py; workers import them by reference.
TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)


def _shm_segments() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if "distfork" in n or n.startswith(("df-", "df_"))}
    except FileNotFoundError:
        return set()


_SEGMENT = re.compile(
    r"^df-(?P<session>[0-9a-f]+)-(?P<pid>\d+)-\d+-[0-9a-f]{16}(?:-(?P<owner>\d+)-\d+)?$"
)
# Names of distfork versions before the random part (other test runs on this machine may use one).
_LEGACY_SEGMENT = re.compile(r"^df-(?P<session>[0-9a-f]+)-(?P<pid>\d+)-\d+(?:-(?P<owner>\d+))?$")


def _made_by(names: set[str], pids: set[int]) -> set[str]:
    """The segments among ``names`` created by, or handed to, one of ``pids``.

    Names are df-<session>-<creator pid>-<creator start>-<random>, with
    -<owner pid>-<owner start> appended while a result segment belongs to
    the driver it was sent to (see distfork/shm.py).

    Other projects' sessions may run on this machine at the same time: a
    segment is ours only if one of our processes made it.
    """
    out = set()
    for name in names:
        m = _SEGMENT.match(name) or _LEGACY_SEGMENT.match(name)
        if m is None or int(m["pid"]) in pids or (m["owner"] and int(m["owner"]) in pids):
            out.add(name)
    return out


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.02, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves child processes or shared-memory segments behind.

    A runtime that exists before the test started belongs to a fixture of a
    wider scope (``shared_cluster``): it is left running, but the test must
    not have replaced it. Any other runtime is shut down after the test.
    """
    me = psutil.Process()
    children_before = {p.pid for p in me.children(recursive=True)}
    ours = {me.pid, *children_before}  # every process that may have made a segment of ours
    shm_before = _shm_segments()
    runtime_before = distfork.api._runtime
    yield
    ours.update(p.pid for p in me.children(recursive=True))
    replaced = runtime_before is not None and distfork.api._runtime is not runtime_before
    gc.collect()  # result arrays in reference cycles: their segments go back once they are freed
    if runtime_before is None or replaced:
        distfork.shutdown()

    def leftover() -> list[psutil.Process]:
        return [p for p in me.children(recursive=True) if p.pid not in children_before and _alive(p)]

    deadline = time.monotonic() + 10
    while leftover() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = leftover()
    for p in left:  # only processes this test started
        p.kill()
    assert not left, f"test left processes running: {[(p.pid, p.cmdline()) for p in left]}"
    new_shm = _made_by(_shm_segments() - shm_before, ours)
    if not replaced and runtime_before is not None and runtime_before.driver is not None:
        # The wider fixture's cluster still runs: its warm spare segments are
        # its own, checked when that fixture ends.
        live = f"df-{runtime_before.driver._session}-"
        new_shm = {n for n in new_shm if not n.startswith(live)}
    assert not new_shm, f"test left shared-memory segments: {sorted(new_shm)}"
    assert not replaced, "the test shut down or replaced the runtime of a module-scoped fixture"


def stop_processes(procs: Iterable[subprocess.Popen[Any]], timeout_s: float = 15.0) -> None:
    """SIGTERM every process (only ones the test started), then wait; SIGKILL what does not stop."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # No empty entry: it would put the working directory on every child's sys.path.
    paths = [TESTS_DIR, str(ROOT), *env.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.pop("DISTFORK_ADDRESS", None)
    env.update(extra)
    return env


@dataclass
class CliCluster:
    """A broker and workers started as separate ``distfork`` CLI processes."""

    address: str
    broker: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def start_worker(self, *args: str) -> subprocess.Popen[bytes]:
        # --no-nanny: the process we start is the worker itself, so its pid is
        # the one that runs tasks (the nanny is tested on its own).
        p = subprocess.Popen(
            [sys.executable, "-m", "distfork", "worker", "--connect", self.address, "--no-nanny", *args], env=self.env
        )
        self.workers.append(p)
        return p

    def wait_for_workers(self, n: int, timeout_s: float = 20.0) -> dict:  # type: ignore[type-arg]
        return wait_until(lambda: s if len((s := query_status(self.address))["workers"]) >= n else None,
                          timeout_s, what=f"{n} workers to register")

    def kill_broker(self) -> None:
        """SIGKILL the broker (a process this test started) and reap it."""
        self.broker.send_signal(signal.SIGKILL)
        assert self.broker.wait(10) == -signal.SIGKILL

    def restart_broker(self) -> None:
        """A new broker on the same address; :meth:`stop` stops it."""
        self.broker = _start_broker(self.address, self.env)

    def stop(self) -> None:
        procs = [*self.workers, self.broker]
        stop_processes(procs)


def _start_broker(address: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "distfork", "broker", "--bind", address], env=env)


@pytest.fixture
def cli_cluster() -> Iterator[CliCluster]:
    """``distfork broker`` and two ``distfork worker`` processes on a free TCP port."""
    address = f"tcp://127.0.0.1:{free_port()}"
    env = cli_env(DISTFORK_HEARTBEAT_S="0.2")
    broker = _start_broker(address, env)
    cluster = CliCluster(address, broker, env=env)
    try:
        cluster.start_worker()
        cluster.start_worker()
        cluster.wait_for_workers(2)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[list[int]]:
    """The embedded local cluster with two workers, started once for a module; yields the worker pids.

    ``no_leaks`` leaves it running between the module's tests (each test must
    leave it as it found it); at the end of the module it is shut down and
    every one of its processes must be gone. A module that also has tests
    with a runtime of their own uses ``class_cluster`` in classes instead.
    """
    yield from _shared_cluster()


@pytest.fixture(scope="class")
def class_cluster() -> Iterator[list[int]]:
    """``shared_cluster`` for the tests of one class."""
    yield from _shared_cluster()


def _shared_cluster() -> Iterator[list[int]]:
    distfork.init(workers=2)
    rt = distfork.api._runtime
    assert rt is not None and rt.cluster is not None
    procs = [psutil.Process(pid) for pid in rt.cluster.pids]
    session = f"df-{rt.cluster.session}-"
    try:
        status = wait_until(lambda: s if len((s := query_status(rt.cluster.address))["workers"]) >= 2 else None,
                            20.0, what="2 workers to register")
        yield sorted(w["pid"] for w in status["workers"])
    finally:
        distfork.shutdown()
    left = [p for p in procs if _alive(p)]
    assert not left, f"the shared cluster left processes running: {[p.pid for p in left]}"
    left_shm = sorted(n for n in _shm_segments() if n.startswith(session))
    assert not left_shm, f"the shared cluster left shared-memory segments: {left_shm}"


@pytest.fixture
def local_cluster() -> Iterator[None]:
    """The embedded local cluster with two workers, shut down afterwards."""
    distfork.init(workers=2)
    try:
        yield
    finally:
        distfork.shutdown()
