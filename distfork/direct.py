"""The direct path: a lone fork goes from the driver straight to an idle worker slot.

::

     driver I/O thread              worker slot thread                       broker
     ┌──────────────────┐  TASKS   ┌──────────────────────────────┐ DIRECT  ┌─────────────────────┐
     │ DirectClient:    │ ───────▶ │ SlotServer.drain: a key per  │ ──────▶ │ adopt(): the task is │
     │ a DEALER per     │  ipc,    │ task, tell the broker first, │ (before │ ASSIGNED to the slot │
     │ slot socket it   │  private │ then queue it like any other │  it     │ as if dispatched:    │
     │ found in the     │  dir     │ task; its RESULT goes to the │  runs)  │ loss, retry, cancel, │
     │ cluster's dir    │ ◀─────── │ driver, a header-only RESULTS│ ──────▶ │ timeout, status      │
     └──────────────────┘ RESULTS  │ entry (Flag.DIRECT) to us    │         │ work as usual        │
                                   └──────────────────────────────┘         └─────────────────────┘

``wait(fork(f, x))`` crosses the broker twice on the broker path (driver ->
broker -> worker -> broker -> driver: four ZeroMQ messages, two broker
turns). Here it is one message each way. The broker still knows every task:
the slot sends it a ``DIRECT`` notice (key, driver, the driver's task id and
the payload) *before* the task runs, on the slot's own broker socket, so the
notice is ahead of the result and of the slot's loss. From there the task is
an ordinary task assigned to that slot:

- the slot's process dies mid-task: the broker re-queues it (it has the
  payload) or fails it with ``WorkerLostError``, and the result reaches the
  driver by the broker path, exactly as for a task the broker dispatched;
- ``fut.cancel()`` and ``timeout_s``: the broker aborts the slot's task by
  its key, as always; ``distfork status`` counts it;
- broker restart: the driver re-submits every unfinished task, direct ones
  too; the broker ignores ids it has, and the driver completes a future
  once, whichever result arrives first.

Which tasks: only when the driver has nothing else in flight (so every slot
of its embedded cluster is idle and no slot is held back from other work:
no lease to revoke), and only plain calls: no future arguments, resources,
trace, shared-memory arguments, shipped code, not forked inside a task.
Everything else takes the broker path. Results come back as frames (never a
shared-memory segment). Only for a driver of the embedded cluster: the
slots bind ``ipc://`` sockets in the cluster's private 0700 directory (the
broker's, see ``security.private_ipc``), files 0600, no TCP port.

A slot that died before its notice reached the broker (a window of
microseconds) would leave its task unknown there: the driver re-submits the
direct tasks of a slot whose process is gone (its socket file names its pid)
through the broker, which ignores ids it already has.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import zmq

from . import protocol, security
from .errors import ProtocolError
from .protocol import Flag, Msg, ResultEntry, Role, TaskEntry

if TYPE_CHECKING:
    from .broker_state import BrokerState, PeerInfo

__all__ = ["DirectClient", "SlotServer", "adopt", "enabled"]

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


# -- the driver side ------------------------------------------------------------


class DirectClient:
    """The driver's sockets to the slots of its embedded cluster (owned by its I/O thread).

    ``ready`` is read by user threads (submit): some slot socket is known.
    Everything else is the I/O thread's.
    """

    def __init__(self, ctx: zmq.Context[Any], address: str, identity: bytes, scan_s: float) -> None:
        self._ctx = ctx
        self._scan_s = scan_s
        self.next_scan = 0.0
        # Tasks of slots found dead, kept one scan long: by then the broker (told of them, but for a
        # slot that died within microseconds of taking one) has re-queued or failed them itself.
        self._orphans: list[TaskEntry] = []
        self._dir = _directory(address)
        self._identity = identity
        self.socks: dict[str, zmq.Socket[Any]] = {}  # socket file -> DEALER
        self._by_sock: dict[zmq.Socket[Any], str] = {}
        self.busy: dict[int, tuple[str, TaskEntry]] = {}  # task id -> (its slot, its entry): sent, no result yet
        self.ready = False
        self.rescan = True

    def scan(self, poller: zmq.Poller, now: float) -> list[TaskEntry]:
        """Connect to new slot sockets, drop those of dead processes; tasks to send by the broker instead
        (the broker ignores those it has)."""
        self.rescan = False
        self.next_scan = now + self._scan_s
        try:
            names = {n for n in os.listdir(self._dir) if n.startswith(_PREFIX)}
        except OSError:
            names = set()
        orphans, self._orphans = self._orphans, []
        for name in list(self.socks):
            if name not in names or not _alive(_pid_of(name)):
                self._orphans.extend(self._drop(name, poller))
        for name in sorted(names - set(self.socks)):
            if not _alive(_pid_of(name)):
                continue
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, self._identity)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # a send to a slot not connected (yet, or any more) fails at once
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.connect(f"ipc://{os.path.join(self._dir, name)}")
            poller.register(sock, zmq.POLLIN)
            self.socks[name] = sock
            self._by_sock[sock] = name
        self.ready = bool(self.socks)
        return orphans

    def _drop(self, name: str, poller: zmq.Poller) -> list[TaskEntry]:
        sock = self.socks.pop(name)
        del self._by_sock[sock]
        poller.unregister(sock)
        sock.close(linger=0)
        lost = [e for where, e in self.busy.values() if where == name]
        for e in lost:
            del self.busy[e.id]
        return lost

    def send(self, entries: Iterable[TaskEntry]) -> list[TaskEntry]:
        """Each task to a slot with none of ours; those no slot takes now are returned (broker path)."""
        rest: list[TaskEntry] = []
        taken = {where for where, _ in self.busy.values()}
        free = [n for n in self.socks if n not in taken]
        for e in entries:
            while free:
                name = free.pop(0)
                try:
                    self.socks[name].send_multipart(protocol.encode_batch(Msg.TASKS, [e]), zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    self.rescan = True  # not connected: a slot starting, or gone
                    continue
                self.busy[e.id] = (name, e)
                free.append(name)  # the next lone task goes to the same (warm) slot: it is done by then
                break
            else:
                rest.append(e)
        return rest

    def receive(self, sock: zmq.Socket[Any]) -> list[ResultEntry]:
        """Results a slot sent us straight."""
        out: list[ResultEntry] = []
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return out
            try:
                kind, body = protocol.decode(frames)
                if kind is not Msg.RESULTS:
                    raise ProtocolError(f"unexpected {kind.name} from a direct slot")
                entries = protocol.decode_results(frames, body)
            except ProtocolError as exc:
                log.warning("dropped a message from a direct slot: %s", exc)
                continue
            for e in entries:
                self.busy.pop(e.id, None)
            out.extend(entries)

    def forget(self, task_id: int) -> None:
        """A task ended another way (by the broker path, cancelled): its slot is free for us again."""
        self.busy.pop(task_id, None)

    def sockets(self) -> Sequence[zmq.Socket[Any]]:
        return list(self._by_sock)

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close(linger=0)
        self.socks.clear()
        self._by_sock.clear()
        self.ready = False


def eligible(nbytes: int, segment: Any, pinned: bool, call: Any, request: Any, traced: Any, nested: bool,
             shipper: Any, inflight: int) -> bool:
    """Whether a task may take the direct path (see the module docstring)."""
    return (inflight == 0 and not nbytes and segment is None and not pinned and call is None
            and request is None and traced is None and not nested and shipper is None)


# -- the worker side ------------------------------------------------------------


class SlotServer:
    """A worker slot's ROUTER that drivers send lone tasks to (owned by the slot thread)."""

    def __init__(self, ctx: zmq.Context[Any], address: str, index: int) -> None:
        self.path = os.path.join(_directory(address), f"{_PREFIX}{os.getpid()}-{index}")
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        old = os.umask(0o177)  # the socket file: 0600 (its directory is 0700 already)
        try:
            self.sock.bind(f"ipc://{self.path}")
        finally:
            os.umask(old)
        # Direct tasks queued or running here: key -> (driver routing id, the driver's task id).
        self.routes: dict[int, tuple[bytes, int]] = {}

    @classmethod
    def open(cls, ctx: zmq.Context[Any], config: Any, address: str, index: int) -> SlotServer | None:
        if not enabled(config, address):
            return None
        try:
            return cls(ctx, address, index)
        except (OSError, zmq.ZMQError) as exc:
            log.warning("no direct path for slot %d: %s", index, exc)
            return None

    def drain(self, broker: zmq.Socket[Any], local: Any) -> None:
        """Take the tasks drivers sent; tell the broker of them (before they run), queue them."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                driver = frames[0].bytes
                kind, body = protocol.decode(frames[1:])
                if kind is not Msg.TASKS:
                    raise ProtocolError(f"unexpected {kind.name} on a direct socket")
                entries = protocol.decode_tasks(frames[1:], body)
            except ProtocolError as exc:
                log.warning("dropped a message on a direct socket: %s", exc)
                continue
            notices: list[TaskEntry] = []
            for e in entries:
                key = _KEY_BASE + random.getrandbits(61)
                self.routes[key] = (driver, e.id)
                notices.append(TaskEntry(key, e.max_retries, e.timeout_s,
                                         [protocol.encode_origin(driver, e.id), *e.frames], 0))
                local.append(TaskEntry(key, e.max_retries, e.timeout_s, e.frames, 0))
            broker.send_multipart(protocol.encode_batch(Msg.DIRECT, notices), copy=False)

    def deliver(self, done: list[ResultEntry]) -> list[ResultEntry]:
        """Results of direct tasks go to their drivers; the broker gets header-only entries for them."""
        if not self.routes:
            return done
        to_broker: list[ResultEntry] = []
        for e in done:
            route = self.routes.pop(e.id, None)
            if route is None:
                to_broker.append(e)
                continue
            driver, task_id = route
            try:
                self.sock.send_multipart(
                    [driver, *protocol.encode_batch(Msg.RESULTS, [ResultEntry(task_id, e.status, e.run_s, e.frames,
                                                                              e.flags)])],
                    zmq.NOBLOCK, copy=False,
                )
                to_broker.append(ResultEntry(e.id, e.status, e.run_s, [], e.flags | Flag.DIRECT))
            except zmq.ZMQError:  # the driver is gone (or not reachable): the broker routes it the usual way
                to_broker.append(e)
        if len(self.routes) > 10_000:  # keys of direct tasks cancelled before they ran
            self.routes.clear()
        return to_broker

    def close(self) -> None:
        self.sock.close(linger=0)
        try:
            os.unlink(self.path)
        except OSError:
            pass


# -- the broker side ------------------------------------------------------------


def adopt(state: BrokerState, worker: PeerInfo, entries: Sequence[TaskEntry], now: float) -> None:
    """A slot tells us of tasks a driver sent it directly: they are that driver's, assigned to the slot."""
    from .broker_state import Task  # here: broker_state imports nothing of ours

    state._now = now
    for e in entries:
        if not e.frames:
            raise ProtocolError("a direct task without its origin")
        driver_id, task_id = protocol.decode_origin(e.frames[0])
        driver = state.peers.get(driver_id)
        if driver is None or driver.role is not Role.DRIVER or task_id in driver.tasks or e.id in worker.assigned:
            continue  # a driver we do not know (yet): it re-submits what is unfinished when it says hello
        task = Task(e.id, driver.id, task_id, e.max_retries, e.timeout_s, e.frames[1:], driver.domain,
                    submitted=now)
        driver.tasks[task_id] = task
        state._give(worker, task, {})
        state.counters["tasks_submitted"] += 1
        state.counters["tasks_direct"] += 1
