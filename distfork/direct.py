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
"""

from __future__ import annotations

import logging
import math
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

from . import protocol, security
from .config import DIRECT_NOTICE_S
from .errors import ProtocolError
from .protocol import Flag, Msg, ResultEntry, Status, TaskEntry

if TYPE_CHECKING:
    from .broker_state import BrokerState, PeerInfo

__all__ = ["Adopter", "DirectClient", "SlotServer", "eligible", "enabled", "remove_sockets", "unlink"]

log = logging.getLogger(__name__)

_PREFIX = "direct-"
#: Keys a slot gives its direct tasks: above any key the broker hands out (it counts up from
#: below 2**49), random so that two slots never pick the same one.
_KEY_BASE = 1 << 62


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
            if conn.dead or name not in names or not _alive(_pid_of(name)):
                self._drop(conn, poller)
        for name in sorted(names - set(self.conns)):
            if not _alive(_pid_of(name)):
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
        key = _KEY_BASE + random.getrandbits(61)
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


# -- the worker side ------------------------------------------------------------


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


# -- the broker side ------------------------------------------------------------


class Adopter:
    """The broker's part (its loop thread): DIRECT notices from drivers, Flag.DIRECT results from slots."""

    def __init__(self) -> None:
        # Results of direct tasks that came before their driver's notice: key -> (status, run_s, frames,
        # flags). Only a header (Flag.DIRECT), unless the slot could not reach the driver.
        self.early: dict[int, tuple[int, float, Sequence[Any], int]] = {}
        # Keys of the tasks adopted lately: a task that forked has two notices, its driver's and the one
        # its slot's process relayed (see relay()); the second is ignored.
        self.seen: dict[int, None] = {}

    def results(self, state: BrokerState, worker: PeerInfo, entries: list[ResultEntry]) -> list[ResultEntry]:
        """Before ``BrokerState.results``: keep the direct results whose notice has not come yet
        (the driver batches its notices: usually the result comes first); the others go on."""
        if not any(e.id >= _KEY_BASE for e in entries):
            return entries
        rest = []
        for e in entries:
            task = worker.assigned.get(e.id) if e.flags & Flag.DIRECT else None
            if task is not None and task.dependents:
                # Calls name it, but its value went straight to the driver (it answered before its
                # slot heard of them, see DirectClient.route): the driver sends them again with it.
                self._resubmit(state, task.dependents)
                task.dependents = None
            if e.id >= _KEY_BASE and e.id not in worker.assigned:
                if len(self.early) > 100_000:  # notices that never came (their driver left)
                    self.early.clear()
                self.early[e.id] = (e.status, e.run_s, e.frames, e.flags)
            else:
                rest.append(e)
        return rest

    @staticmethod
    def _resubmit(state: BrokerState, dependents: Sequence[Any]) -> None:
        from .broker_state import TaskState

        for d in dependents:
            if d.state is TaskState.WAITING:
                state.counters["tasks_resubmitted"] += 1
                state._finish(d, Status.RESUBMIT, 0.0, [])

    def adopt(self, state: BrokerState, driver: PeerInfo, entries: Sequence[TaskEntry], now: float) -> None:
        """A driver sent these tasks straight to slots: they are its tasks, assigned to those slots."""
        from .broker_state import Task  # here: broker_state does not import us

        state._now = now
        for e in entries:
            if not e.frames:
                raise ProtocolError("a direct task without its origin")
            slot_id, task_id = protocol.decode_origin(e.frames[0])
            payload = e.frames[1:]
            owner: PeerInfo | None = driver
            if e.flags & Flag.NESTED:  # relayed by the slot's process: the driver is named next
                if len(e.frames) < 2:
                    raise ProtocolError("a relayed direct task without its driver")
                owner, payload = state.peers.get(bytes(e.frames[1])), e.frames[2:]
            if e.id in self.seen:
                del self.seen[e.id]
                continue
            if owner is None or task_id in owner.tasks:
                continue
            self.seen[e.id] = None
            if len(self.seen) > 10_000:  # the other notice of most never comes: forget the oldest
                for key in list(self.seen)[:5_000]:
                    del self.seen[key]
            driver = owner
            task = Task(e.id, driver.id, task_id, e.max_retries, e.timeout_s, payload, driver.domain,
                        submitted=now)
            driver.tasks[task_id] = task
            state.counters["tasks_submitted"] += 1
            state.counters["tasks_direct"] += 1
            early = self.early.pop(e.id, None)
            worker = state.workers.get(slot_id)
            if early is not None:  # it ran already
                status, run_s, frames, flags = early
                state._finish(task, status, run_s, frames, flags)
            elif worker is not None:
                # Handed to the slot before we heard of this task (children it forked from a thread of
                # its own, not relayed): they wait behind it there, and it may wait for them. Take them
                # back. Not direct tasks: the slot has those already (their results are on the way).
                waiting = [t for t in worker.assigned.values() if t.key < _KEY_BASE]
                if waiting:
                    state._cancels.setdefault(worker.id, []).extend(t.key for t in waiting)
                    for t in reversed(waiting):
                        del worker.assigned[t.key]
                        state._requeue(t)
                    state.counters["tasks_stolen"] += len(waiting)
                state._give(worker, task, {})
            else:  # the slot was lost before we heard of this task: run it again elsewhere
                state._requeue(task)
