"""Supervised processes: the local cluster, and the nanny of ``distfork worker``.

::

    this process ──Popen──▶ python -m distfork broker --bind ADDRESS --parent-pid PID
      │          ──Popen──▶ python -m distfork worker --connect ADDRESS --no-nanny --parent-pid PID  (× N)
      │     (on Linux: the same command lines, forked by one pre-imported fork server
      │      instead, see forkserver.py)
      └─ thread "distfork-supervisor": every 0.1 s, poll the children;
            a worker that ended (crash, SIGKILL, OOM, or it ended itself to stop
            a cancelled or timed-out task) ─▶ EXITED(host, pid, code) to the broker
            (its tasks are re-queued at once, and a failure names the exit),
            then a new worker takes its place; a broker that died is restarted
            on the same address (drivers and workers re-register by themselves)

The children run the same command lines users type, so the embedded
cluster exercises the real entry points; a fork server that died is
replaced, and with it the broker and workers it had forked. They watch their parent
and stop when it is gone, even if it was SIGKILLed. :meth:`Supervisor.stop`
sends SIGTERM (workers first, so their goodbyes reach the broker), waits
``stop_timeout_s``, then SIGKILLs what is left; it only ever signals the
pids it started.

The embedded cluster (``fork`` with nothing configured) listens on an
``ipc://`` socket in a private temporary directory: its address is known
before the broker starts, so broker and workers start in parallel, and no
TCP port is opened at all. ``distfork up`` passes a ``tcp://`` address.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import zmq

from . import protocol, security, shm
from .config import Config
from .forkserver import COMMAND, ForkedProcess, ForkServer
from .protocol import Msg

__all__ = ["LocalCluster", "Supervisor", "oom_kill_count"]

log = logging.getLogger(__name__)

_POLL_S = 0.1
_MAX_BACKOFF_S = 5.0
_YOUNG_S = 2.0  # a worker that dies younger than this, on its own, may be crash-looping
#: Set in a supervised worker's environment: the directory where it marks (a file named after its
#: pid) that it finished a task, so that its death is not taken for a crash loop.
PROGRESS_DIR_ENV = "DISTFORK_PROGRESS_DIR"

_SupervisorT = TypeVar("_SupervisorT", bound="Supervisor")
#: A process we started: a subprocess, or a child of our fork server.
Process = subprocess.Popen[bytes] | ForkedProcess


class Supervisor:
    """Keeps ``workers`` worker processes (and optionally a broker) running for ``address``."""

    def __init__(
        self,
        config: Config,
        address: str,
        workers: int,
        slots: int | None = None,
        broker_args: list[str] | None = None,
        fork_server: bool = False,
    ) -> None:
        self.config = config
        self.address = address
        self.n_workers = workers
        self.slots = slots or config.slots
        self.broker_args = broker_args  # None: no broker of ours
        self.broker: Process | None = None
        self.workers: list[Process] = []
        # Fork the processes from one pre-imported interpreter (see forkserver.py) instead of starting each.
        self.fork_server = fork_server
        self._server: ForkServer | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # The supervisor thread's: when each worker started, when each dead one is replaced.
        self._started: dict[int, float] = {}
        self._restart_at: dict[int, float] = {}
        # Per slot (a worker and its replacements; keyed by the slot's first pid): its back-off
        # and how its last worker ended. pid -> slot of each live worker.
        self._backoff_s: dict[int, float] = {}
        self._last_exit: dict[int, int] = {}
        self._slot: dict[int, int] = {}
        self._progress_dir: str | None = None
        self._report: Callable[[int, int], None] = lambda pid, code: None  # EXITED to the broker

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Workers import the driver's modules by reference: give them its path.
        # Its own sys.path, as it is: the working directory only if the driver itself imports from it
        # ('' on sys.path: python -c, -m, the REPL), never added on its own.
        # (PYTHONPATH's own entries are in it already; an empty one would mean the working directory.)
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(os.path.abspath(p) for p in sys.path))
        env.pop("DISTFORK_ADDRESS", None)
        if self._progress_dir is None:
            self._progress_dir = tempfile.mkdtemp(prefix="distfork-progress-")
        env[PROGRESS_DIR_ENV] = self._progress_dir
        # The children run with our configuration, ``init(**overrides)`` included
        # (a worker's oob threshold decides how its results travel).
        for f in dataclasses.fields(self.config):
            env[f"DISTFORK_{f.name.upper()}"] = str(getattr(self.config, f.name))
        return env

    def _spawn(self, *args: str) -> Process:
        if not self.fork_server:
            cmd = [*COMMAND, *args, "--parent-pid", str(os.getpid())]
            return subprocess.Popen(cmd, env=self._env(), stdin=subprocess.DEVNULL)
        try:
            return self._fork(args)
        except RuntimeError:  # the server died just now: one more try, with a new one
            return self._fork(args)

    def _fork(self, args: Sequence[str]) -> ForkedProcess:
        """``distfork *args`` forked by our fork server, started (again) if there is none or it is gone."""
        if self._server is None or not self._server.alive:
            if self._server is not None:
                log.error("the fork server (pid %d) is gone; starting another", self._server.pid)
                self._server.close()
            self._server = ForkServer(self._env(), self.config.connect_timeout_s)
        return self._server.spawn([*args, "--parent-pid", str(self._server.pid)])

    def _spawn_worker(self) -> Process:
        return self._spawn("worker", "--connect", self.address, "--slots", str(self.slots), "--no-nanny")

    def _spawn_broker(self) -> Process:
        assert self.broker_args is not None
        return self._spawn("broker", "--bind", self.address, *self.broker_args)

    def start(self: _SupervisorT) -> _SupervisorT:
        if self.broker_args is not None:
            self.broker = self._spawn_broker()
            if not self.address.startswith("ipc://"):
                self._wait_for_broker()  # a TCP port may be taken: know before starting workers
        with self._lock:
            self.workers = [self._spawn_worker() for _ in range(self.n_workers)]
        self._started = {p.pid: time.monotonic() for p in self.workers}
        self._slot = {p.pid: p.pid for p in self.workers}
        self._thread = threading.Thread(target=self._watch, name="distfork-supervisor", daemon=True)
        self._thread.start()
        return self

    def _wait_for_broker(self) -> None:
        from .status import query_status

        deadline = time.monotonic() + self.config.connect_timeout_s
        while time.monotonic() < deadline:
            assert self.broker is not None
            code = self.broker.poll()
            if code is not None:
                raise RuntimeError(f"the broker exited with code {code} before it served {self.address}")
            try:
                query_status(self.address, timeout_s=0.5)
                return
            except TimeoutError:
                continue
        raise TimeoutError(f"the broker did not answer at {self.address} within {self.config.connect_timeout_s} s")

    @property
    def refused(self) -> bool:
        """Every worker was refused by the broker (wrong keys): nothing left to supervise."""
        return self.n_workers > 0 and not self.workers and self._thread is not None

    @property
    def server_pid(self) -> int | None:
        """The fork server's pid (it started the broker and the workers), if there is one."""
        server = self._server
        return server.pid if server is not None else None

    @property
    def pids(self) -> list[int]:
        with self._lock:
            procs = ([self.broker] if self.broker else []) + self.workers
            return [p.pid for p in procs]

    # -- the supervisor thread ------------------------------------------------

    def _watch(self) -> None:
        ctx = zmq.Context()
        sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        security.secure_client(sock, security.client_keys(self.config, self.address, role="worker"))
        sock.connect(self.address)
        host = socket.gethostname()

        oom_kills = [oom_kill_count()]

        def report(pid: int, code: int) -> None:
            body: dict[str, Any] = {"host": host, "pid": pid, "code": code}
            if code == -signal.SIGKILL:  # the OOM killer's signal: did it act since we last looked?
                count, oom_kills[0] = oom_kills[0], oom_kill_count()
                body["oom"] = count is not None and oom_kills[0] is not None and oom_kills[0] > count
            try:
                # NOBLOCK: a broker that refused our key dropped the connection for good; a blocking
                # send would hang this thread, and the `distfork worker` nanny with it.
                sock.send_multipart(protocol.encode_json(Msg.EXITED, body), zmq.NOBLOCK)
            except zmq.Again:
                pass

        self._report = report
        try:
            while not self._stopping.wait(_POLL_S):
                self.check(time.monotonic())
        finally:
            sock.close(linger=0)
            ctx.term()

    def check(self, now: float) -> None:
        """One round of the supervisor thread: restart a dead broker; report dead workers at once,
        and replace each when its back-off is over."""
        if self.broker is not None and self.broker.poll() is not None:
            log.error("the broker (pid %d) exited with code %s; restarting it", self.broker.pid, self.broker.returncode)
            with self._lock:
                self.broker = self._spawn_broker()
        for p in list(self.workers):
            if p.pid in self._restart_at:
                continue  # reported already, waiting for its back-off
            code = p.poll()
            if code is None:
                continue
            self._report(p.pid, code)
            slot = self._slot.pop(p.pid, p.pid)
            if code == security.EXIT_REFUSED:
                log.error("worker pid %d was refused by the broker (see its log); not restarting it", p.pid)
                with self._lock:
                    self.workers.remove(p)
                continue
            log.warning("worker pid %d exited with %s; starting another", p.pid,
                        f"code {code}" if code >= 0 else f"signal {-code}")
            # A slot that crash-loops on its own (a broken install) is restarted more and more
            # slowly; one killed while working (it finished tasks) is replaced at once, as is every
            # other slot meanwhile.
            lived_s = now - self._started.pop(p.pid, now)
            backoff_s = self._backoff_s.get(slot, 0.0)
            backoff_s = min(_MAX_BACKOFF_S, backoff_s * 2 or _POLL_S) if self._crash_loops(slot, p.pid, code, lived_s) \
                else 0.0
            self._backoff_s[slot] = backoff_s
            self._last_exit[slot] = code
            self._slot[p.pid] = slot  # until it is replaced
            self._restart_at[p.pid] = now + backoff_s
        for p in list(self.workers):
            at = self._restart_at.get(p.pid)
            if at is None or now < at:
                continue
            del self._restart_at[p.pid]
            with self._lock:
                new = self._spawn_worker()
                self.workers[self.workers.index(p)] = new
            self._started[new.pid] = now
            self._slot[new.pid] = self._slot.pop(p.pid, p.pid)
            self.restarts += 1

    def _crash_loops(self, slot: int, pid: int, code: int, lived_s: float) -> bool:
        """Whether a worker that just ended is its slot crash-looping on its own: it died young and
        either finished no task, or ended with the same error code as the slot's last worker.

        A worker killed while working (by a signal, after finishing tasks) is not; nor one that
        ended itself to stop a cancelled or timed-out task.
        """
        from .worker import ABORT_EXIT_CODE

        if code == ABORT_EXIT_CODE or lived_s >= _YOUNG_S:
            return False
        same_error = code > 0 and self._last_exit.get(slot) == code
        return same_error or not self._progressed(pid)

    def _progressed(self, pid: int) -> bool:
        """Whether worker ``pid`` finished a task (it marked so in our progress directory); forgets it."""
        if self._progress_dir is None:
            return False
        try:
            os.unlink(os.path.join(self._progress_dir, str(pid)))
        except OSError:
            return False
        return True

    # -- stopping ---------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM the workers, then the broker; SIGKILL what does not stop in time."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        for group in (self.workers, [self.broker] if self.broker else []):
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.config.stop_timeout_s
            for p in group:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("process %d did not stop on SIGTERM; killing it", p.pid)
                    p.kill()
                    p.wait()
        with self._lock:
            self.workers = []
            self.broker = None
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._progress_dir is not None:
            shutil.rmtree(self._progress_dir, ignore_errors=True)
            self._progress_dir = None


