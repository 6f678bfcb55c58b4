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

Futures as arguments: ``fork(g, fut)`` with ``fut`` a future of ours not done
yet pickles a reference (its task id, listed in the task's first frame,
``Flag.DEPS``); the broker hands ``g`` the value. A result other tasks took is
held by the broker: its future is done with the value REMOTE, and
``result()`` fetches it (FETCH); a held future dropped unfetched is released
(RELEASE). We keep a held task's pickled call until then, to run it again if
the broker restarts and loses it. If a referenced result reached us before the
task reached the broker, the broker answers RESUBMIT and we pickle the call
again with the value.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import InvalidStateError
from typing import Any, NamedTuple

import zmq

from . import direct, direct_slot, multipart, output, protocol, security, serialize, sharecache, shm
from . import tracing as _trace
from .config import BATCH_MAX, DRIVER_RECV_BURST, RESUBMITS_MAX, Config
from .errors import (
    AuthenticationError,
    BrokerUnavailableError,
    DistforkError,
    ProtocolError,
)
from .future import Future, callback_runner, collect_all, settle
from .held import HeldValues
from .outcome import complete
from .outcome import outcome as _outcome
from .protocol import Flag, Msg, ResultEntry, Role, Status, TaskEntry
from .wakeup import Wakeup
from .window import Window

__all__ = ["Driver", "complete"]

log = logging.getLogger(__name__)



