"""The driver side: futures out, results in, one I/O thread owning the socket.

::

     user threads                       I/O thread "distfork-driver-io"
     ┌──────────────────────┐  deque   ┌──────────────────────────────┐  DEALER   ┌────────┐
     │ fork(): pickle call, │ ───────▶ │ batch what is pending into   │ ────────▶ │ broker │
     │ take a window slot,  │  + pipe  │ one SUBMIT; decode RESULTS,  │ ◀──────── │ ROUTER │
     │ append, wake once    │  wake-up │ set futures, free the slots  │           └────────┘
     └──────────────────────┘          └──────────────────────────────┘
            ▲  Future.result() waits on the future's own condition  │
            └───────────────────────────────────────────────────────┘

``fork`` never touches the socket: it appends the pickled call to a deque and
writes one byte to a pipe only if the I/O thread is not already due to wake,
so a burst of forks costs one wake-up and goes out as one message.

The driver keeps each task's pickled call until its result arrives. If the
broker restarts, it answers our next message with REJECT; we say hello again
and re-submit everything unfinished; the broker ignores task ids it already
holds, so no task is lost and none is completed twice.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import InvalidStateError
from typing import Any

import zmq

from . import protocol, security, serialize, shm
from .config import Config
from .errors import (
    AuthenticationError,
    BrokerUnavailableError,
    DistforkError,
    ProtocolError,
    SerializationError,
    WorkerLostError,
)
from .future import Future, callback_runner
from .protocol import Entry, Flag, Msg, Status

__all__ = ["Driver", "complete"]

log = logging.getLogger(__name__)

_BATCH_MAX = 2000  # tasks per SUBMIT message


class Driver:
    """A connection to a broker that turns pickled calls into futures."""

    def __init__(self, address: str, config: Config, name: str | None = None, nested: bool = False) -> None:
        self.address = address
        # In a worker process (tasks that fork): tasks are flagged NESTED and a
        # future waited for while still queued is reclaimed and run in the waiter.
        self.nested = nested
        self._reclaims: collections.deque[int] = collections.deque()
        self._recycles: collections.deque[str] = collections.deque()
        self._reclaim_waiters: dict[int, tuple[threading.Event, list[bool]]] = {}
        self.config = config
        self.name = name or f"driver-{socket.gethostname()}-{os.getpid()}"
        self.identity = b"D" + os.urandom(8)
        self.welcome: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._outgoing: collections.deque[Entry] = collections.deque()
        self._cancels: collections.deque[int] = collections.deque()
        # task id -> (future, entry kept for re-submission, shm segment it owns, large bytes)
        self._inflight: dict[int, tuple[Future[Any], Entry, shm.Segment | None, int]] = {}
        self._window = threading.Semaphore(config.window)
        self._bytes_inflight = 0
        self._bytes_room = threading.Condition()
        self.shm_domain = shm.domain() if config.shm else None
        self._session: str | None = None
        self._segments: shm.SegmentPool | None = None  # created with the broker's session
        self._pool: shm.SegmentPool | None = None  # the same, while a worker shares our /dev/shm
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_pending = False
        self._keys = security.client_keys(config)  # bad key settings fail here, in the caller
        self._refused: str | None = None
        self._welcomed = threading.Event()
        self._closing = False
        self._closed = threading.Event()
        self._ctx = zmq.Context()
        self._thread = threading.Thread(target=self._run, name="distfork-driver-io", daemon=True)
        callback_runner.io_threads.add(self._thread)
        self._thread.start()

    # -- called from user threads -------------------------------------------

    def connect(self, timeout_s: float | None = None) -> None:
        """Wait until the broker has answered our hello."""
        timeout_s = self.config.connect_timeout_s if timeout_s is None else timeout_s
        welcomed = self._welcomed.wait(timeout_s)
        if self._refused is not None:
            self.close()
            raise AuthenticationError(self._refused)
        if not welcomed:
            self.close()
            raise BrokerUnavailableError(
                f"no distfork broker answered at {self.address} within {timeout_s:g} s; "
                "start one with `distfork up` (or `distfork broker`), or fix the address given to "
                "distfork.init / DISTFORK_ADDRESS; if that broker uses keys, give ours too "
                "(distfork.init(keys_dir=...) or DISTFORK_KEYS_DIR)"
            )

    def submit(
        self, frames: list[Any], max_retries: int = protocol.DEFAULT_RETRIES, timeout_s: float = 0.0
    ) -> Future[Any]:
        """Send a pickled call (``serialize.dumps_call`` output); its future completes with the result.

        Blocks while the in-flight window (tasks, or bytes of large arguments)
        is full. Large buffers go to shared memory when a worker can read it.
        """
        if self._closing:
            raise DistforkError("this distfork driver was shut down; call distfork.init() to start again")
        nbytes = serialize.oob_bytes(frames)
        if nbytes:
            with self._bytes_room:
                self._bytes_room.wait_for(
                    lambda: self._bytes_inflight == 0 or self._bytes_inflight + nbytes <= self.config.window_bytes
                )
                self._bytes_inflight += nbytes
        self._window.acquire()
        frames, segment = serialize.route(frames, self._pool)
        task_id = next(self._ids)
        fut: Future[Any] = Future(self._cancel, self._reclaim if self.nested else None)
        fut.task_id = task_id  # type: ignore[attr-defined]
        flags = (Flag.PINNED if segment is not None else 0) | (Flag.NESTED if self.nested else 0)
        entry = Entry(task_id, max_retries, timeout_s, frames, flags)
        self._inflight[task_id] = (fut, entry, segment, nbytes)
        self._outgoing.append(entry)
        self._wake()
        return fut

    def _release(self, segment: shm.Segment | None, nbytes: int, reusable: bool = False) -> None:
        """A task ended: free its window slot, its segment (reused if nobody maps it) and its bytes."""
        self._window.release()
        if segment is not None:
            if reusable and self._segments is not None:
                self._segments.recycle(segment)
            else:
                segment.release()
                segment.unlink()
        if nbytes:
            with self._bytes_room:
                self._bytes_inflight -= nbytes
                self._bytes_room.notify_all()

    @property
    def unfinished(self) -> int:
        return len(self._inflight)

    def close(self, cancel: bool = True) -> None:
        """Stop the I/O thread; unfinished futures are cancelled."""
        if self._closing:
            self._closed.wait()
            return
        self._closing = True
        self._wake(force=True)
        self._thread.join()
        callback_runner.io_threads.discard(self._thread)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._ctx.term()
        for fut, _, segment, nbytes in list(self._inflight.values()):
            fut.cancel()
            self._release(segment, nbytes)
        self._inflight.clear()
        while self._recycles:
            shm.unlink(self._recycles.popleft())
        if self._segments is not None:
            self._segments.close()
        self._closed.set()

    def _reclaim(self, fut: Future[Any], local: bool = True) -> None:
        """Run a task in this thread if it has not started: one not sent yet (if ``local``), or
        one the broker gives back because no free slot can start it now."""
        task_id: int = fut.task_id  # type: ignore[attr-defined]
        item = self._inflight.get(task_id)
        if item is None or self._closing:
            return
        if local:
            try:
                self._outgoing.remove(item[1])  # not even sent yet: nobody else can have it
            except ValueError:
                pass
            else:
                self._run_here(fut, task_id)
                return
        done, answer = threading.Event(), [False]
        self._reclaim_waiters[task_id] = (done, answer)
        self._reclaims.append(task_id)
        self._wake()
        if not done.wait(self.config.peer_timeout_s) or not answer[0]:
            self._reclaim_waiters.pop(task_id, None)
            return  # running elsewhere (or no answer): wait for it as usual
        self._run_here(fut, task_id)

    def _run_here(self, fut: Future[Any], task_id: int) -> None:
        """Run a task taken back (or never sent) in this thread and complete its future."""
        item = self._inflight.pop(task_id, None)
        if item is None:
            return
        from .worker import run_task  # a driver inside a worker runs what it took back

        code, out, retained = run_task(
            item[1].frames, f"reclaimed by pid {os.getpid()}", self.config.oob_threshold_bytes, None
        )
        complete(fut, code, out)
        self._release(item[2], item[3], reusable=not retained)

    def _recycle(self, name: str) -> None:
        """A result segment nobody here maps any more (called from any thread, by GC)."""
        if self._closing:
            shm.unlink(name)
            return
        self._recycles.append(name)
        self._wake()

    def _cancel(self, fut: Future[Any]) -> None:
        self._cancels.append(fut.task_id)  # type: ignore[attr-defined]
        self._wake()

    def _wake(self, force: bool = False) -> None:
        if self._wake_pending and not force:
            return
        self._wake_pending = True
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # pipe full (a wake-up is pending anyway) or closed

    # -- the I/O thread -----------------------------------------------------

    def _hello(self, sock: zmq.Socket[Any]) -> None:
        info = {
            "role": "driver",
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "shm_domain": self.shm_domain,
            "heartbeat_s": self.config.heartbeat_s,
        }
        sock.send_multipart(protocol.encode_json(Msg.HELLO, info))

    def _run(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.identity)
        sock.setsockopt(zmq.LINGER, 0)
        # The in-flight window bounds what we queue; the HWM must not drop it.
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        monitor = security.watch_handshake(sock) if security.secure_client(sock, self._keys) else None
        sock.connect(self.address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        heartbeat_s = self.config.heartbeat_s
        self._hello(sock)
        last_sent = last_heard = last_hello = time.monotonic()
        try:
            while not self._closing:
                events = dict(poller.poll(int(heartbeat_s * 1000)))
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    self._wake_pending = False
                now = time.monotonic()
                if monitor is not None and monitor in events:
                    self._handshake(monitor)
                if self._outgoing or self._cancels or self._reclaims or self._recycles:
                    self._flush(sock)
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
                    try:
                        # NOBLOCK: a broker that failed our handshake (keys on one side only) dropped the
                        # connection for good, and a blocking send would wait forever (connect() then hangs).
                        sock.send_multipart(protocol.encode_signal(Msg.HEARTBEAT), zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                    last_sent = now
                if self._welcomed.is_set() and now - last_heard > self.config.peer_timeout_s:
                    log.warning("broker at %s silent for %.1f s; waiting for it", self.address, now - last_heard)
                    last_heard = now
        except Exception:  # noqa: BLE001 - the I/O thread must not die silently
            log.exception("distfork driver I/O thread failed")
            self._fail_all(DistforkError("the distfork driver's I/O thread failed; see the log"))
        finally:
            try:
                sock.send_multipart(protocol.encode_signal(Msg.BYE), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            if monitor is not None:
                sock.disable_monitor()
                monitor.close(linger=0)
            sock.close(linger=100)

    def _handshake(self, monitor: zmq.Socket[Any]) -> None:
        text = security.failure_text(monitor, self.address)
        if text is not None and self._refused is None:
            self._refused = text
            log.error("%s", text)
            self._welcomed.set()  # wake connect(): it raises AuthenticationError

    def _flush(self, sock: zmq.Socket[Any]) -> None:
        out = self._outgoing
        while out:
            batch = [out.popleft() for _ in range(min(len(out), _BATCH_MAX))]
            sock.send_multipart(protocol.encode_batch(Msg.SUBMIT, batch), copy=False)
        if self._reclaims:
            ids = [self._reclaims.popleft() for _ in range(len(self._reclaims))]
            sock.send_multipart(protocol.encode_cancel(ids, Msg.RECLAIM))
        if self._recycles:
            names = [self._recycles.popleft() for _ in range(len(self._recycles))]
            sock.send_multipart(protocol.encode_json(Msg.RECYCLE, {"names": names}))
        if self._cancels:
            ids = []
            while self._cancels:
                task_id = self._cancels.popleft()
                item = self._inflight.pop(task_id, None)
                if item is not None:
                    self._release(item[2], item[3])
                    ids.append(task_id)
            if ids:
                sock.send_multipart(protocol.encode_cancel(ids))

    def _handle(self, sock: zmq.Socket[Any], frames: list[Any], may_rehello: bool) -> bool:
        """Act on one message from the broker; True if we said hello again."""
        try:
            kind, body = protocol.decode(frames)
            if kind is Msg.RESULTS:
                self._results(protocol.decode_batch(frames, body))
            elif kind is Msg.WELCOME:
                self.welcome = protocol.decode_json(body)
                self._cluster_facts(self.welcome)
                self._welcomed.set()
            elif kind is Msg.CLUSTER:
                self._cluster_facts(protocol.decode_json(body))
            elif kind is Msg.RECLAIMED:
                self._reclaimed(protocol.decode_json(body))
            elif kind is Msg.REJECT:
                if may_rehello:
                    log.info("broker at %s does not know us (restarted?): saying hello again", self.address)
                    self._hello(sock)
                    self._resubmit_all()
                    return True
            elif kind in (Msg.HEARTBEAT, Msg.BYE):
                pass
            else:
                raise ProtocolError(f"unexpected {kind.name} from the broker")
        except ProtocolError as exc:
            log.warning("dropped a message from the broker: %s", exc)
        return False

    def _reclaimed(self, reply: dict[str, Any]) -> None:
        granted = set(reply.get("granted") or ())
        for task_id in reply.get("asked") or ():
            waiter = self._reclaim_waiters.pop(task_id, None)
            if waiter is not None:
                waiter[1][0] = task_id in granted
                waiter[0].set()

    def _cluster_facts(self, facts: dict[str, Any]) -> None:
        """Use shared memory for arguments while some worker shares our /dev/shm."""
        if isinstance(facts.get("session"), str):
            self._session = facts["session"]
        local = facts.get("local_workers", 0)
        if self.shm_domain is None or self._session is None or not isinstance(local, int) or local <= 0:
            self._pool = None
            return
        if self._segments is None:
            self._segments = shm.SegmentPool(self._session, self.config.shm_spare_bytes)
        self._pool = self._segments

    def _resubmit_all(self) -> None:
        pending = {e.id for e in self._outgoing}
        self._outgoing.extend(item[1] for item in self._inflight.values() if item[1].id not in pending)

    def _results(self, entries: Sequence[Entry]) -> None:
        inflight = self._inflight
        release = self._release
        for e in entries:
            item = inflight.pop(e.id, None)
            if item is None:
                serialize.free(e.frames)  # cancelled meanwhile, or a duplicate
                continue
            complete(item[0], e.code, e.frames, self._recycle)
            release(item[2], item[3], not e.flags & Flag.RETAINED)

    def _fail_all(self, exc: BaseException) -> None:
        for task_id in list(self._inflight):
            item = self._inflight.pop(task_id, None)
            if item is not None:
                self._release(item[2], item[3])
            if item is not None and not item[0].done():
                try:
                    item[0].set_exception(exc)
                except InvalidStateError:
                    pass



def complete(
    fut: Future[Any], code: int, frames: Sequence[Any], on_free: Callable[[str], None] | None = None
) -> None:
    """Set a future from a result entry (status code and payload frames).

    ``on_free``: where a result's shared-memory segment goes once nothing
    maps it (else it is unlinked as soon as it is mapped).
    """
    if fut.cancelled():
        serialize.free(frames)
        return
    try:
        if code == Status.OK:
            try:
                value = serialize.unpack(frames, private=False, on_free=on_free)
            except Exception as err:  # noqa: BLE001
                fut.set_exception(
                    SerializationError(
                        f"the task's result cannot be unpickled in the driver: {type(err).__name__}: {err}"
                    )
                )
            else:
                fut.set_result(value)
        else:
            fut.set_exception(_failure(code, frames))
    except InvalidStateError:
        pass  # cancelled by a user thread just now


def _failure(code: int, frames: Sequence[Any]) -> BaseException:
    if code == Status.RAISED:
        try:
            exc = serialize.unpack(frames, private=False)
        except Exception as err:  # noqa: BLE001
            return SerializationError(
                f"the task raised an exception that cannot be unpickled in the driver: {type(err).__name__}: {err}"
            )
        if isinstance(exc, BaseException):
            return exc
        return DistforkError(f"the task sent back a non-exception as its error: {exc!r}")
    text = bytes(frames[0]).decode(errors="replace") if frames else ""
    if code == Status.LOST:
        return WorkerLostError(text)
    if code == Status.TIMED_OUT:
        return TimeoutError(text)
    return DistforkError(text or f"the task failed with status {code}")
