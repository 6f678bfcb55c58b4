"""A local cluster: one broker and N workers as child processes of this one.

::

    this process ──Popen──▶ python -m distfork broker --bind ADDRESS --parent-pid PID
                 ──Popen──▶ python -m distfork worker --connect ADDRESS --parent-pid PID   (× N)

The children are started through the same command line users type, so the
embedded cluster exercises the real entry points. They watch their parent
and stop when it is gone, even if it was SIGKILLed. :meth:`LocalCluster.stop`
sends SIGTERM, waits ``stop_timeout_s``, then SIGKILLs what is left; it only
ever signals the pids it started.

The embedded cluster (``fork`` with nothing configured) listens on an
``ipc://`` socket in a private temporary directory: its address is known
before the broker starts, so broker and workers start in parallel, and no
TCP port is opened at all. ``distfork up`` passes a ``tcp://`` address.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from . import shm
from .config import Config

__all__ = ["LocalCluster"]

log = logging.getLogger(__name__)


class LocalCluster:
    """Start and stop a broker and workers on this machine."""

    def __init__(self, config: Config, workers: int | None = None, address: str | None = None, slots: int | None = None) -> None:
        self.config = config
        self.n_workers = workers or config.local_workers or os.cpu_count() or 1
        self.slots = slots or config.slots
        self._tmpdir: str | None = None
        if address is None:
            self._tmpdir = tempfile.mkdtemp(prefix="distfork-")
            address = f"ipc://{self._tmpdir}/broker"
        self.address = address
        self.session = secrets.token_hex(4)
        self.broker: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Workers import the driver's modules by reference: give them its path.
        paths = [os.path.abspath(p) for p in sys.path if p] + [os.getcwd()]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env.pop("DISTFORK_ADDRESS", None)
        return env

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "distfork", *args, "--parent-pid", str(os.getpid())]
        return subprocess.Popen(cmd, env=self._env(), stdin=subprocess.DEVNULL)

    def start(self) -> LocalCluster:
        self.broker = self._spawn("broker", "--bind", self.address, "--session", self.session)
        if self._tmpdir is None:
            # A TCP port may be taken: see the broker bind before starting workers.
            self._wait_for_broker()
        self.add_workers(self.n_workers)
        return self

    def add_workers(self, n: int) -> None:
        for _ in range(n):
            self.workers.append(self._spawn("worker", "--connect", self.address, "--slots", str(self.slots)))

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
    def pids(self) -> list[int]:
        procs = ([self.broker] if self.broker else []) + self.workers
        return [p.pid for p in procs]

    def stop(self) -> None:
        """SIGTERM the workers, then the broker (so their goodbyes arrive); SIGKILL what does not stop."""
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
        self.workers = []
        self.broker = None
        shm.sweep(self.session, dead_only=False)  # the session ends with its cluster
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
