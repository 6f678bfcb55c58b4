"""The direct path: a lone fork goes from the calling thread straight to an idle worker slot.

::

     driver                                   worker slot thread                 broker
     ┌────────────────────────┐ TASKS packet ┌────────────────────────────┐     ┌──────────────────────┐
     │ fork(): user thread    │ ───────────▶ │ SlotServer: an epoll fd in │     │                      │
     │ result(): the waiting  │ ◀─────────── │ its zmq.Poller; queue it   │     │                      │
     │ user thread reads it   │ RESULTS, same│ like any task; a header    │ ──▶ │ Flag.DIRECT result:  │
     │ (else the I/O thread)  │ connection   │ (Flag.DIRECT) to the broker│     │ counted, not routed  │
     │ I/O thread: notices    │ ─────────── DIRECT notices (≤ 1 ms) ────────────▶│ adopt(): the task is │
     └────────────────────────┘  AF_UNIX SOCK_SEQPACKET, cluster's 0700 dir,      │ ASSIGNED to the slot │
                                 file 0600, SO_PEERCRED checked on both ends      └──────────────────────┘

``wait(fork(f, x))`` crosses the broker twice on the broker path (driver ->
broker -> worker -> broker -> driver: four ZeroMQ messages, two broker
turns, about ten thread wake-ups). Here the user thread writes one packet
and the slot thread answers on the same connection to the thread that
waits: user thread -> slot thread -> user thread, no libzmq I/O thread. The
broker still knows every task: within ``DIRECT_NOTICE_S`` (1 ms, batched),
and always before anything else the driver sends it, the I/O thread sends a
``DIRECT`` notice (the task's key, the slot, its own task id and the
payload), so the notice is ahead of anything the driver submits later (the
broker never hands that slot another task of ours meanwhile). A task that
forks relays its notice ahead of its children (``relay``). From there the
task is an ordinary task assigned to that slot:

- the slot's process dies mid-task: the connection hangs up, the broker
  re-queues the task (it has the payload) or fails it with
  ``WorkerLostError``, and the result reaches the driver by the broker path;
  a notice that comes after the slot's loss queues the task as a retry;
- ``fut.cancel()`` and ``timeout_s``: the broker aborts the slot's task by
  its key, as always; ``distfork status`` counts it;
- the slot's result header may reach the broker before the notice: it is
  kept (``Adopter.early``) and the notice then completes the task at once;
- a call naming a running direct task: its slot sends the value to the
  broker, which holds it for the call (``DirectClient.route``);
- broker restart: the driver re-submits every unfinished task, direct ones
  too; the driver completes a future once, whichever result comes first.

Which tasks: only when the driver has nothing else in flight (so every slot
of its embedded cluster is idle and none is held back from other work: there
is no lease to revoke), only plain calls (no future arguments, resources,
trace, shared-memory arguments, shipped code, not forked inside a task) and
at most ``PACKET_MAX`` bytes. Everything else takes the broker path. Only for
a driver of the embedded cluster (``security.private_ipc``): no TCP port.

This module: the channel and the driver's side (:class:`DirectClient`); the
slot's side is ``direct_slot.py`` (``SlotServer``, ``relay``), the broker's
``direct_broker.py`` (``Adopter``).
"""

from __future__ import annotations

import logging
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import zmq

from . import protocol, security, shm
from .config import DIRECT_NOTICE_S
from .errors import ProtocolError
from .protocol import Flag, Msg, ResultEntry, TaskEntry

if TYPE_CHECKING:
    pass

__all__ = ["DirectClient", "PACKET_MAX", "eligible", "enabled", "remove_sockets", "unlink"]

log = logging.getLogger(__name__)

_PREFIX = "direct-"


def enabled(config: Any, address: str) -> bool:
    """The direct path is on, and ``address`` is an embedded cluster's private ipc socket."""
    return bool(config.direct) and security.private_ipc(address)


def _directory(address: str) -> str:
    return os.path.dirname(os.path.abspath(address[len("ipc://"):]))


def _slot_of(name: str) -> bytes:
    """The broker identity of the slot whose socket file this is (``direct-<pid>-<identity hex>``)."""
    try:
        return bytes.fromhex(name[len(_PREFIX):].split("-")[1])
    except (IndexError, ValueError):
        return b""


