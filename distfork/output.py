"""Output comes back: what a task prints or logs reaches its driver, prefixed with where it ran.

::

    worker process                                              broker                 driver (I/O thread)
    slot thread, in the task:                                   OUTPUT from a          OUTPUT: lines to the
      print / sys.stderr / logging ─▶ Capture of this task      worker's control       terminal (prefixed) or
        (thread-local; bounded: output_task_bytes, then         socket: checked        a file, and onto the
         lines are counted as dropped)                          against the slot it    task's future
              │ pending, wake-up pipe                           names, forwarded to    (``fut.output``)
    main thread (control socket) ─▶ OUTPUT {peer, key, lines}─▶ the task's driver ───▶
      every wake-up: drains the captures

``sys.stdout`` and ``sys.stderr`` of a worker process become proxies that
send a slot thread's writes to the capture of the task it runs, and
everything else (the worker's own logs, threads the task started) to the
real stream: operators still read the worker's stderr. A logging handler on
the root logger captures records emitted in a task's thread (distfork's own
records excepted); the worker's handlers still print them too.

The control thread sends, not the task thread: a task that prints a line
and then computes for an hour shows its line at once, and lines printed
just before the process dies are on the wire already. A task's last lines
are sent before its result (the slot waits up to a second for the control
thread), so ``fut.output`` is complete when ``result()`` returns.

Not captured: writes straight to file descriptors 1 and 2 (C extensions,
subprocesses): they go to the worker's own stdout/stderr.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import IO, Any, TextIO

__all__ = ["Capture", "Display", "begin", "drain", "end", "install", "prefix"]

log = logging.getLogger(__name__)

_LINE_MAX = 16 * 1024  # a longer "line" without a newline is cut into lines of this size
_PENDING_MAX = 1024 * 1024  # bytes a capture holds for the control thread; beyond, lines are dropped
_FINAL_WAIT_S = 1.0  # how long a slot waits for its task's last lines to be sent before the result


class Capture:
    """The output of one running task, between its thread and the worker's control thread."""

    def __init__(self, key: int, peer: str, max_bytes: int) -> None:
        self.key = key
        self.peer = peer
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.lines: list[list[str]] = []  # [stream, text] not sent yet
        self.pending = 0  # bytes in lines
        self.partial: dict[str, str] = {}  # stream -> text after its last newline
        self.total = 0  # bytes accepted for sending
        self.dropped = 0  # lines not sent (over the limits), told with the last chunk
        self.final = False
        self.final_sent = False
        self.sent_final = threading.Event()

    def write(self, stream: str, text: str) -> None:
        if not text:
            return
        with self.lock:
            text = self.partial.pop(stream, "") + text
            *lines, rest = text.split("\n")
            while len(rest) > _LINE_MAX:
                lines.append(rest[:_LINE_MAX])
                rest = rest[_LINE_MAX:]
            if rest:
                self.partial[stream] = rest
            for line in lines:
                self._add(stream, line)
        if lines:
            _router.notify(self)

    def line(self, stream: str, text: str) -> None:
        with self.lock:
            for line in text.split("\n"):
                self._add(stream, line)
        _router.notify(self)

    def _add(self, stream: str, line: str) -> None:
        n = len(line) + 1
        if (self.max_bytes and self.total + n > self.max_bytes) or self.pending + n > _PENDING_MAX:
            self.dropped += 1
            return
        self.total += n
        self.pending += n
        self.lines.append([stream, line])

    def close(self) -> None:
        """The task ended: what is left of unfinished lines goes too, then the final chunk."""
        with self.lock:
            for stream, rest in sorted(self.partial.items()):
                self._add(stream, rest)
            self.partial.clear()
            self.final = True
        _router.notify(self)

    def take(self) -> dict[str, Any] | None:
        """The next OUTPUT body to send (the control thread), or None."""
        with self.lock:
            if not self.lines and not (self.final and not self.final_sent):
                return None
            # Lines dropped are told once, with the last chunk: one "N lines dropped" notice per task.
            body = {"peer": self.peer, "key": self.key, "lines": self.lines,
                    "dropped": self.dropped if self.final else 0, "final": self.final}
            self.lines, self.pending = [], 0
            self.final_sent = self.final
            return body


