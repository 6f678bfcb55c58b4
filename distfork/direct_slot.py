"""The worker side of the direct path: a slot's Unix socket that drivers send lone tasks to.

The slot thread polls :class:`SlotServer`'s epoll fd next to its ZeroMQ
socket, queues what arrives like any task, answers on the same connection
and holds the broker's result headers back up to ``DIRECT_NOTICE_S``. The
whole path, its channel and its failure handling: ``distfork/direct.py``.
"""

from __future__ import annotations

import logging
import math
import os
import select
import socket
import threading
import time
from typing import Any

from . import protocol
from .config import DIRECT_NOTICE_S
from .direct import _PREFIX, PACKET_MAX, _directory, _frames, _packet, _peer, enabled
from .errors import ProtocolError
from .protocol import Flag, Msg, ResultEntry, TaskEntry

__all__ = ["SlotServer", "relay"]

log = logging.getLogger(__name__)


class SlotServer:
    """A worker slot's listening socket that drivers send lone tasks to (owned by the slot thread).

    Its connections sit in an epoll set whose fd the slot thread polls next to its ZeroMQ socket.
    """

    def __init__(self, address: str, identity: bytes) -> None:
        self.identity = identity
        self.path = os.path.join(_directory(address), f"{_PREFIX}{os.getpid()}-{identity.hex()}")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)  # the socket file: 0600 (its directory is 0700 already)
        try:
            self.listener.bind(self.path)
        finally:
            os.umask(old)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.fd = self.epoll.fileno()
        self.conns: dict[int, socket.socket] = {}
        self._buf = bytearray(PACKET_MAX + 1)
        # Direct tasks queued or running here: key -> (the connection it came on, the driver's task id).
        self.routes: dict[int, tuple[socket.socket, int]] = {}
        self._local: Any = None  # the slot's task queue (drain)
        # Result headers (Flag.DIRECT) of direct tasks answered, held back up to DIRECT_NOTICE_S: sent
        # with the next message to the broker, off the round trip (the broker's turn would compete with
        # the waiting driver thread for the cores). If the process dies meanwhile, the broker runs the
        # task again (its driver drops the second result): at least once, as any task of a lost worker.
        self.headers: list[ResultEntry] = []
        self.headers_at = 0.0
        self.via_broker: set[int] = set()  # keys of those whose result goes by the broker all the same
        # Their DIRECT notices, relayed by this process's nested driver if the task forks (see relay()).
        self.relays: dict[int, TaskEntry] = {}

    @classmethod
    def open(cls, config: Any, address: str, identity: bytes) -> SlotServer | None:
        if not enabled(config, address):
            return None
        try:
            return cls(address, identity)
        except OSError as exc:
            log.warning("no direct path for slot %s: %s", identity.hex(), exc)
            return None

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("direct socket: accept failed: %s", exc)
                return
            try:
                _, uid = _peer(conn)
            except OSError:
                uid = -1
            if uid != os.getuid():  # docs/SECURITY.md: only the same user (the directory is 0700 too)
                log.warning("direct socket: refused a peer of uid %d", uid)
                conn.close()
                continue
            self.conns[conn.fileno()] = conn
            self.epoll.register(conn.fileno(), select.EPOLLIN)

    def _close(self, conn: socket.socket) -> None:
        fd = conn.fileno()
        self.conns.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except OSError:
            pass
        conn.close()

    def drain(self, local: Any) -> None:
        """Queue the tasks drivers sent us (their driver tells the broker of them)."""
        self._local = local
        for fd, _ in self.epoll.poll(0):
            if fd == self.listener.fileno():
                self._accept()
                continue
            conn = self.conns.get(fd)
            while conn is not None:
                try:
                    n = conn.recv_into(self._buf, PACKET_MAX + 1, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    n = 0
                if n == 0:  # the driver left
                    self._close(conn)
                    break
                try:
                    frames = _frames(bytes(self._buf[:n]))
                    kind, body = protocol.decode(frames)
                    if kind is Msg.DIRECT:  # their results go by the broker: a call takes them (route())
                        self.via_broker.update(protocol.decode_cancel(body))
                        continue
                    if kind is not Msg.TASKS:
                        raise ProtocolError(f"unexpected {kind.name} on a direct socket")
                    entries = protocol.decode_tasks(frames, body)
                    origins = [protocol.decode_origin(e.frames[0]) if e.frames else None for e in entries]
                except ProtocolError as exc:
                    log.warning("dropped a message on a direct socket: %s", exc)
                    continue
                for e, origin in zip(entries, origins, strict=True):
                    if origin is None:
                        continue
                    self.routes[e.id] = (conn, origin[1])
                    self.relays[e.id] = TaskEntry(e.id, e.max_retries, e.timeout_s,
                                                  [protocol.encode_origin(self.identity, origin[1]), origin[0],
                                                   *e.frames[1:]], Flag.NESTED)
                    local.append(TaskEntry(e.id, e.max_retries, e.timeout_s, e.frames[1:], e.flags & Flag.RESULT_SHM,
                                           e.pid))

    def deliver(self, done: list[ResultEntry]) -> list[ResultEntry]:
        """Results of direct tasks go to their drivers; the broker gets header-only entries for them."""
        if not self.routes:
            return done
        if self._local is not None:  # a driver may have asked meanwhile for results by the broker (route())
            self.drain(self._local)
        to_broker: list[ResultEntry] = []
        for e in done:
            route = self.routes.pop(e.id, None)
            if route is None:
                to_broker.append(e)
                continue
            conn, task_id = route
            packet = _packet(protocol.encode_batch(Msg.RESULTS, [ResultEntry(task_id, e.status, e.run_s, e.frames,
                                                                             e.flags)]))
            try:
                if packet is None or e.id in self.via_broker:  # by the broker; the driver's reader stops waiting
                    self.via_broker.discard(e.id)
                    conn.sendmsg(_packet(protocol.encode_batch(Msg.RESULTS, [ResultEntry(
                        task_id, e.status, e.run_s, [], e.flags | Flag.DIRECT)])) or [], [], socket.MSG_DONTWAIT)
                    to_broker.append(e)
                    continue
                conn.sendmsg(packet, [], socket.MSG_DONTWAIT)
                if not self.headers:
                    self.headers_at = time.monotonic()
                self.headers.append(ResultEntry(e.id, e.status, e.run_s, [], e.flags | Flag.DIRECT))
            except OSError as exc:  # the driver is gone (or not reading): the broker routes it the usual way
                log.info("direct result of task %d goes by the broker: %s", task_id, exc)
                to_broker.append(e)
        if len(self.routes) > 10_000:  # keys of direct tasks cancelled before they ran
            self.routes.clear()
            self.relays.clear()
            self.via_broker.clear()
        if to_broker:  # a message goes to the broker anyway: the headers ride along
            to_broker += self.take_headers()
        return to_broker

    def take_headers(self) -> list[ResultEntry]:
        headers, self.headers = self.headers, []
        return headers

    def poll_ms(self, heartbeat_ms: float) -> int:
        """How long the slot thread may sleep: until its held-back headers are due, at most a heartbeat."""
        if not self.headers:
            return int(heartbeat_ms)
        return max(0, math.ceil((self.headers_at + DIRECT_NOTICE_S - time.monotonic()) * 1000))

    def begin(self, key: int) -> None:
        """The slot thread starts task ``key``: if it is a direct task, a fork it makes relays its notice."""
        _running.notice = self.relays.pop(key, None)

    @staticmethod
    def end() -> None:
        _running.notice = None

    def close(self) -> None:
        for conn in list(self.conns.values()):
            conn.close()
        self.conns.clear()
        self.listener.close()
        self.epoll.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


#: The DIRECT notice of the direct task this slot thread runs, until a fork of it takes it.
_running = threading.local()


def relay() -> TaskEntry | None:
    """From ``fork()`` inside a task: the notice of the direct task running in this thread, once.

    Its driver holds its notice back (``DIRECT_NOTICE_S``); children the task
    forks would reach the broker first, and the broker, thinking the slot free,
    could queue them behind their own parent. The nested driver sends this
    notice on its own socket ahead of the children (the same socket: in order).
    Its first frame names the slot and the driver's task id, its second the
    driver; ``Flag.NESTED`` says it is relayed. The broker adopts whichever
    notice of the task comes first and ignores the other (``Adopter.seen``).
    """
    notice: TaskEntry | None = getattr(_running, "notice", None)
    if notice is not None:
        _running.notice = None
    return notice