def _pid_of(name: str) -> int:
    try:
        return int(name[len(_PREFIX):].split("-")[0])
    except ValueError:
        return 0


# -- the channel: one SOCK_SEQPACKET Unix socket per (driver, slot) -----------------

#: A packet: ``u32 count``, ``count`` x ``u32`` frame lengths, then the frames' bytes. A packet
#: is sent whole or not at all (SEQPACKET); a task or result above this goes by the broker.
PACKET_MAX = 1 << 16
_U32 = struct.Struct("!I")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _packet(frames: Sequence[Any]) -> list[Any] | None:
    """The buffers of one packet carrying ``frames`` (a protocol message), None if over PACKET_MAX."""
    sizes = [len(f) if type(f) is bytes else memoryview(f).nbytes for f in frames]
    if sum(sizes) + 4 * (len(sizes) + 1) > PACKET_MAX:
        return None
    return [struct.pack(f"!{len(sizes) + 1}I", len(sizes), *sizes), *frames]


def _frames(data: bytes) -> list[memoryview]:
    """The frames of one packet (ProtocolError if it does not add up)."""
    view = memoryview(data)
    if len(data) < 4:
        raise ProtocolError(f"direct packet of {len(data)} bytes")
    (count,) = _U32.unpack_from(data)
    at = 4 + 4 * count
    if count > PACKET_MAX // 4 or at > len(data):
        raise ProtocolError(f"direct packet of {len(data)} bytes names {count} frames")
    out = []
    for (n,) in struct.iter_unpack("!I", view[4:at]):
        out.append(view[at:at + n])
        at += n
    if at != len(data):
        raise ProtocolError(f"direct packet of {len(data)} bytes, frames of {at}")
    return out


def _peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end (SO_PEERCRED)."""
    pid, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return pid, uid


class _Conn:
    """The driver's connection to one slot. ``reading``: held by whichever thread reads it (a user
    thread waiting on its direct task, or the I/O thread); ``watched``: in the I/O thread's poller."""

    def __init__(self, name: str, sock: socket.socket) -> None:
        self.name = name
        self.sock = sock
        self.fd = sock.fileno()
        self.reading = threading.Lock()
        self.buf = bytearray(PACKET_MAX + 1)
        self.watched = False
        self.dead = False


# -- the driver side ------------------------------------------------------------


