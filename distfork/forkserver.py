"""A fork server: one interpreter that has imported distfork forks the embedded cluster's processes.

::

    driver ──Popen──▶ python -m distfork fork-server --report-fd FD --parent-pid DRIVER
      │  stdin:  {"id": 1, "argv": ["broker", "--bind", ...]}\\n     (one JSON line per process)
      │  fd FD:  "pid 1 4242\\n" when forked, "exit 4242 -9\\n" when it ended (Popen's returncode)
      └─ ForkServer: a reader thread turns those lines into ForkedProcess objects

Starting a Python interpreter and importing zmq, cloudpickle and distfork
costs about 0.3 s of CPU here; the embedded cluster used to pay it once per
process (a broker and a worker per core) on as many cores. Forked from one
pre-imported server, a process is ready in milliseconds, and a crashed
worker is replaced as fast. Each child runs the same command line a user
types (``distfork broker ...``, ``distfork worker ...``): the server only
replaces the interpreter start.

The server forks from a single thread that never made a ZeroMQ context, so
each child starts clean. Children get ``--parent-pid`` of the server and
stop when it is gone; the server leaves when the driver is gone or closes
its stdin. It reaps its children and reports their exits, so they never
linger as zombies. Leaving, it stops the children still running (SIGTERM,
then SIGKILL after 5 s), waits for them, and sweeps /dev/shm: it is the last
process of its cluster, so the garbage of a driver that died (SIGKILL) is
removed by it and not left for the next distfork process on the host.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["COMMAND", "ForkServer", "ForkedProcess", "serve"]

log = logging.getLogger(__name__)

_POLL_S = 0.05
_STOP_S = 5.0  # how long children the driver left running get to stop on SIGTERM before SIGKILL


class ForkedProcess:
    """A child of the fork server, with what a supervisor uses of ``subprocess.Popen``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._ended = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired([f"pid {self.pid}"], timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def ended(self, code: int) -> None:
        self.returncode = code
        self._ended.set()


#: How the cluster's processes run ``distfork``: like ``python -m distfork``, but without the
#: working directory ahead of everything on sys.path (``-m`` and ``-c`` put it first), so a
#: ``click.py`` lying in a shared directory the driver was started from is never imported.
COMMAND = (sys.executable, "-c", "import sys; del sys.path[0]; from distfork.cli import main; main()")


class ForkServer:
    """The driver's side: start the server, ask it for processes, learn when they end."""

    def __init__(self, env: dict[str, str], timeout_s: float) -> None:
        self.timeout_s = timeout_s
        read_fd, write_fd = os.pipe()
        self.proc = subprocess.Popen(
            [*COMMAND, "fork-server", "--report-fd", str(write_fd),
             "--parent-pid", str(os.getpid())],
            env=env, stdin=subprocess.PIPE, pass_fds=(write_fd,),
        )
        os.close(write_fd)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._asked: dict[int, tuple[threading.Event, list[ForkedProcess]]] = {}
        self._children: dict[int, ForkedProcess] = {}
        self._gone = False
        self._reader = threading.Thread(target=self._read, args=(read_fd,), name="distfork-fork-server", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return not self._gone and self.proc.poll() is None

    def spawn(self, argv: list[str]) -> ForkedProcess:
        """Fork a process running ``distfork *argv``; raises RuntimeError if the server cannot."""
        key = next(self._ids)
        answered: tuple[threading.Event, list[ForkedProcess]] = (threading.Event(), [])
        with self._lock:
            if self._gone:
                raise RuntimeError("the fork server is gone")
            self._asked[key] = answered
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"id": key, "argv": argv}).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise RuntimeError("the fork server is gone") from None
        if not answered[0].wait(self.timeout_s) or not answered[1]:
            raise RuntimeError(f"the fork server (pid {self.proc.pid}) did not start `distfork {argv[0]}`")
        return answered[1][0]

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as reports:
            for line in reports:
                try:
                    kind, a, b = line.split()
                    if kind == b"pid":
                        p = ForkedProcess(int(b))
                        with self._lock:
                            self._children[p.pid] = p
                            asked = self._asked.pop(int(a), None)
                        if asked is not None:
                            asked[1].append(p)
                            asked[0].set()
                    elif kind == b"exit":
                        with self._lock:
                            child = self._children.pop(int(a), None)
                        if child is not None:
                            child.ended(int(b))
                except ValueError:
                    log.warning("fork server: unreadable report %r", line)
        # The server is gone: its children lost their parent and are stopping; make sure of it.
        with self._lock:
            self._gone = True
            children, self._children = list(self._children.values()), {}
            unanswered, self._asked = list(self._asked.values()), {}
        for child in children:
            child.kill()
            child.ended(-signal.SIGKILL)
        for event, _ in unanswered:
            event.set()

    def close(self) -> None:
        """Let the server go (after its children were stopped)."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(self.timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(self.timeout_s)


def serve(report_fd: int, parent_pid: int, run: Callable[[list[str]], Any]) -> None:
    """The server's loop (``distfork fork-server``): fork a child per request, report pids and exits."""
    children: set[int] = set()
    pending = b""
    # Ctrl-C in a terminal reaches the whole process group: the driver decides what stops, not us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def report(text: str) -> None:
        os.write(report_fd, text.encode())

    while True:
        readable, _, _ = select.select([0], [], [], _POLL_S)
        if readable:
            chunk = os.read(0, 65536)
            if not chunk:
                break  # the supervisor closed our stdin: done
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(request["argv"], report_fd, run)
                children.add(pid)
                report(f"pid {request['id']} {pid}\n")
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            children.discard(pid)
            report(f"exit {pid} {os.waitstatus_to_exitcode(status)}\n")
        if os.getppid() != parent_pid:
            break  # the driver is gone
    _last_out(children, report)


def _last_out(children: set[int], report: Callable[[str], None]) -> None:
    """Stop the children still running (the driver died without stopping them), reap them, then
    sweep: a segment a child left named after the dead driver has nobody else to remove it."""
    from . import shm

    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + _STOP_S
    while children:
        for pid in list(children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                children.discard(pid)
                continue
            if done:
                children.discard(pid)
                try:
                    report(f"exit {pid} {os.waitstatus_to_exitcode(status)}\n")
                except OSError:
                    pass  # nobody reads any more
        if children and time.monotonic() > deadline:
            for pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = float("inf")
        time.sleep(_POLL_S / 5)
    shm.sweep()
    _remove_progress_dir()


def _remove_progress_dir() -> None:
    """The progress directory of the supervisor that started us (cluster.PROGRESS_DIR_ENV): if it
    died, nobody else removes it. Only the pid files our workers made, then the empty directory."""
    path = os.environ.get("DISTFORK_PROGRESS_DIR", "")
    if not os.path.basename(path).startswith("distfork-progress-"):
        return
    try:
        for name in os.listdir(path):
            if name.isdigit():
                os.unlink(os.path.join(path, name))
        os.rmdir(path)
    except OSError:
        pass  # removed by the supervisor meanwhile, or not ours to remove


def _child(argv: list[str], report_fd: int, run: Callable[[list[str]], Any]) -> None:
    """In a forked child: become ``distfork *argv``; never returns."""
    code = 1
    try:
        os.close(report_fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        random.seed()  # not the server's sequence
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        logging.root.handlers.clear()  # the command sets up logging again, with our pid
        _name_process(f"distfork-{argv[0]}")
        run(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - a child must never return into the server's loop
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
        finally:
            os._exit(code)


def _name_process(name: str) -> None:
    """Show ``name`` in ps and top (Linux: the command line stays the server's)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