class Call(NamedTuple):
    """A call whose arguments name futures of ours, kept until it ends, to pickle it again if need be."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    deps: list[Future[Any]]  # the futures it names, in the order of the task's dependency frame
    tries: int = 1
    request: Any = None  # what it asks of its worker: (resources, labels), or None


class InFlight(NamedTuple):
    """An unfinished task of ours: what completes it, and what to send again or free when it ends."""

    future: Future[Any]
    entry: TaskEntry  # kept for re-submission (a broker restart) until the result arrives
    segment: shm.Segment | None  # the shared-memory segment of its arguments, which we own
    nbytes: int  # bytes of large arguments it holds of the window


class Driver:
    """A connection to a broker that turns pickled calls into futures.

    Threads: user threads call :meth:`submit`, :meth:`close`, cancel and
    reclaim futures; the I/O thread (:meth:`_run`) alone owns the socket.
    Which thread touches which field:

    - ``_inflight`` (task id -> :class:`InFlight`): user threads add
      (submit) and pop (a reclaimed task, close); the I/O thread pops when a
      result or cancel is handled. Every pop is a ``dict.pop`` (atomic under
      the GIL): whoever pops an entry frees its window slot and segment.
    - ``_outgoing``, ``_cancels``, ``_reclaims``, ``_recycles``, ``_codes``:
      deques any thread appends to and only the I/O thread drains (then
      sends), after a :meth:`_wake`.
    - ``_calls``, ``_traced``: added by submit (user thread), popped by the
      I/O thread with the result (or by whoever pops the in-flight entry).
    - ``_reclaim_waiters``: a reclaiming user thread adds, the I/O thread
      answers (RECLAIMED).
    - ``held`` (:class:`~distfork.held.HeldValues`): see its module.
    - ``_window``, ``_bytes_room``/``_bytes_inflight``: the in-flight window,
      taken by submit and given back by whoever ends a task.
    - ``welcome``, ``_session``, ``_pool``, ``_segments``: written by the I/O
      thread (WELCOME, CLUSTER), read by submit.
    - ``_closing``, ``_refused``: set once (close, the I/O thread), read by all.
    """

    def __init__(self, address: str, config: Config, name: str | None = None, nested: bool = False) -> None:
        self.address = address
        # In a worker process (tasks that fork): tasks are flagged NESTED and a
        # future waited for while still queued is reclaimed and run in the waiter.
        self.nested = nested
        self._reclaims: collections.deque[int] = collections.deque()
        self._recycles: collections.deque[str] = collections.deque()
        # Code packages to send before the tasks that need them (codeship.Shipper), and the latest
        # one, sent again after every hello (a restarted broker lost it).
        self._codes: collections.deque[Any] = collections.deque()
        self.code_package: Any = None
        self.shipper: Any = None  # codeship.Shipper, when this driver ships its code
        self._display = output.Display(config.output)  # where our tasks' lines are shown
        self._reclaim_waiters: dict[int, tuple[threading.Event, list[bool]]] = {}
        self.config = config
        self.name = name or f"driver-{socket.gethostname()}-{os.getpid()}"
        self.identity = b"D" + os.urandom(8)
        self.welcome: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._outgoing: collections.deque[TaskEntry] = collections.deque()
        self._cancels: collections.deque[int] = collections.deque()
        self._inflight: dict[int, InFlight] = {}
        # Tasks whose arguments name futures of ours: their calls (see Call).
        self._calls: dict[int, Call] = {}
        # Tasks forked inside distfork.trace(): their Records, until their results arrive (distfork/tracing.py).
        self._traced: dict[int, _trace.Pending] = {}
        _trace.DRIVERS.add(self)
        # Results the broker holds for us, and fetching their values (distfork/held.py).
        self.held = HeldValues(self._wake, lambda: self._closing)
        self.shares = sharecache.Server(self._wake)  # share()d values, for worker hosts to fetch
        self._window = Window(config.window)
        self._bytes_inflight = 0
        self._bytes_room = threading.Condition()
        self.shm_domain = shm.domain() if config.shm else None
        self._session: str | None = None
        self._segments: shm.SegmentPool | None = None  # created with the broker's session
        self._pool: shm.SegmentPool | None = None  # the same, while a worker shares our /dev/shm
        self._wakeup = Wakeup()  # the I/O thread polls it beside its socket
        self._wake_pending = False  # a wake-up is written and not yet drained: a burst of forks writes once
        self._keys = security.client_keys(config, address)  # bad key settings fail here, in the caller
        self._refused: str | None = None
        self._welcomed = threading.Event()
        self._closing = False
        self._closed = threading.Event()
        self._ctx = zmq.Context()
        # Every future of ours shares these two (bound once: one object fewer per future in flight).
        self._canceller = self._cancel
        self._reclaimer = self._reclaim if nested else None
        # Lone tasks go straight to a slot of the embedded cluster (distfork/direct.py), sent by submit.
        self._direct = (direct.DirectClient(self._ctx, address, self.identity, config.heartbeat_s)
                        if direct.enabled(config, address) and not nested else None)
        # Notices of the direct task this process runs, relayed ahead of its children (direct_slot.relay).
        self._relays: collections.deque[TaskEntry] = collections.deque()
        if self._direct is not None:
            self._direct.wake = self._wake
            self._direct.shm = self.shm_domain is not None
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

    def reference(self, fut: Future[Any]) -> bool:
        """Whether a future among a call's arguments can go as a reference the broker resolves:
        one of our tasks, unfinished or held there."""
        if fut.driver is not self or self.nested:
            return False  # a task that forks resolves its futures itself: it may run them (see _reclaim)
        task_id = fut.task_id
        if fut.direct and self._direct is not None and not fut.done():
            return bool(self._direct.route(task_id))  # its slot sends its value to the broker, which holds it
        return (task_id in self._inflight and not fut.done()) or (task_id in self.held and fut.held)

    def referrer(self, deps: list[Future[Any]]) -> Callable[[Any], int | None]:
        """``refer`` for ``serialize.dumps_call``: futures the broker can resolve go as references,
        appended to ``deps``."""
        def refer(fut: Any) -> int | None:
            if not self.reference(fut):
                return None
            deps.append(fut)
            return len(deps) - 1

        return refer

    def submit(
        self, frames: list[Any], max_retries: int = protocol.DEFAULT_RETRIES, timeout_s: float = 0.0,
        call: Call | None = None, fut: Future[Any] | None = None, request: Any = None, pinned: bool = False,
        traced: _trace.Pending | None = None,
    ) -> Future[Any]:
        """Send a pickled call (``serialize.dumps_call`` output); its future completes with the result.

        ``pinned``: the call names shared-memory segments of ours (distfork/shared.py) although it
        has no argument segment: only workers that see our /dev/shm may run it.

        ``call``: the call, if its arguments name futures of ours (pickled as
        references, in the order of ``call.deps``). ``fut``: the future to
        complete (a call sent again), else a new one.

        Blocks while the in-flight window (tasks, or bytes of large arguments)
        is full. Large buffers go to shared memory when a worker can read it.
        """
        if self._closing:
            raise DistforkError("this distfork driver was shut down; call distfork.init() to start again")
        if self._refused is not None:
            raise AuthenticationError(self._refused)
        nbytes = serialize.oob_bytes(frames) if len(frames) > 1 else 0
        if nbytes:
            with self._bytes_room:
                self._bytes_room.wait_for(
                    lambda: self._bytes_inflight == 0 or self._bytes_inflight + nbytes <= self.config.window_bytes
                )
                self._bytes_inflight += nbytes
        self._window.acquire()
        frames, segment = serialize.route(frames, self._pool)
        flags = (Flag.PINNED if segment is not None or pinned else 0) | (Flag.NESTED if self.nested else 0)
        if fut is None:
            fut = Future(self._canceller, self._reclaimer)
            fut.driver = self
        task_id = fut.task_id = next(self._ids)
        if call is not None:
            frames = [protocol.encode_deps([d.task_id for d in call.deps]), *frames]
            flags |= Flag.DEPS
            self._calls[task_id] = call
        if request is not None:  # (resources, labels): its frame goes first
            frames = [protocol.encode_request(*request), *frames]
            flags |= Flag.RESOURCES
        if traced is not None:
            flags |= Flag.TRACE
            if isinstance(traced, _trace.Record):
                traced.bind(self.name, task_id)
            self._traced[task_id] = traced
        # A tuple of bytes: the garbage collector stops tracking it (one object fewer per task in flight).
        entry = TaskEntry(task_id, max_retries, timeout_s, tuple(frames), flags)
        lone = self._direct is not None and self._direct.ready and direct.eligible(
            nbytes, segment, pinned, call, request, traced, self.nested, self.shipper, len(self._inflight))
        self._inflight[task_id] = InFlight(fut, entry, segment, nbytes)
        if self._closing:
            # close() ran meanwhile (we may have waited for the window): it may have taken its
            # snapshot of _inflight before we added ours. Whoever pops the entry frees it; the
            # future is cancelled either way, so no future is left that never completes.
            self._calls.pop(task_id, None)
            item = self._inflight.pop(task_id, None)
            fut.cancel()
            if item is not None:
                self._release(item.segment, item.nbytes)
            raise DistforkError("this distfork driver was shut down while fork() waited; "
                                "call distfork.init() to start again")
        if lone and self._direct is not None and self._direct.send(entry, time.monotonic()):
            fut.direct = True  # its DIRECT notice goes within DIRECT_NOTICE_S (send() woke the I/O thread if need be)
            return fut
        if self.nested:
            notice = direct_slot.relay()
            if notice is not None:
                self._relays.append(notice)  # before the child: _flush sends it first
        self._outgoing.append(entry)
        self._wake()
        return fut

    def _release(self, segment: shm.Segment | None, nbytes: int, reusable: bool = False) -> None:
        """A task ended: free its window slot, its segment (reused if nobody maps it) and its bytes."""
        self._window.release()
        if segment is not None:
            self._free_segment(segment, reusable)
        if nbytes:
            with self._bytes_room:
                self._bytes_inflight -= nbytes
                self._bytes_room.notify_all()

    def _free_segment(self, segment: shm.Segment | None, reusable: bool = False) -> None:
        if segment is not None:
            if reusable and self._segments is not None:
                self._segments.recycle(segment)
            else:
                segment.release()
                segment.unlink()

    @property
    def unfinished(self) -> int:
        return len(self._inflight)

    def pending(self) -> list[Future[Any]]:
        """The futures of this driver's unfinished tasks (a snapshot)."""
        return [item.future for item in list(self._inflight.values()) if not item.future.done()]

    def close(self, cancel: bool = True) -> None:
        """Stop the I/O thread; unfinished futures are cancelled."""
        if self._closing:
            self._closed.wait()
            return
        self._closing = True
        self._wake(force=True)
        self._thread.join()
        callback_runner.io_threads.discard(self._thread)
        # Cancel before the wake-up pipe closes: a cancel must never write to a closed fd (whose
        # number may be reused by then). Popped one by one: a submit() racing us pops its own.
        while self._inflight:
            try:
                _, (fut, _, segment, nbytes) = self._inflight.popitem()
            except KeyError:
                break
            fut.cancel()
            self._release(segment, nbytes)
        self._calls.clear()
        self._wakeup.close()
        self._ctx.term()
        self._display.close()
        self.held.close(self._free_segment)
        while self._recycles:
            shm.unlink(self._recycles.popleft())
        if self._segments is not None:
            self._segments.close()
        self._closed.set()

    def _reclaim(self, fut: Future[Any], local: bool = True) -> None:
        """Run a task in this thread if it has not started: one not sent yet (if ``local``), or
        one the broker gives back because no free slot can start it now."""
        task_id: int = fut.task_id
        item = self._inflight.get(task_id)
        if item is None or self._closing:
            return
        if local:
            try:
                self._outgoing.remove(item.entry)  # not even sent yet: nobody else can have it
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

        rec = self._traced.pop(task_id, None) if self._traced else None
        with _trace.run_here(rec, "reclaimed"):
            code, out, retained = run_task(
                item.entry.frames, f"reclaimed by pid {os.getpid()}", self.config.oob_threshold_bytes, None
            )
        complete(fut, code, out)
        if rec is not None:
            _trace.finish(rec, code, 0, fut, self.name, task_id)
        self._release(item.segment, item.nbytes, reusable=not retained)

    def _fetch(self, fut: Future[Any], timeout: float | None) -> Any:
        """Bring a held value here (from a user thread); the future keeps it afterwards."""
        return self.held.fetch(fut, timeout)

    def prefetch(self, futures: Sequence[Future[Any]]) -> None:
        """Ask for the held values among ``futures`` at once: waiting for them then costs one round trip."""
        self.held.prefetch(futures, self)

    def _recycle(self, name: str) -> None:
        """A result segment nobody here maps any more (called from any thread, by GC)."""
        if self._closing:
            shm.unlink(name)
            return
        self._recycles.append(name)
        self._wake()

    def _cancel(self, fut: Future[Any]) -> None:
        if self._closing:
            return  # the I/O thread is gone or going: its BYE makes the broker drop our tasks
        self._cancels.append(fut.task_id)
        self._wake()

    def ship_code(self, package: Any) -> None:
        """Send a ``codeship.Package`` to the broker ahead of any task submitted after this call."""
        self.code_package = package
        self._codes.append(package)
        self._wake()

    def _send_codes(self, sock: zmq.Socket[Any]) -> None:
        while self._codes:
            pkg = self._codes.popleft()
            sock.send_multipart(protocol.encode_code(pkg.hash, pkg.data), copy=False)

    def _wake(self, force: bool = False) -> None:
        if self._wake_pending and not force:
            return
        self._wake_pending = True
        self._wakeup.wake()

    # -- the I/O thread -----------------------------------------------------

    def _hello(self, sock: zmq.Socket[Any]) -> None:
        info = {
            "role": Role.DRIVER.value,
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "shm_domain": self.shm_domain,
            "heartbeat_s": self.config.heartbeat_s,
        }
        sock.send_multipart(protocol.encode_json(Msg.HELLO, info))
        if self.code_package is not None:
            self._codes.appendleft(self.code_package)
            self._send_codes(sock)

    def _run(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.identity)
        sock.setsockopt(zmq.LINGER, 0)
        # The in-flight window bounds what we queue; the HWM must not drop it.
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        security.reconnect_quickly(sock)
        monitor = security.watch_handshake(sock) if security.secure_client(sock, self._keys) else None
        watch = security.HandshakeWatch(monitor, self.address) if monitor is not None else None
        sock.connect(self.address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wakeup.fd, zmq.POLLIN)
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        heartbeat_s = self.config.heartbeat_s
        self._hello(sock)
        last_sent = last_heard = last_hello = time.monotonic()
        try:
            while not self._closing:
                due = self._direct.notices_due(time.monotonic()) if self._direct is not None else None
                events = dict(poller.poll(int(heartbeat_s * 1000) if due is None else math.ceil(due * 1000)))
                if self._wakeup.fd in events:
                    self._wakeup.drain()
                    self._wake_pending = False
                now = time.monotonic()
                if watch is not None and watch.monitor in events:
                    self._handshake(watch)
                if self._direct is not None:
                    self._direct_turn(sock, poller, events, now)
                if self._outgoing or self._cancels or self._reclaims or self._recycles or self.held.fetches \
                        or self.held.releases or self._codes or self.shares.drops:
                    self._flush(sock)
                    last_sent = now
                if sock in events:
                    last_heard = now
                    for _ in range(DRIVER_RECV_BURST):
                        try:
                            frames = multipart.recv(sock, zmq.NOBLOCK)
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
            if self._direct is not None:
                self._direct.close()
            sock.close(linger=100)

    def _direct_turn(self, sock: zmq.Socket[Any], poller: zmq.Poller, events: dict[Any, int], now: float) -> None:
        """The direct path (distfork/direct.py): find slots, send lone tasks to them, take their results."""
        d = self._direct
        if d is None:
            return
        if d.rescan or now >= d.next_scan:
            d.scan(poller, now)
        results = d.receive(poller, events)
        if results:
            self._results(results)
        d.watch(poller)
        if d.notices_due(now) == 0:
            self._send_notices(sock)

    def direct_wait(self, fut: Future[Any], timeout: float | None) -> None:
        """A user thread waits for a direct task: it reads the slot's reply itself (distfork/direct.py)."""
        if self._direct is not None:
            results = self._direct.wait(fut.task_id, fut.done, timeout)
            if results:
                self._results(results)

    def _send_notices(self, sock: zmq.Socket[Any]) -> None:
        """The broker hears of direct tasks in batches, off their round trip, but before anything else
        we send it: then it never hands their slots another task of ours, and a cancel finds the task."""
        if self._direct is not None and self._direct.notices:
            sock.send_multipart(protocol.encode_batch(Msg.DIRECT, self._direct.take_notices()), copy=False)
        if self._relays:
            relays = [self._relays.popleft() for _ in range(len(self._relays))]
            sock.send_multipart(protocol.encode_batch(Msg.DIRECT, relays), copy=False)

    def _handshake(self, watch: security.HandshakeWatch) -> None:
        text = watch.check()
        if text is not None:
            self._refuse(text)

    def _refuse(self, text: str) -> None:
        if self._refused is not None:
            return
        self._refused = text
        log.error("%s", text)
        if self._welcomed.is_set():
            # Refused after we were let in (our key was revoked, the broker restarted with other
            # keys): nothing we send will arrive any more.
            self._fail_all(AuthenticationError(text))
        self._welcomed.set()  # wake connect(): it raises AuthenticationError

    def _flush(self, sock: zmq.Socket[Any]) -> None:
        self._send_notices(sock)
        out = self._outgoing
        self._send_codes(sock)
        while out:
            batch = [out.popleft() for _ in range(min(len(out), BATCH_MAX))]
            self._send_codes(sock)  # a package shipped just before a task of this batch was appended
            self._send_notices(sock)  # a notice relayed just before a task of this batch was appended
            multipart.send(sock, protocol.encode_batch(Msg.SUBMIT, batch))
        if self.shares.drops:
            self.shares.flush(sock)
        if self._reclaims:
            ids = [self._reclaims.popleft() for _ in range(len(self._reclaims))]
            sock.send_multipart(protocol.encode_cancel(ids, Msg.RECLAIM))
        if self._recycles:
            names = [self._recycles.popleft() for _ in range(len(self._recycles))]
            sock.send_multipart(protocol.encode_json(Msg.RECYCLE, {"names": names}))
        if self.held.fetches:
            sock.send_multipart(protocol.encode_cancel(self.held.take_fetches(), Msg.FETCH))
        if self.held.releases:
            ids = self.held.take_releases(self._free_segment)
            if ids:
                sock.send_multipart(protocol.encode_cancel(ids, Msg.RELEASE))
        if self._cancels:
            ids = []
            while self._cancels:
                task_id = self._cancels.popleft()
                item = self._inflight.pop(task_id, None)
                if item is not None:
                    self._calls.pop(task_id, None)
                    rec = self._traced.pop(task_id, None) if self._traced else None
                    if rec is not None:
                        _trace.finish(rec, Status.CANCELLED, 0, item.future, self.name, task_id)
                    self._release(item.segment, item.nbytes)
                    ids.append(task_id)
            if ids:
                sock.send_multipart(protocol.encode_cancel(ids))

    def _handle(self, sock: zmq.Socket[Any], frames: list[Any], may_rehello: bool) -> bool:
        """Act on one message from the broker; True if we said hello again."""
        try:
            kind, body = protocol.decode(frames)
            if kind is Msg.RESULTS:
                self._results(protocol.decode_results(frames, body))
            elif kind is Msg.WELCOME:
                self.welcome = protocol.decode_json(body)
                self._cluster_facts(self.welcome)
                self._welcomed.set()
            elif kind is Msg.CLUSTER:
                self._cluster_facts(protocol.decode_json(body))
            elif kind is Msg.OUTPUT:
                self._output(protocol.decode_json(body))
            elif kind is Msg.RECLAIMED:
                self._reclaimed(protocol.decode_reclaimed(body))
            elif kind is Msg.SHARE_GET:  # a worker host fetches a share()d value (distfork/sharecache.py)
                self.shares.serve(sock, body)
            elif kind is Msg.REJECT:
                reject = protocol.decode_json(body)
                if reject.get("refused"):  # our key is admitted, but not as a client
                    self._refuse(f"the broker at {self.address} refused us: {reject.get('reason')}")
                elif may_rehello:
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

    def _output(self, body: dict[str, Any]) -> None:
        """Lines a task printed: onto its future, and shown (output.Display)."""
        task_id, raw = body.get("id"), body.get("lines")
        if not isinstance(task_id, int) or not isinstance(raw, list):
            raise ProtocolError("OUTPUT without id or lines")
        lines = [(str(x[0]), str(x[1])) for x in raw if isinstance(x, list) and len(x) == 2]
        dropped = body.get("dropped")
        dropped = dropped if isinstance(dropped, int) else 0
        item = self._inflight.get(task_id)
        if item is not None:
            item.future.add_output([text for _, text in lines], dropped)
        self._display.show(body, task_id, lines, dropped)

    def _reclaimed(self, reply: tuple[set[int], list[int]]) -> None:
        granted, asked = reply
        for task_id in asked:
            waiter = self._reclaim_waiters.pop(task_id, None)
            if waiter is not None:
                waiter[1][0] = task_id in granted
                waiter[0].set()

    def _cluster_facts(self, facts: dict[str, Any]) -> None:
        """Use shared memory for arguments while some worker shares our /dev/shm."""
        if self._direct is not None:
            self._direct.rescan = True  # workers came or went: look for their direct sockets
        if isinstance(facts.get("session"), str):
            self._session = facts["session"]
        local = facts.get("local_workers", 0)
        if self.shm_domain is None or self._session is None or not isinstance(local, int) or local <= 0:
            self._pool = None
            return
        if self._segments is None:
            self._segments = shm.SegmentPool(self._session, self.config.shm_spare_bytes)
            shm.sweep()  # garbage of clusters that died on this host
        self._pool = self._segments

    def _resubmit_all(self) -> None:
        """To a restarted broker: held results first (the new broker lost them: they run again,
        and tasks that name them wait for them), then everything unfinished, then the fetches."""
        pending = {e.id for e in self._outgoing}
        self._outgoing.extend(self.held.resubmit(pending))
        self._outgoing.extend(item.entry for item in self._inflight.values() if item.entry.id not in pending)

    def _results(self, entries: Sequence[ResultEntry]) -> None:
        inflight = self._inflight
        release = self._release
        notes = None  # traced tasks: where and when they ran, for all of this batch's
        if entries and entries[0].id == 0 and entries[0].flags & Flag.TRACE:
            notes, entries = _trace.notes_of(entries, self._traced)
        for e in entries:
            item = inflight.pop(e.id, None)
            if item is None:
                if e.id in self.held and not e.flags & Flag.HELD:
                    self._fetched(e)
                elif not e.flags & Flag.HELD:
                    serialize.free(e.frames)  # cancelled meanwhile, or a duplicate
                continue
            call = self._calls.pop(e.id, None) if self._calls else None
            rec = self._traced.pop(e.id, None) if self._traced else None
            if e.status == Status.RESUBMIT and call is not None:
                release(item.segment, item.nbytes)
                self._send_again(item.future, call, item.entry.max_retries, item.entry.timeout_s,
                                 _trace.again(rec, e.id) if rec is not None else None)
                rec = None  # sent again under a new id
            elif e.flags & Flag.HELD:
                self._hold(item, e)
            else:
                complete(item.future, e.status, e.frames, self._recycle)
                release(item.segment, item.nbytes, not e.flags & Flag.RETAINED)
            if rec is not None:
                _trace.finish(rec, e.status, e.flags, item.future, self.name, e.id, notes)

    def _hold(self, item: InFlight, e: ResultEntry) -> None:
        """Tasks took this result as an argument: the broker keeps it; the future is done, its value remote."""
        self._release(None, item.nbytes)  # the segment stays: the broker may lose the value, and we run it again
        self.held.hold(item.future, item.entry, item.segment, e)

    def _fetched(self, e: ResultEntry) -> None:
        """A held value we asked for (or a held task run again after a broker restart) arrived."""
        value, error = _outcome(e.status, e.frames, self._recycle)
        self._free_segment(self.held.fetched(e, value, error).segment)

    def _send_again(self, fut: Future[Any], call: Call, max_retries: int, timeout_s: float,
                    traced: _trace.Pending | None = None) -> None:
        """The broker no longer has a future the call names: pickle it again, with the values we have.

        From the callback thread, once every future it names is done: that
        may block on the window, which the I/O thread must never do.
        """
        def again() -> None:
            if fut.done():
                return  # cancelled meanwhile
            failed = next((d for d in call.deps if d.cancelled() or d.exception() is not None), None)
            try:
                if failed is not None and failed.cancelled():
                    fut.cancel()
                elif failed is not None:
                    fut.set_exception(failed.exception())
                elif call.tries >= RESUBMITS_MAX:
                    fut.set_exception(DistforkError(
                        f"the futures among this task's arguments left the broker {call.tries} times "
                        "before it could start (is the broker restarting?)"
                    ))
                else:
                    deps: list[Future[Any]] = []
                    frames = serialize.dumps_call(call.func, call.args, call.kwargs, self.config.oob_threshold_bytes,
                                                  self.referrer(deps),
                                                  self.shipper.ref() if self.shipper is not None else None)
                    again_call = (Call(call.func, call.args, call.kwargs, deps, call.tries + 1, call.request)
                                  if deps else None)
                    self.submit(frames, max_retries, timeout_s, call=again_call, fut=fut, request=call.request,
                                traced=traced)
            except InvalidStateError:
                pass  # cancelled meanwhile
            except BaseException as exc:  # noqa: BLE001 - it belongs to the future
                settle(fut, exception=exc)

        collect_all(call.deps).add_done_callback(lambda _: callback_runner.submit(again))

    def _fail_all(self, exc: BaseException) -> None:
        self.held.end(exc)
        self._calls.clear()
        for task_id in list(self._inflight):
            item = self._inflight.pop(task_id, None)
            if item is not None:
                self._release(item.segment, item.nbytes)
            if item is not None and not item.future.done():
                try:
                    item.future.set_exception(exc)
                except InvalidStateError:
                    pass