class DirectClient:
    """The driver's connections to the slots of its embedded cluster (one SEQPACKET socket each).

    ``send`` (a user thread in ``fork()``) writes a lone task straight on a
    slot's connection: no wake-up of the I/O thread on its way. The reply
    comes back on the same connection and is read by the user thread that
    waits for it (``wait``, from ``Future.result``), so the round trip is user
    thread -> slot thread -> user thread. When nobody waits (callbacks,
    ``as_completed``, asyncio), the I/O thread polls the connection and reads
    it (``receive``). Whoever reads holds the connection's ``reading`` lock;
    the I/O thread leaves a connection out of its poller while a user thread
    reads it, so it is not woken by a reply it would not take.
    ``busy``, ``notices`` and the connection table are guarded by ``_lock``.
    """

    def __init__(self, ctx: Any, address: str, identity: bytes, scan_s: float) -> None:
        self._scan_s = scan_s
        self.next_scan = 0.0
        self._dir = _directory(address)
        self._identity = identity
        self._lock = threading.Lock()
        self.conns: dict[str, _Conn] = {}  # socket file -> the connection to that slot
        self._closed = False
        self.busy: dict[int, _Conn] = {}  # task id -> the slot it was sent to, no result from there yet
        self.keys: dict[int, int] = {}  # task id -> its key (while busy)
        self.ready = False
        self.rescan = True
        # DIRECT notices not sent yet, and when the oldest was made (see config.DIRECT_NOTICE_S).
        self.notices: list[TaskEntry] = []
        self.notices_at = 0.0
        self.urgent = False  # a task with timeout_s: its slot may end it any moment, by its key
        self.wake: Any = None  # the driver's wake-up of its I/O thread (set by the driver)
        self.shm = False  # the driver uses shared memory (set by the driver)

    def _connect(self, name: str) -> _Conn | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(1.0)
            sock.connect(os.path.join(self._dir, name))
            sock.settimeout(None)
            pid, uid = _peer(sock)
        except OSError:
            sock.close()
            return None
        if uid != os.getuid() or pid != _pid_of(name):  # docs/SECURITY.md: the same user, the slot named
            log.warning("direct socket %s: peer pid %d uid %d, not ours; not used", name, pid, uid)
            sock.close()
            return None
        return _Conn(name, sock)

    def scan(self, poller: Any, now: float) -> None:
        """Connect to new slot sockets, drop dead ones (the broker handles their tasks). I/O thread."""
        self.rescan = False
        self.next_scan = now + self._scan_s
        try:
            names = {n for n in os.listdir(self._dir) if n.startswith(_PREFIX)}
        except OSError:
            names = set()
        for name, conn in list(self.conns.items()):
            if conn.dead or name not in names or not shm.pid_exists(_pid_of(name)):
                self._drop(conn, poller)
        for name in sorted(names - set(self.conns)):
            if not shm.pid_exists(_pid_of(name)):
                continue
            new = self._connect(name)
            if new is not None:
                with self._lock:
                    self.conns[name] = new
        self.ready = bool(self.conns)

    def _drop(self, conn: _Conn, poller: Any) -> None:
        if conn.watched:
            poller.unregister(conn.fd)
            conn.watched = False
        with self._lock:
            self.conns.pop(conn.name, None)
            for task_id in [i for i, c in self.busy.items() if c is conn]:
                del self.busy[task_id]
                self.keys.pop(task_id, None)
        with conn.reading:  # a user thread reading it lets go first (it sees ``dead``)
            conn.dead = True
            conn.sock.close()

    def send(self, e: TaskEntry, now: float) -> bool:
        """From a user thread: send a task to a slot with none of ours (its DIRECT notice waits in
        :attr:`notices` for the I/O thread); False if no slot takes it now (the broker path then)."""
        key = protocol.DIRECT_KEY_BASE + random.getrandbits(61)
        # The slot is on our host: large results come back in shared memory, if we use it.
        task = TaskEntry(key, e.max_retries, e.timeout_s, [protocol.encode_origin(self._identity, e.id), *e.frames],
                         Flag.RESULT_SHM if self.shm else 0, os.getpid() if self.shm else 0)
        packet = _packet(protocol.encode_batch(Msg.TASKS, [task]))
        if packet is None:
            return False
        with self._lock:
            if self._closed:
                return False
            taken = set(self.busy.values())
            for conn in self.conns.values():
                if conn in taken or conn.dead:
                    continue
                try:
                    conn.sock.sendmsg(packet, [], socket.MSG_DONTWAIT)
                except OSError:
                    conn.dead = True  # the slot is gone (or stuck): the I/O thread drops it
                    self.rescan = True
                    continue
                self.busy[e.id] = conn
                self.keys[e.id] = key
                woke = not self.notices
                if woke:
                    self.notices_at = now
                self.notices.append(TaskEntry(key, e.max_retries, e.timeout_s,
                                              [protocol.encode_origin(_slot_of(conn.name), e.id), *e.frames], 0))
                self.urgent = self.urgent or e.timeout_s > 0
                if (woke or self.urgent) and self.wake is not None:
                    self.wake()  # the I/O thread sets its clock for the notices (already set otherwise)
                return True
            return False

    def route(self, task_id: int) -> bool:
        """From a user thread: a call names this direct task's future, so its value must reach the
        broker (which holds it for the call, as on the broker path): ask its slot to send the result
        there. False if it is not running here any more. If the slot answered us first, the broker
        asks the driver to send the call again with the value (RESUBMIT, as in that race on the
        broker path)."""
        with self._lock:
            conn, key = self.busy.get(task_id), self.keys.get(task_id)
            if conn is None or key is None or conn.dead:
                return False
            packet = _packet(protocol.encode_cancel([key], Msg.DIRECT))
            try:
                conn.sock.sendmsg(packet or [], [], socket.MSG_DONTWAIT)
            except OSError:
                return False
            return True

    def notices_due(self, now: float) -> float | None:
        """Seconds until the notices must go (0: now), None if there are none."""
        if not self.notices:
            return None
        return 0.0 if self.urgent else max(0.0, self.notices_at + DIRECT_NOTICE_S - now)

    def take_notices(self) -> list[TaskEntry]:
        with self._lock:
            notices, self.notices, self.urgent = self.notices, [], False
        return notices

    def _read(self, conn: _Conn, block: bool) -> list[ResultEntry]:
        """Packets waiting on ``conn`` (with ``reading`` held); ``block``: wait for one first."""
        out: list[ResultEntry] = []
        flags = 0 if block else socket.MSG_DONTWAIT
        while not conn.dead:
            try:
                n = conn.sock.recv_into(conn.buf, PACKET_MAX + 1, flags)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                n = 0
            if n == 0:  # the slot's process is gone: the broker re-runs its task
                conn.dead = True
                self.rescan = True
                break
            flags = socket.MSG_DONTWAIT
            try:
                frames = _frames(bytes(conn.buf[:n]))
                kind, body = protocol.decode(frames)
                if kind is not Msg.RESULTS:
                    raise ProtocolError(f"unexpected {kind.name} from a direct slot")
                out.extend(protocol.decode_results(frames, body))
            except ProtocolError as exc:
                log.warning("dropped a message from a direct slot: %s", exc)
        with self._lock:
            for e in out:
                if self.busy.get(e.id) is conn:
                    del self.busy[e.id]
                    self.keys.pop(e.id, None)
        # A header only (Flag.DIRECT): the result was too large for the channel and comes by the broker.
        return [e for e in out if not e.flags & Flag.DIRECT]

    def wait(self, task_id: int, done: Any, timeout: float | None) -> list[ResultEntry]:
        """A user thread waits for its direct task: read its slot's connection itself, unless another
        thread reads it. Returns what it read (the driver completes those futures); [] if it did not
        read, or the time ran out, or ``done()`` became true (a cancel, a result by the broker)."""
        conn = self.busy.get(task_id)
        if conn is None or not conn.reading.acquire(blocking=False):
            return []
        out: list[ResultEntry] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not conn.dead and self.busy.get(task_id) is conn and not done():
                # In slices: a result that takes the broker path (the slot died, a cancel) ends our wait.
                slice_s = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if slice_s <= 0:
                    break
                try:
                    r, _, _ = select.select([conn.fd], [], [], slice_s)
                except (OSError, ValueError):  # closed meanwhile (the driver shuts down)
                    break
                if r:
                    out += self._read(conn, block=False)
        finally:
            conn.reading.release()
            if (conn.dead or self.busy.get(task_id) is conn) and self.wake is not None:
                self.wake()  # the I/O thread reads it (or drops it) from here on
        return out

    def watch(self, poller: Any) -> None:
        """I/O thread: poll the connections no user thread is reading."""
        for conn in list(self.conns.values()):
            if not conn.watched and not conn.reading.locked() and not conn.dead:
                poller.register(conn.fd, zmq.POLLIN)
                conn.watched = True

    def receive(self, poller: Any, events: dict[Any, int]) -> list[ResultEntry]:
        """I/O thread: results on the watched connections that are readable."""
        out: list[ResultEntry] = []
        for conn in list(self.conns.values()):
            if not conn.watched or conn.fd not in events:
                continue
            if conn.reading.acquire(blocking=False):
                try:
                    out += self._read(conn, block=False)
                finally:
                    conn.reading.release()
            else:  # a user thread reads it: leave it to that thread, do not spin on it
                poller.unregister(conn.fd)
                conn.watched = False
        return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self.conns.values())
            self.conns.clear()
        for conn in conns:
            conn.dead = True
            conn.sock.close()
        self.ready = False


def eligible(nbytes: int, segment: Any, pinned: bool, call: Any, request: Any, traced: Any, nested: bool,
             shipper: Any, inflight: int) -> bool:
    """Whether a task may take the direct path (see the module docstring)."""
    return (inflight == 0 and not nbytes and segment is None and not pinned and call is None
            and request is None and traced is None and not nested and shipper is None)


def unlink(paths: Iterable[str]) -> None:
    """Remove slot socket files (a worker leaving at once, without closing its sockets)."""
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


def remove_sockets(directory: str) -> None:
    """The embedded cluster's broker stops: remove every slot socket file left in its private directory."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(_PREFIX)]
    except OSError:
        return
    unlink(os.path.join(directory, n) for n in names)
