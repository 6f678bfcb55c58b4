"""The worker process: runs tasks the broker hands it, one per slot.

::

     broker ROUTER ◀── DEALER "slot 0" ── slot thread 0: recv TASKS, run each, send RESULTS
                   ◀── DEALER "slot 1" ── slot thread 1: ...             (N = slots)
                   ◀── DEALER control ── main thread: KEEPALIVE for all slots every
                                          heartbeat_s, parent watch, SIGTERM -> BYE

Each slot thread owns its socket and registers with the broker as a worker
of one slot: a task goes from the socket to the function and its result back
without crossing a thread. A slot that runs a long task cannot heartbeat,
so the main thread vouches for every slot of the process with KEEPALIVE;
when the process dies, both stop and the broker notices the silence.

Several tasks may arrive in one TASKS message (the broker prefetches for
short tasks); results go back in one RESULTS message per burst, flushed as
soon as the slot has nothing left to run, so a lone task is never held back.

If the broker restarts, it answers our next message with REJECT and the slot
says hello again. A worker started by a parent (the embedded cluster) stops
when that parent is gone. SIGTERM and SIGINT stop it; the broker re-queues
what it held. Tasks that call ``distfork.fork`` themselves reach the same
broker: the worker sets ``DISTFORK_ADDRESS`` for them.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from . import codeship, direct, direct_slot, output, protocol, resources, security, serialize, sharecache, shm
from . import tracing as _trace
from .config import Config
from .errors import ProtocolError, SerializationError
from .protocol import Flag, Msg, ResultEntry, Role, Status, TaskEntry
from .slurm import slurm_job_id
from .wakeup import Wakeup

__all__ = ["ABORT_EXIT_CODE", "Worker", "run_task"]

log = logging.getLogger(__name__)

_FLUSH_COUNT = 64  # results per RESULTS message at most while more tasks wait
_FLUSH_S = 0.002  # longest a finished result waits for the rest of its burst
_QUICK_S = 0.0005  # a function that took less than this may run while finished results wait
_LINGER_MS = 300  # how long a stopping worker tries to deliver its last messages
#: Exit code of a worker that ended itself to stop a cancelled or timed-out task.
ABORT_EXIT_CODE = 75


def run_task(
    frames: Sequence[Any], where: str, oob_threshold_bytes: int, pool: shm.SegmentPool | None, owner: int = 0,
    before_call: Callable[[Any], None] | None = None, deps: Sequence[Sequence[Any]] = (),
) -> tuple[int, list[Any], bool]:
    """Unpickle a call, run it, pickle the outcome: ``(Status, frames, retained)``.

    ``deps``: the result payloads of the futures among its arguments (from
    the broker's holds). With ``pool``, a large result goes to a new
    shared-memory segment whose ownership passes to the receiver (pid
    ``owner``) with the frames. ``retained``: something the task left alive
    (a global, a cache) still maps its argument segment (or a dependency's),
    so its owner must not reuse it.
    """
    leases: list[serialize.Lease] = []
    status, out = _call(frames, where, oob_threshold_bytes, pool, owner, leases, before_call, deps)
    retained = not all([lease.close() for lease in leases])
    return status, out, retained


def _call(
    frames: Sequence[Any], where: str, oob_threshold_bytes: int, pool: shm.SegmentPool | None, owner: int,
    leases: list[serialize.Lease], before_call: Callable[[Any], None] | None, deps: Sequence[Sequence[Any]],
) -> tuple[int, list[Any]]:
    try:
        with codeship.unpickling():  # another slot's swap of the driver's modules must not meet ours
            func, args, kwargs = serialize.unpack_call(frames, deps, leases)
    except BaseException as exc:  # noqa: BLE001 - reported to the driver
        err = SerializationError(
            f"the worker could not unpickle the task's function or arguments: {type(exc).__name__}: {exc}. "
            + codeship.missing_module_hint(exc)
        )
        err.__cause__ = exc
        return Status.RAISED, serialize.dumps_exception(err, where, oob_threshold_bytes)
    if before_call is not None:
        before_call(func)
    try:
        value = func(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - reported to the driver
        return Status.RAISED, serialize.dumps_exception(exc, where, oob_threshold_bytes)
    finally:
        del func, args, kwargs
    try:
        out, segment = serialize.pack(value, oob_threshold_bytes, pool, owner)
    except BaseException as exc:  # noqa: BLE001
        err = SerializationError(
            f"the task's result {serialize.describe(value)} cannot be pickled: {type(exc).__name__}: {exc}. "
            "Return plain data (convert the object inside the task)"
        )
        return Status.RAISED, serialize.dumps_exception(err, where, oob_threshold_bytes)
    if segment is not None and pool is not None:
        pool.let_go(segment)  # handed over with the frames (the receiver owns it); we keep our mapping for its return
    return Status.OK, out


class Worker:
    """A worker process connected to the broker at ``address`` with ``slots`` task slots."""

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
        self.where = f"worker {self.name} (host {self.host}, pid {os.getpid()})"
        # What tasks may ask of this process (distfork/resources.py): bad --resources/--label fail here.
        self.resources, self.gpu_ids = resources.detect(slots, config.resources)
        self.labels = resources.parse_labels(config.labels)
        prefix = b"W" + os.urandom(7)
        self.slot_ids = [prefix + bytes([i % 256, i // 256]) for i in range(slots)]
        self._stopping = False
        # Readable once we stop: every thread polls it next to its socket.
        # (Never drained: it stays readable.)
        self._stop = Wakeup()
        # Woken when a running task printed something: the control thread sends it (distfork/output.py).
        self._out = Wakeup()
        self._ctx = zmq.Context()
        self.shm_domain = shm.domain() if config.shm else None
        self.session: str | None = None  # the broker's, from its WELCOME
        self.pool: shm.SegmentPool | None = None
        self._pool_lock = threading.Lock()
        self.slots_: list[_Slot] = []
        self._keys = security.client_keys(config, address, role="worker")
        # Task keys the broker withdrew: a slot skips them, the control thread
        # ends the process if one is running.
        self.cancelled: set[int] = set()
        # Our supervisor's (cluster.Supervisor): we say there once that we finished a task.
        self._progress_dir = os.environ.get("DISTFORK_PROGRESS_DIR") if parent_pid is not None else None

    def finished_a_task(self) -> None:
        """Tell our supervisor (once) that we work: our death is then not taken for a crash loop."""
        path, self._progress_dir = self._progress_dir, None
        if path:
            try:
                with open(os.path.join(path, str(os.getpid())), "x"):
                    pass
            except OSError:
                pass

    def take_back(self, names: list[str]) -> None:
        """Result segments the driver no longer maps: warm spares for our next results
        (or, made by a worker process that is gone, unlinked)."""
        with self._pool_lock:
            pool = self.pool
        for name in names:
            if shm.creator(name) != os.getpid():
                shm.unlink(name)  # its maker is gone (the broker says so): we see the same /dev/shm
                continue
            if pool is not None:
                pool.take_back(name)
            else:
                shm.unlink(name)

    def remember_cancelled(self, keys: set[int]) -> None:
        if len(self.cancelled) > 100_000:  # keys of tasks long finished: forget them
            self.cancelled.clear()
        self.cancelled.update(keys)

    def welcomed(self, facts: dict[str, Any]) -> None:
        """A slot was welcomed: learn the session, make the result segment pool."""
        session = facts.get("session")
        if not isinstance(session, str):
            return
        with self._pool_lock:
            if session != self.session:
                if self.pool is not None:
                    self.pool.close()
                self.session = session
                self.pool = shm.SegmentPool(session, self.config.shm_spare_bytes) if self.shm_domain else None

    def stop(self) -> None:
        """Ask the worker to stop (safe from a signal handler)."""
        self._stopping = True
        self._stop.wake_from_signal()

    def _wake_output(self) -> None:
        self._out.wake()

    def _send_output(self, control: zmq.Socket[Any]) -> None:
        self._out.drain()
        for body in output.drain():
            try:
                control.send_multipart(protocol.encode_json(Msg.OUTPUT, body), zmq.NOBLOCK)
            except zmq.Again:
                pass  # no connection to the broker: the lines are lost, the task is not held up

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def _socket(self, identity: bytes, connect: bool = True) -> zmq.Socket[Any]:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # results: bounded by what the broker handed us
        sock.setsockopt(zmq.RCVHWM, self.config.hwm)
        security.reconnect_quickly(sock)
        security.secure_client(sock, self._keys)
        if connect:
            sock.connect(self.address)
        return sock

    def serve_forever(self) -> None:
        os.environ["DISTFORK_ADDRESS"] = self.address  # nested forks reach our broker
        os.environ["DISTFORK_IN_WORKER"] = "1"  # ... and may take their queued children back
        codeship.configure_worker(self.address, self._keys, self.config.code_cache_dir,
                                  self.config.code_fetch_timeout_s)
        sharecache.configure_worker(self.address, self._keys, self.shm_domain is not None,
                                    self.config.code_fetch_timeout_s)
        output.install(self._wake_output)
        self.slots_ = [_Slot(self, i, ident) for i, ident in enumerate(self.slot_ids)]
        threads = [threading.Thread(target=s.run, name=f"distfork-slot-{s.index}", daemon=True) for s in self.slots_]
        for t in threads:
            t.start()
        control = self._socket(b"C" + self.slot_ids[0][1:], connect=False)
        # Without keys, still watch for a broker that has them: it drops us for good (libzmq does not
        # reconnect after a protocol failure) and our next send would block forever, even SIGTERM.
        # The monitor is attached before we connect, so that no handshake outcome is missed.
        monitor = (security.watch_handshake(control) if self._keys is not None
                   else control.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL))
        control.connect(self.address)
        log.info("%s connecting to %s with %d slots", self.where, self.address, self.slots)
        try:
            self._control(control, monitor)
        finally:
            self._stopping = True
            self._goodbye(control)
            if monitor is not None:  # a socket of our context: ctx.term() below would wait for it forever
                control.disable_monitor()
                monitor.close(linger=0)
            control.close(linger=_LINGER_MS)
            for t in threads:
                t.join(1.0)
            busy = [t.name for t in threads if t.is_alive()]
            if busy:
                # A slot still inside a task cannot be interrupted; the broker
                # has re-queued it already. Leave without waiting for it.
                log.warning("%s stopping with tasks still running in %s", self.where, ", ".join(busy))
                self._exit(0)
            self._ctx.term()
            if self.pool is not None:
                self.pool.close()
            self._sweep_at_exit()
            log.info("%s stopped", self.where)

    def _keepalive(self, **extra: Any) -> list[Any]:
        body = {"peers": [i.hex() for i in self.slot_ids], "pid": os.getpid(), "host": self.host,
                "rss": _rss_bytes(), **extra}
        return protocol.encode_json(Msg.KEEPALIVE, body)

    def _control(self, control: zmq.Socket[Any], monitor: zmq.Socket[Any] | None) -> None:
        """The main thread: vouch for the slots, enforce timeouts, abort cancelled tasks."""
        poller = zmq.Poller()
        poller.register(control, zmq.POLLIN)
        poller.register(self._stop.fd, zmq.POLLIN)
        poller.register(self._out.fd, zmq.POLLIN)
        watch = security.HandshakeWatch(monitor, self.address) if monitor is not None else None
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        heartbeat_s = self.config.heartbeat_s
        next_beat = next_sweep = time.monotonic()
        while not self._stopping:
            now = time.monotonic()
            if now >= next_beat:
                try:
                    # NOBLOCK: after a failed handshake libzmq drops the connection for good and a
                    # blocking send would hang before we read the monitor that says why.
                    control.send_multipart(self._keepalive(), zmq.NOBLOCK)
                except zmq.Again:
                    pass
                next_beat = now + heartbeat_s
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    log.warning("parent process %d is gone; stopping", self.parent_pid)
                    return
            if now >= next_sweep and self.session is not None:
                shm.sweep()  # garbage of any session: segments of processes that died mid-transfer
                if self.pool is not None:
                    self.pool.prune()  # our mappings of results their drivers unlinked
                next_sweep = now + 5 * heartbeat_s
            # (key, deadline) of each slot read as one tuple: a slot that finishes and starts its next
            # task meanwhile must not have that one reported timed out.
            running = [r for s in self.slots_ if (r := s.running) is not None]
            deadlines = [d for _, d in running if d is not None]
            wait_s = max(0.0, min([next_beat, *deadlines]) - time.monotonic())
            events = dict(poller.poll(int(wait_s * 1000)))
            if watch is not None and watch.monitor in events:
                text = watch.check()
                if text is not None:
                    log.error("%s: %s", self.where, text)
                    self._exit(security.EXIT_REFUSED)  # a supervisor does not restart a refused worker
            if self._out.fd in events:
                self._send_output(control)
            if control in events:
                self._control_messages(control)
            now = time.monotonic()
            late = [r[0] for s in self.slots_ if (r := s.running) is not None and r[1] is not None and now >= r[1]]
            if late:
                self._abort(control, timed_out=late)

    def _control_messages(self, control: zmq.Socket[Any]) -> None:
        while True:
            try:
                frames = control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                kind, body = protocol.decode(frames)
                if kind is Msg.CANCEL:
                    keys = set(protocol.decode_cancel(body))
                    self.remember_cancelled(keys)
                    running = [r[0] for s in self.slots_ if (r := s.running) is not None and r[0] in keys]
                    if running:
                        self._abort(control, cancelled=running)
                elif kind is Msg.REJECT:
                    self.refused(protocol.decode_json(body))
                elif kind is Msg.SHARE_DROP:  # share()d values released: this host's copies go
                    sharecache.dropped(protocol.decode_share_drop(body))
                elif kind not in (Msg.HEARTBEAT, Msg.BYE):
                    raise ProtocolError(f"unexpected {kind.name} on the control socket")
            except ProtocolError as exc:
                log.warning("dropped a message from the broker: %s", exc)

    def _abort(self, control: zmq.Socket[Any], timed_out: Sequence[int] = (), cancelled: Sequence[int] = ()) -> None:
        """A running task must stop: tell the broker, then end this process (our supervisor replaces it)."""
        what = [f"task {k} (timed out)" for k in timed_out] + [f"task {k} (cancelled)" for k in cancelled]
        log.warning("%s: ending the process to stop %s", self.where, ", ".join(what))
        self._goodbye(control, timed_out=list(timed_out), cancelled=list(cancelled))
        control.close(linger=_LINGER_MS)
        self._exit(ABORT_EXIT_CODE)

    def _goodbye(self, control: zmq.Socket[Any], **extra: Any) -> None:
        """Send our last KEEPALIVE and wait (up to the linger time) until ZeroMQ has written it out.

        We may ``os._exit`` right after, without terminating the context (slot
        threads inside tasks keep their sockets): a message still queued then
        is lost, and the broker, told only of an exit, would blame the running
        tasks (a timed-out task would be retried instead of failing).
        """
        control.copy_threshold = 0  # track this very message, not a copy of it
        try:
            tracker = control.send_multipart(self._keepalive(bye=True, **extra), zmq.NOBLOCK, copy=False, track=True)
        except zmq.Again:
            log.warning("%s: no connection to the broker for its goodbye", self.where)
            return
        if tracker is None:  # pyzmq returns a tracker whenever track=True
            raise RuntimeError("ZeroMQ gave no MessageTracker for a tracked send")
        try:
            tracker.wait(_LINGER_MS / 1000)
        except zmq.NotDone:
            log.warning("%s: could not deliver its goodbye to the broker", self.where)

    def refused(self, reject: dict[str, Any]) -> None:
        """A REJECT: if the broker refused our key for the worker role, leave for good (from any thread)."""
        if reject.get("refused"):
            log.error("%s: the broker at %s refused us: %s", self.where, self.address, reject.get("reason"))
            self._exit(security.EXIT_REFUSED)  # a supervisor does not restart a refused worker

    def _exit(self, code: int) -> None:
        """Leave at once, although slot threads are inside tasks."""
        direct.unlink([s.direct.path for s in self.slots_ if s.direct is not None])
        if self.pool is not None:
            self.pool.close()
        self._sweep_at_exit()
        logging.shutdown()
        os._exit(code)

    def _sweep_at_exit(self) -> None:
        """Results written but never sent are ours alone: unlink them; and sweep garbage once more
        (of a driver that died with our results: we may be the last process of its cluster)."""
        if self.shm_domain is not None:
            shm.sweep_at_exit()


class _Slot:
    """One task slot: a thread owning one DEALER socket."""

    def __init__(self, worker: Worker, index: int, identity: bytes) -> None:
        self.worker = worker
        self.index = index
        self.identity = identity
        self.local: collections.deque[TaskEntry] = collections.deque()
        # (key, monotonic time its timeout_s ends or None) of the task running now: one tuple,
        # replaced as a whole, so the control thread never pairs a key with another task's deadline.
        self.running: tuple[int, float | None] | None = None
        self.done: list[ResultEntry] = []  # results not sent yet (a burst of short tasks)
        self.first_done = 0.0
        self.sock: zmq.Socket[Any] | None = None
        # Moving average run time per function (module, qualname), to guess whether
        # the next task is quick enough to keep holding finished results for.
        self.run_s: dict[tuple[Any, Any], float] = {}
        self.key: tuple[Any, Any] | None = None
        # Traced tasks (Flag.TRACE): the notes to send with the next RESULTS.
        self.notes: list[bytes] = []
        self.direct: direct_slot.SlotServer | None = None  # lone tasks drivers send us straight (distfork/direct.py)
        self._poller: zmq.Poller | None = None

    def _hello(self, sock: zmq.Socket[Any]) -> None:
        w = self.worker
        info = {
            "role": Role.WORKER.value,
            "name": f"{w.name}/{self.index}" if w.slots > 1 else w.name,
            "host": w.host,
            "pid": os.getpid(),
            "slots": 1,
            "shm_domain": w.shm_domain,
            "heartbeat_s": w.config.heartbeat_s,
            "resources": w.resources,
            "gpu_ids": w.gpu_ids,
            "labels": w.labels,
            "slurm_job": slurm_job_id(),  # shown by `distfork status`
        }
        sock.send_multipart(protocol.encode_json(Msg.HELLO, info))

    def run(self) -> None:
        w = self.worker
        sock = w._socket(self.identity)
        try:
            self._serve(sock)
        except Exception:  # noqa: BLE001 - a slot must not die silently
            log.exception("%s: slot %d failed", w.where, self.index)
            w.stop()
        finally:
            if self.direct is not None:
                try:
                    self._send_headers(sock, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
                self.direct.close()
            sock.close(linger=_LINGER_MS)

    def _send_headers(self, sock: zmq.Socket[Any], flags: int = 0) -> bool:
        """Send the broker the held-back result headers of our direct tasks, if any (SlotServer.headers)."""
        if self.direct is None or not self.direct.headers:
            return False
        sock.send_multipart(protocol.encode_batch(Msg.RESULTS, self.direct.take_headers()), flags, copy=False)
        return True

    def _serve(self, sock: zmq.Socket[Any]) -> None:
        w = self.worker
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(w._stop.fd, zmq.POLLIN)
        self._poller = poller  # the direct socket joins it once the broker knows us (WELCOME)
        heartbeat_ms = w.config.heartbeat_s * 1000
        threshold = w.config.oob_threshold_bytes
        self._hello(sock)
        self._last_hello = time.monotonic()
        local = self.local
        while not w._stopping:
            if not local:
                if not poller.poll(int(heartbeat_ms) if self.direct is None else self.direct.poll_ms(heartbeat_ms)):
                    if self._send_headers(sock):  # direct results' headers, due
                        continue
                    sock.send_multipart(protocol.encode_signal(Msg.HEARTBEAT))
                    continue
            self._drain(sock)
            self.done = []
            self.first_done = 0.0
            while local and not w._stopping:
                e = local.popleft()
                if e.id in w.cancelled:
                    w.cancelled.discard(e.id)
                    continue
                self._send_headers(sock)  # before a task that may run long
                started = time.perf_counter()
                pool = w.pool if e.flags & Flag.RESULT_SHM else None
                self.running = (e.id, time.monotonic() + e.timeout_s if e.timeout_s > 0 else None)
                if self.direct is not None:
                    self.direct.begin(e.id)
                self.sock = sock
                frames: Sequence[Any] = e.frames
                deps: Sequence[Sequence[Any]] = ()
                output.begin(e.id, self.identity.hex(), w.config.output_task_bytes)
                printed = False
                visible = None
                traced = e.flags & Flag.TRACE
                if traced:
                    _trace.open_task()  # forks the task makes are its children
                try:
                    if e.flags & Flag.RESOURCES:  # the GPUs the broker gave it: the only ones it sees
                        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                        if not frames:
                            raise ProtocolError("a task with resources but no payload")
                        ids = protocol.decode_devices(frames[0])
                        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in ids)
                        frames = frames[1:]
                    if e.flags & Flag.DEPS:
                        deps, frames = protocol.decode_dep_counts(frames)
                    status, out, retained = run_task(frames, w.where, threshold, pool, e.pid, self._before_call, deps)
                except ProtocolError as exc:
                    status, out, retained = Status.FAILED, [f"{w.where} got a malformed task: {exc}".encode()], False
                finally:
                    printed = output.end()  # its last lines go out before its result
                    if e.flags & Flag.RESOURCES:
                        if visible is None:
                            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                        else:
                            os.environ["CUDA_VISIBLE_DEVICES"] = visible
                    self.running = None
                    direct_slot.SlotServer.end()
                finished = time.perf_counter()
                if traced:  # its trace note: when it ran, its bytes, what it forked
                    try:
                        self.notes.append(_trace.close_task(e.id, started, finished, frames, out))
                    except Exception:  # noqa: BLE001 - a trace must never cost a result
                        log.exception("%s: could not write the trace note of task %d", w.where, e.id)
                self._learn(finished - started)
                if not self.done:
                    self.first_done = finished
                flags = (Flag.RETAINED if retained else 0) | (Flag.OUTPUT if printed else 0)
                self.done.append(ResultEntry(e.id, status, finished - started, out, flags))
                if not local or len(self.done) >= _FLUSH_COUNT or finished - self.first_done > _FLUSH_S:
                    self._flush()
                    self._drain(sock)
                elif finished - started >= _QUICK_S:  # the broker may have taken the next tasks back (CANCEL)
                    self._drain(sock)
            self._flush()

    def _flush(self) -> None:
        if self.done:
            if self.sock is None:  # set before the first task runs, so before any result
                raise RuntimeError("results to send but no task socket: _flush before _serve ran a task")
            for e in self.done:
                if len(e.frames) == 2:  # [stream, manifest]: its segment becomes the driver's now
                    name = shm.segment_of(e.frames)
                    if name is not None:
                        shm.hand_over(name)
            if self.direct is not None:  # direct tasks' results go to their drivers, a header to the broker
                self.done = self.direct.deliver(self.done)
                if not self.done and not self.notes:  # headers only: held back (SlotServer.poll_ms)
                    self.worker.finished_a_task()
                    return
            if self.notes:
                self.done.insert(0, _trace.notes_entry(self.notes))
                self.notes = []
            self.sock.send_multipart(protocol.encode_batch(Msg.RESULTS, self.done), copy=False)
            self.done = []
            self.worker.finished_a_task()

    def _before_call(self, func: Any) -> None:
        """About to call ``func``: results still held for batching go first, unless it is known to be quick.

        Batching results of back-to-back short tasks saves messages; a result
        must not wait behind a task that runs long, which we can only guess
        from what this function took before.
        """
        key = (getattr(func, "__module__", None), getattr(func, "__qualname__", None) or type(func).__qualname__)
        self.key = key
        if self.done and self.run_s.get(key, _QUICK_S) >= _QUICK_S:
            self._flush()

    def _learn(self, took_s: float) -> None:
        key = self.key
        if key is None:
            return
        self.key = None
        prev = self.run_s.get(key)
        self.run_s[key] = took_s if prev is None else 0.7 * prev + 0.3 * took_s
        if len(self.run_s) > 1000:
            self.run_s.clear()

    def _drain(self, sock: zmq.Socket[Any]) -> None:
        """Take every message waiting on the socket (and on our direct socket)."""
        if self.direct is not None:
            self.direct.drain(self.local)
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                kind, body = protocol.decode(frames)
                if kind is Msg.TASKS:
                    batch = protocol.decode_tasks(frames, body)
                    self.local.extend(batch)
                elif kind is Msg.CANCEL:
                    gone = set(protocol.decode_cancel(body))
                    self.worker.remember_cancelled(gone)
                    keep = [e for e in self.local if e.id not in gone]
                    self.local.clear()
                    self.local.extend(keep)
                elif kind is Msg.REJECT:
                    self.worker.refused(protocol.decode_json(body))
                    now = time.monotonic()
                    if now - self._last_hello > self.worker.config.heartbeat_s:
                        log.info("broker at %s does not know us (restarted?): saying hello again", self.worker.address)
                        self._hello(sock)
                        self._last_hello = now
                elif kind is Msg.WELCOME:
                    self.worker.welcomed(protocol.decode_json(body))
                    if self.direct is None and self._poller is not None:  # only now: a notice must find us
                        w = self.worker
                        self.direct = direct_slot.SlotServer.open(w.config, w.address, self.identity)
                        if self.direct is not None:
                            self._poller.register(self.direct.fd, zmq.POLLIN)
                elif kind is Msg.RECYCLE:
                    names = protocol.decode_json(body).get("names") or []
                    self.worker.take_back([n for n in names if isinstance(n, str)])
                elif kind is Msg.DISCARD:
                    for e in protocol.decode_results(frames, body):
                        serialize.free(e.frames)
                elif kind in (Msg.HEARTBEAT, Msg.BYE):
                    pass
                else:
                    raise ProtocolError(f"unexpected {kind.name} from the broker")
            except ProtocolError as exc:
                log.warning("dropped a message from the broker: %s", exc)


def _rss_bytes() -> int | None:
    """Resident memory of this process (shown by ``distfork status``), or None if unknown."""
    import psutil  # here: only the control thread needs it, once a heartbeat

    try:
        return int(psutil.Process().memory_info().rss)
    except psutil.Error:
        return None