class _Router:
    """Process-wide: which capture belongs to the running thread, which have lines to send."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.lock = threading.Lock()
        self.pending: dict[int, Capture] = {}  # id(capture) -> capture
        self.wake: Callable[[], None] | None = None

    def current(self) -> Capture | None:
        """The capture of the task this thread runs (made at its first line), or None."""
        loc = self.local
        cap: Capture | None = getattr(loc, "capture", None)
        if cap is None:
            task = getattr(loc, "task", None)
            if task is None:
                return None
            cap = loc.capture = Capture(*task)
        return cap

    def notify(self, cap: Capture) -> None:
        with self.lock:
            first = not self.pending
            self.pending[id(cap)] = cap
        if first and self.wake is not None:
            self.wake()


_router = _Router()


def begin(key: int, peer: str, max_bytes: int) -> None:
    """A slot thread starts task ``key``: its output is captured from now on (nothing made until it writes)."""
    loc = _router.local
    loc.task = (key, peer, max_bytes)
    loc.capture = None


def end() -> bool:
    """The task ended: stop capturing, and wait (bounded) until its last lines are on the wire.

    True if it wrote anything (its lines may reach the broker after its result).
    """
    loc = _router.local
    cap: Capture | None = getattr(loc, "capture", None)
    loc.task = loc.capture = None
    if cap is None:
        return False
    cap.close()
    if _router.wake is not None:
        cap.sent_final.wait(_FINAL_WAIT_S)
    return True


def drain() -> list[dict[str, Any]]:
    """OUTPUT bodies of every capture with something to send (the control thread)."""
    with _router.lock:
        caps = list(_router.pending.values())
        _router.pending.clear()
    bodies = []
    for cap in caps:
        body = cap.take()
        if body is not None:
            bodies.append(body)
            if body["final"]:
                cap.sent_final.set()
    return bodies


class _Stream(io.TextIOBase):
    """``sys.stdout`` / ``sys.stderr`` of a worker: a task's writes to its capture, the rest through."""

    def __init__(self, real: TextIO, name: str) -> None:
        self.real = real
        self.stream = name

    def write(self, text: str) -> int:
        cap = _router.current()
        if cap is None:
            return self.real.write(text)
        cap.write(self.stream, text)
        return len(text)

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.real, "encoding", "utf-8") or "utf-8"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        cap = _router.current()
        if cap is None or record.name.startswith("distfork"):
            return
        try:
            cap.line("log", self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break the task
            self.handleError(record)


_installed = False


def install(wake: Callable[[], None]) -> None:
    """In a worker process, once: route tasks' output to their captures; ``wake`` the control thread."""
    global _installed
    _router.wake = wake
    if _installed:
        return
    _installed = True
    if sys.stdout is not None:
        sys.stdout = _Stream(sys.stdout, "out")
    if sys.stderr is not None:
        sys.stderr = _Stream(sys.stderr, "err")
    logging.getLogger().addHandler(_LogCapture())


# -- the driver side ---------------------------------------------------------------------------


def prefix(body: dict[str, Any], task_id: int) -> str:
    """Where a line ran, as the driver shows it: ``(task 12 worker-a/0 host worker-a pid 345)``."""
    return f"(task {task_id} {body.get('worker', '?')} host {body.get('host', '?')} pid {body.get('pid', '?')})"


class Display:
    """Where the driver shows its tasks' lines: ``terminal`` (stdout/stderr), ``off``, or a file path."""

    def __init__(self, setting: str) -> None:
        self.setting = setting or "terminal"
        self.file: IO[str] | None = None
        if self.setting not in ("terminal", "off"):
            fd = os.open(self.setting, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self.file = os.fdopen(fd, "a", buffering=1)

    def show(self, body: dict[str, Any], task_id: int, lines: list[tuple[str, str]], dropped: int) -> None:
        if self.setting == "off":
            return
        head = prefix(body, task_id)
        out = [(s, f"{head} {text}\n") for s, text in lines]
        if dropped:
            out.append(("err", f"{head} [{dropped} lines dropped: over output_task_bytes]\n"))
        try:
            if self.file is not None:
                self.file.write("".join(t for _, t in out))
                return
            by: dict[str, list[str]] = collections.defaultdict(list)
            for s, t in out:
                by["out" if s == "out" else "err"].append(t)
            if by["out"] and sys.stdout is not None:
                sys.stdout.write("".join(by["out"]))
                sys.stdout.flush()
            if by["err"] and sys.stderr is not None:
                sys.stderr.write("".join(by["err"]))
                sys.stderr.flush()
        except (OSError, ValueError) as exc:  # a closed terminal must not stop the I/O thread
            log.debug("could not show a task's output: %s", exc)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