def oom_kill_count(cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """How many processes the kernel's OOM killer ended in our memory cgroup, or None if that is not
    readable here: ``oom_kill`` of cgroup v2 ``memory.events``, or of v1 ``memory.oom_control``."""
    paths = {"": ""}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "" or "memory" in controllers.split(","):
                    paths[controllers] = path.lstrip("/")
    except (OSError, ValueError):
        return None
    candidates = []
    if "memory" in paths:  # v1; in a container, our own cgroup may be mounted as the root
        candidates += [os.path.join(cgroup_root, "memory", paths["memory"], "memory.oom_control"),
                       os.path.join(cgroup_root, "memory", "memory.oom_control")]
    candidates += [os.path.join(cgroup_root, paths[""], "memory.events"), os.path.join(cgroup_root, "memory.events")]
    for candidate in candidates:
        try:
            with open(candidate) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


class LocalCluster(Supervisor):
    """A broker and workers on this machine, under one supervisor."""

    def __init__(
        self, config: Config, workers: int | None = None, address: str | None = None, slots: int | None = None,
        broker_args: Sequence[str] = (),
    ) -> None:
        self._tmpdir: str | None = None
        if address is None:
            self._tmpdir = tempfile.mkdtemp(prefix="distfork-")
            address = f"ipc://{self._tmpdir}/broker"
        self.session = secrets.token_hex(4)
        n = workers or config.local_workers or os.cpu_count() or 1
        # Linux only: elsewhere (macOS frameworks, no fork on Windows) forking without exec is not safe.
        super().__init__(config, address, n, slots, broker_args=["--session", self.session, *broker_args],
                         fork_server=sys.platform == "linux")

    def stop(self) -> None:
        super().stop()
        shm.sweep(self.session, dead_only=False)  # the session ends with its cluster
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
