"""The worker process: runs tasks the broker hands it, one per slot.

::

     broker ROUTER ◀── DEALER ── main thread (I/O)                slot threads (N = slots)
                                 ┌──────────────────────────┐    ┌───────────────────────────┐
                                 │ HELLO, HEARTBEAT          │    │ unpickle (func,args,kw)   │
                       TASKS ──▶ │ queue each task ──────────┼──▶ │ run it                    │
                     RESULTS ◀── │ batch finished results ◀──┼─── │ pickle value or exception │
                                 │ (deque + pipe wake-up)    │    └───────────────────────────┘
                                 └──────────────────────────┘

The main thread owns the socket and keeps heartbeating while tasks run.
If the broker restarts, it answers our next message with REJECT and we say
hello again. A worker started by a parent (the embedded cluster) stops
when that parent is gone. SIGTERM and SIGINT stop it: it says BYE so the
broker re-queues what it held at once.

Tasks that call ``distfork.fork`` themselves reach the same broker: the
worker sets ``DISTFORK_ADDRESS`` for them.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import zmq

from . import protocol, serialize
from .config import Config
from .errors import ProtocolError, SerializationError
from .protocol import Entry, Msg, Status

__all__ = ["Worker", "run_task"]

log = logging.getLogger(__name__)


def run_task(frames: Sequence[Any], where: str, oob_threshold_bytes: int) -> tuple[int, list[Any]]:
    """Unpickle a call, run it, pickle the outcome: ``(Status, frames)``."""
    try:
        func, args, kwargs = serialize.loads(frames)
    except BaseException as exc:  # noqa: BLE001 - reported to the driver
        err = SerializationError(
            f"the worker could not unpickle the task's function or arguments: {type(exc).__name__}: {exc}. "
            "Is every module the task needs installed on the worker?"
        )
        err.__cause__ = exc
        return Status.RAISED, serialize.dumps_exception(err, where, oob_threshold_bytes)
    del frames
    try:
        value = func(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - reported to the driver
        return Status.RAISED, serialize.dumps_exception(exc, where, oob_threshold_bytes)
    try:
        return Status.OK, serialize.dumps(value, oob_threshold_bytes)
    except BaseException as exc:  # noqa: BLE001
        err = SerializationError(
            f"the task's result {serialize.describe(value)} cannot be pickled: {type(exc).__name__}: {exc}. "
            "Return plain data (convert the object inside the task)"
        )
        return Status.RAISED, serialize.dumps_exception(err, where, oob_threshold_bytes)


class Worker:
    """A worker connected to the broker at ``address`` with ``slots`` task slots."""

    def __init__(
        self,
        address: str,
        config: Config,
        slots: int = 1,
        name: str | None = None,
        parent_pid: int | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"a worker needs at least 1 slot, got {slots}")
        self.address = address
        self.config = config
        self.slots = slots
        self.host = socket.gethostname()
        self.name = name or f"{self.host}-{os.getpid()}"
        self.parent_pid = parent_pid
        self.identity = b"W" + os.urandom(8)
        self.where = f"worker {self.name} (host {self.host}, pid {os.getpid()})"
        self._tasks: queue.SimpleQueue[tuple[int, Sequence[Any]] | None] = queue.SimpleQueue()
        self._done: collections.deque[Entry] = collections.deque()
        self._cancelled: set[int] = set()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_pending = False
        self._stopping = False
        self._ctx = zmq.Context()

    def stop(self) -> None:
        """Ask the worker to stop (safe from a signal handler)."""
        self._stopping = True
        self._wake(force=True)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def _wake(self, force: bool = False) -> None:
        if self._wake_pending and not force:
            return
        self._wake_pending = True
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    # -- slot threads ---------------------------------------------------------

    def _slot(self) -> None:
        threshold = self.config.oob_threshold_bytes
        while True:
            item = self._tasks.get()
            if item is None:
                return
            key, frames = item
            if key in self._cancelled:
                self._cancelled.discard(key)
                continue
            started = time.perf_counter()
            status, out = run_task(frames, self.where, threshold)
            del frames, item
            self._done.append(Entry(key, status, time.perf_counter() - started, out))
            self._wake()

    # -- the I/O loop ---------------------------------------------------------

    def _hello(self, sock: zmq.Socket[Any]) -> None:
        info = {"role": "worker", "name": self.name, "host": self.host, "pid": os.getpid(), "slots": self.slots}
        sock.send_multipart(protocol.encode_json(Msg.HELLO, info))

    def serve_forever(self) -> None:
        os.environ["DISTFORK_ADDRESS"] = self.address  # nested forks reach our broker
        threads = [
            threading.Thread(target=self._slot, name=f"distfork-slot-{i}", daemon=True) for i in range(self.slots)
        ]
        for t in threads:
            t.start()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # results: bounded by slots + prefetch
        sock.setsockopt(zmq.RCVHWM, self.config.hwm)
        sock.connect(self.address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        heartbeat_s = self.config.heartbeat_s
        self._hello(sock)
        now = time.monotonic()
        last_sent = last_heard = now
        last_hello = 0.0
        log.info("%s connecting to %s with %d slots", self.where, self.address, self.slots)
        try:
            while not self._stopping:
                events = dict(poller.poll(heartbeat_s * 1000))
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    self._wake_pending = False
                now = time.monotonic()
                if self._done:
                    done = self._done
                    batch = [done.popleft() for _ in range(len(done))]
                    sock.send_multipart(protocol.encode_batch(Msg.RESULTS, batch), copy=False)
                    last_sent = now
                if sock in events:
                    last_heard = now
                    for _ in range(1000):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        if self._handle(sock, frames, now - last_hello > heartbeat_s):
                            last_hello = now
                if now - last_sent >= heartbeat_s:
                    sock.send_multipart(protocol.encode_signal(Msg.HEARTBEAT))
                    last_sent = now
                if now - last_heard > self.config.peer_timeout_s:
                    log.warning("broker at %s silent for %.1f s; waiting for it", self.address, now - last_heard)
                    last_heard = now
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    log.warning("parent process %d is gone; stopping", self.parent_pid)
                    break
        finally:
            try:
                sock.send_multipart(protocol.encode_signal(Msg.BYE), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            sock.close(linger=200)
            self._ctx.term()
            for _ in threads:
                self._tasks.put(None)
            log.info("%s stopped", self.where)

    def _handle(self, sock: zmq.Socket[Any], frames: list[Any], may_rehello: bool) -> bool:
        try:
            kind, body = protocol.decode(frames)
            if kind is Msg.TASKS:
                for e in protocol.decode_batch(frames, body):
                    self._tasks.put((e.id, e.frames))
            elif kind is Msg.CANCEL:
                self._cancelled.update(protocol.decode_cancel(body))
            elif kind is Msg.REJECT:
                if may_rehello:
                    log.info("broker at %s does not know us (restarted?): saying hello again", self.address)
                    self._hello(sock)
                    return True
            elif kind in (Msg.HEARTBEAT, Msg.WELCOME):
                pass
            elif kind is Msg.BYE:
                log.info("broker at %s is stopping", self.address)
            else:
                raise ProtocolError(f"unexpected {kind.name} from the broker")
        except ProtocolError as exc:
            log.warning("dropped a message from the broker: %s", exc)
        return False
