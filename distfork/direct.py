"""The direct path: a lone fork goes from the driver straight to an idle worker slot.

::

     driver                                 worker slot thread                 broker
     ┌──────────────────────┐ TASKS (ipc, ┌─────────────────────────────┐     ┌──────────────────────┐
     │ fork(): a sender     │ private dir)│ SlotServer: queue it like   │     │                      │
     │ DEALER per slot, lock│ ──────────▶ │ any task; its result goes   │     │                      │
     │ I/O thread: a DEALER │ ◀────────── │ to the driver, a header     │ ──▶ │ Flag.DIRECT result:  │
     │ per slot, receives   │   RESULTS   │ (Flag.DIRECT) to the broker │     │ counted, not routed  │
     │ I/O thread: notices  │ ─────────── DIRECT notices (≤ 1 ms) ────────────▶│ adopt(): the task is │
     └──────────────────────┘                                                  │ ASSIGNED to the slot │
                                                                               └──────────────────────┘

``wait(fork(f, x))`` crosses the broker twice on the broker path (driver ->
broker -> worker -> broker -> driver: four ZeroMQ messages, two broker
turns). Here it is one message each way, sent by ``fork()`` itself. The
broker still knows every task: within ``DIRECT_NOTICE_S`` (1 ms, batched),
and always before anything else the driver sends it, the I/O thread sends a
``DIRECT`` notice (the task's key, the slot, its own task id and the
payload), so the notice is ahead of anything the driver submits later (the
broker never hands that slot another task of ours meanwhile). From there the
task is an ordinary task assigned to that slot:

- the slot's process dies mid-task: the broker re-queues it (it has the
  payload) or fails it with ``WorkerLostError``, and the result reaches the
  driver by the broker path, exactly as for a task the broker dispatched; a
  notice that comes after the slot's loss queues the task as a retry;
- ``fut.cancel()`` and ``timeout_s``: the broker aborts the slot's task by
  its key, as always; ``distfork status`` counts it;
- the slot's result header may reach the broker before the notice: it is
  kept (``Adopter.early``) and the notice then completes the task at once;
- broker restart: the driver re-submits every unfinished task, direct ones
  too; the driver completes a future once, whichever result comes first.

Which tasks: only when the driver has nothing else in flight (so every slot
of its embedded cluster is idle and none is held back from other work: there
is no lease to revoke), and only plain calls: no future arguments, resources,
trace, shared-memory arguments, shipped code, not forked inside a task.
Everything else takes the broker path. Results come back as frames (never a
shared-memory segment). Only for a driver of the embedded cluster: the
slots bind ``ipc://`` sockets in the cluster's private 0700 directory (the
broker's, see ``security.private_ipc``), files 0600, no TCP port.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import zmq

from . import protocol, security
from .config import DIRECT_NOTICE_S
from .errors import ProtocolError
from .protocol import Flag, Msg, ResultEntry, TaskEntry

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


# -- the driver side ------------------------------------------------------------


class DirectClient:
    """The driver's sockets to the slots of its embedded cluster.

    Per slot, two DEALERs: the I/O thread's (routing id: the driver's
    identity), which the slot answers on, and a sender that user threads use
    under ``_lock`` (``submit`` sends a lone task itself: no wake-up of the
    I/O thread, no turn of it on the task's way). **Chosen differently** from
    house rule 2 (a socket is one thread's): a sender is used by whichever
    user thread holds the lock, which ZeroMQ allows (the lock is the memory
    barrier it asks for); the I/O thread creates and closes them under it.
    ``busy``, ``notices`` and the senders are guarded by ``_lock``; the
    receiving sockets and the scan are the I/O thread's.
    """

    def __init__(self, ctx: zmq.Context[Any], address: str, identity: bytes, scan_s: float) -> None:
        self._ctx = ctx
        self._scan_s = scan_s
        self.next_scan = 0.0
        self._dir = _directory(address)
        self._identity = identity
        self.socks: dict[str, zmq.Socket[Any]] = {}  # socket file -> the I/O thread's DEALER
        self._by_sock: dict[zmq.Socket[Any], str] = {}
        self._lock = threading.Lock()
        self._senders: dict[str, zmq.Socket[Any]] = {}  # socket file -> the user threads' DEALER
        self._closed = False
        self.busy: dict[int, str] = {}  # task id -> the slot it was sent to, no result from there yet
        self.ready = False
        self.rescan = True
        # DIRECT notices not sent yet, and when the oldest was made (see config.DIRECT_NOTICE_S).
        self.notices: list[TaskEntry] = []
        self.notices_at = 0.0
        self.urgent = False  # a task with timeout_s: its slot may end it any moment, by its key

    def _dealer(self, name: str, identity: bytes) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # a send to a slot not connected (yet, or any more) fails at once
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(f"ipc://{os.path.join(self._dir, name)}")
        return sock

    def scan(self, poller: zmq.Poller, now: float) -> None:
        """Connect to new slot sockets, drop those of dead processes (the broker handles their tasks)."""
        self.rescan = False
        self.next_scan = now + self._scan_s
        try:
            names = {n for n in os.listdir(self._dir) if n.startswith(_PREFIX)}
        except OSError:
            names = set()
        for name in list(self.socks):
            if name not in names or not _alive(_pid_of(name)):
                self._drop(name, poller)
        for name in sorted(names - set(self.socks)):
            if not _alive(_pid_of(name)):
                continue
            sock = self._dealer(name, self._identity)
            poller.register(sock, zmq.POLLIN)
            self.socks[name] = sock
            self._by_sock[sock] = name
            sender = self._dealer(name, self._identity + b"s")
            with self._lock:
                self._senders[name] = sender
        self.ready = bool(self.socks)

    def _drop(self, name: str, poller: zmq.Poller) -> None:
        sock = self.socks.pop(name)
        del self._by_sock[sock]
        poller.unregister(sock)
        sock.close(linger=0)
        with self._lock:
            self._senders.pop(name).close(linger=0)
            for task_id in [i for i, where in self.busy.items() if where == name]:
                del self.busy[task_id]

    def send(self, e: TaskEntry, now: float) -> bool:
        """From a user thread: send a task to a slot with none of ours (its DIRECT notice waits in
        :attr:`notices` for the I/O thread); False if no slot takes it now (the broker path then)."""
        with self._lock:
            if self._closed:
                return False
            taken = set(self.busy.values())
            for name, sender in self._senders.items():
                if name in taken:
                    continue
                key = _KEY_BASE + random.getrandbits(61)
                origin = protocol.encode_origin(self._identity, e.id)
                task = TaskEntry(key, e.max_retries, e.timeout_s, [origin, *e.frames], 0)
                try:
                    sender.send_multipart(protocol.encode_batch(Msg.TASKS, [task]), zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    self.rescan = True  # not connected: a slot starting, or gone
                    continue
                self.busy[e.id] = name
                if not self.notices:
                    self.notices_at = now
                self.notices.append(TaskEntry(key, e.max_retries, e.timeout_s,
                                              [protocol.encode_origin(_slot_of(name), e.id), *e.frames], 0))
                self.urgent = self.urgent or e.timeout_s > 0
                return True
            return False

    def notices_due(self, now: float) -> float | None:
        """Seconds until the notices must go (0: now), None if there are none."""
        if not self.notices:
            return None
        return 0.0 if self.urgent else max(0.0, self.notices_at + DIRECT_NOTICE_S - now)

    def take_notices(self) -> list[TaskEntry]:
        with self._lock:
            notices, self.notices, self.urgent = self.notices, [], False
        return notices

    def receive(self, sock: zmq.Socket[Any]) -> list[ResultEntry]:
        """Results a slot sent us straight."""
        out: list[ResultEntry] = []
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                kind, body = protocol.decode(frames)
                if kind is not Msg.RESULTS:
                    raise ProtocolError(f"unexpected {kind.name} from a direct slot")
                entries = protocol.decode_results(frames, body)
            except ProtocolError as exc:
                log.warning("dropped a message from a direct slot: %s", exc)
                continue
            out.extend(entries)
        with self._lock:
            for e in out:
                self.busy.pop(e.id, None)
        return out

    def sockets(self) -> Sequence[zmq.Socket[Any]]:
        return list(self._by_sock)

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close(linger=0)
        self.socks.clear()
        self._by_sock.clear()
        with self._lock:
            self._closed = True
            for sender in self._senders.values():
                sender.close(linger=0)
            self._senders.clear()
        self.ready = False


def eligible(nbytes: int, segment: Any, pinned: bool, call: Any, request: Any, traced: Any, nested: bool,
             shipper: Any, inflight: int) -> bool:
    """Whether a task may take the direct path (see the module docstring)."""
    return (inflight == 0 and not nbytes and segment is None and not pinned and call is None
            and request is None and traced is None and not nested and shipper is None)


# -- the worker side ------------------------------------------------------------


class SlotServer:
    """A worker slot's ROUTER that drivers send lone tasks to (owned by the slot thread)."""

    def __init__(self, ctx: zmq.Context[Any], address: str, identity: bytes) -> None:
        self.path = os.path.join(_directory(address), f"{_PREFIX}{os.getpid()}-{identity.hex()}")
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a driver not connected: its result goes by the broker
        old = os.umask(0o177)  # the socket file: 0600 (its directory is 0700 already)
        try:
            self.sock.bind(f"ipc://{self.path}")
        finally:
            os.umask(old)
        # Direct tasks queued or running here: key -> (driver routing id, the driver's task id).
        self.routes: dict[int, tuple[bytes, int]] = {}

    @classmethod
    def open(cls, ctx: zmq.Context[Any], config: Any, address: str, identity: bytes) -> SlotServer | None:
        if not enabled(config, address):
            return None
        try:
            return cls(ctx, address, identity)
        except (OSError, zmq.ZMQError) as exc:
            log.warning("no direct path for slot %s: %s", identity.hex(), exc)
            return None

    def drain(self, local: Any) -> None:
        """Queue the tasks drivers sent us (their driver told the broker of them)."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                kind, body = protocol.decode(frames[1:])
                if kind is not Msg.TASKS:
                    raise ProtocolError(f"unexpected {kind.name} on a direct socket")
                entries = protocol.decode_tasks(frames[1:], body)
                origins = [protocol.decode_origin(e.frames[0]) if e.frames else None for e in entries]
            except ProtocolError as exc:
                log.warning("dropped a message on a direct socket: %s", exc)
                continue
            for e, origin in zip(entries, origins, strict=True):
                if origin is None:
                    continue
                self.routes[e.id] = origin  # answered on the driver's I/O socket, not the sender's
                local.append(TaskEntry(e.id, e.max_retries, e.timeout_s, e.frames[1:], 0))

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

    def results(self, worker: PeerInfo, entries: list[ResultEntry]) -> list[ResultEntry]:
        """Before ``BrokerState.results``: keep the direct results whose notice has not come yet
        (the driver batches its notices: usually the result comes first); the others go on."""
        if not any(e.id >= _KEY_BASE for e in entries):
            return entries
        rest = []
        for e in entries:
            if e.id >= _KEY_BASE and e.id not in worker.assigned:
                if len(self.early) > 100_000:  # notices that never came (their driver left)
                    self.early.clear()
                self.early[e.id] = (e.status, e.run_s, e.frames, e.flags)
            else:
                rest.append(e)
        return rest

    def adopt(self, state: BrokerState, driver: PeerInfo, entries: Sequence[TaskEntry], now: float) -> None:
        """A driver sent these tasks straight to slots: they are its tasks, assigned to those slots."""
        from .broker_state import Task  # here: broker_state does not import us

        state._now = now
        for e in entries:
            if not e.frames:
                raise ProtocolError("a direct task without its origin")
            slot_id, task_id = protocol.decode_origin(e.frames[0])
            if task_id in driver.tasks:
                continue
            task = Task(e.id, driver.id, task_id, e.max_retries, e.timeout_s, e.frames[1:], driver.domain,
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
                if worker.assigned:
                    # Handed to the slot before we heard of this task (children it forked, typically):
                    # they wait behind it there, and it may wait for them. Take them back.
                    waiting = list(worker.assigned.values())
                    state._cancels.setdefault(worker.id, []).extend(t.key for t in waiting)
                    for t in reversed(waiting):
                        del worker.assigned[t.key]
                        state._requeue(t)
                    state.counters["tasks_stolen"] += len(waiting)
                state._give(worker, task, {})
            else:  # the slot was lost before we heard of this task: run it again elsewhere
                state._requeue(task)
