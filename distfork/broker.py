"""The broker process: one ROUTER socket, one thread, the task table in between.

::

      drivers (DEALER) ──┐                                   ┌── workers (DEALER)
                         ▼                                   ▼
                 ┌───────────────────────────────────────────────────┐
                 │ ROUTER bound at the cluster's one address          │
                 │   recv ─▶ protocol.decode ─▶ BrokerState method    │
                 │   BrokerState.dispatch, then take_instructions ─▶   │
                 │   TASKS, RESULTS, CANCEL, ... (_execute sends them) │
                 │   every heartbeat_s: HEARTBEAT out, expire the      │
                 │   silent, check that our parent still lives         │
                 └───────────────────────────────────────────────────┘

Drivers and workers connect to the same address and tell the broker which
they are in their HELLO, so a cluster has exactly one address. The broker
reads only headers: payload frames are forwarded as they came, never
unpickled, so no user code ever runs here.

With ``metrics_port``, an HTTP thread serves ``/metrics`` (prometheus_client's
app, which only reads numbers: distfork/metrics.py) and the live dashboard
(distfork/dashboard.py, whose data the loop rebuilds once a heartbeat); the
loop adds to the numbers once per message.

SIGTERM or SIGINT stop the loop; peers are told BYE.
"""

from __future__ import annotations

import collections
import gc
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Sequence
from typing import Any

import zmq

from . import codeship, direct, direct_broker, endpoint, protocol, security, sharecache, shm
from . import tracing as _trace
from .broker_instructions import (
    Abort,
    Cancel,
    ClusterNotice,
    Discard,
    Instruction,
    Reclaimed,
    Recycle,
    Reject,
    SendResults,
    SendTasks,
    UnlinkOrphan,
)
from .broker_state import BrokerState, PeerInfo
from .config import (
    BATCH_MAX,
    BROKER_GC_THRESHOLD,
    DEFAULT_ADDRESS,
    OUTPUT_ROUTES_MAX,
    RECV_BURST,
    STEAL_CHECK_S,
    Config,
)
from .errors import ProtocolError
from .metrics import BrokerMetrics
from .protocol import Entry, Flag, Msg, Role
from .wakeup import Wakeup

__all__ = ["Broker"]

log = logging.getLogger(__name__)

# Messages whose sender's key must be admitted for the role they speak for (a HELLO names its
# role; a worker process's supervisor and control socket speak for workers).
_ROLE_BOUND = frozenset({Msg.HELLO, Msg.EXITED, Msg.KEEPALIVE, Msg.OUTPUT})  # OUTPUT: a worker process's lines
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)  # plain ints: no enum operation per frame
# The hot messages' enum members, read once (reading Msg.SUBMIT costs ~150 ns on Python 3.11).
_SUBMIT, _RESULTS, _DRIVER, _WORKER = Msg.SUBMIT, Msg.RESULTS, Role.DRIVER, Role.WORKER


class Broker:
    """A result broker bound to ``address``; :meth:`serve_forever` runs it."""

    def __init__(self, address: str, config: Config, parent_pid: int | None = None, session: str | None = None,
                 metrics_port: int | None = None, metrics_host: str = "127.0.0.1", insecure: bool = False) -> None:
        self.config = config
        self.parent_pid = parent_pid
        self.session = session or secrets.token_hex(4)
        self._ticks = 0
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.ROUTER)
        keys = security.server_keys(config, address)
        self.auth = security.ServerAuth(self._ctx, keys) if keys is not None else None
        if self.auth is not None:
            self.auth.secure(self.sock)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.HANDSHAKE_IVL, int(config.handshake_s * 1000))
        self.sock.setsockopt(zmq.BACKLOG, config.backlog)
        # Outgoing: bounded by the drivers' in-flight windows, never dropped.
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, config.hwm)
        if config.max_message_bytes:
            self.sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)
        if "[" in address:
            self.sock.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:PORT (only then: IPv4 addresses stay AF_INET)
        self._bind(address)
        self.code = codeship.CodeStore(config.code_store_bytes)  # drivers' code packages, by hash
        # (slot, task key) -> (driver, its task id), for lines that arrive after the task's result
        self._output_routes: collections.OrderedDict[tuple[bytes, int], tuple[bytes, int]] = collections.OrderedDict()
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.state = BrokerState(config, time.monotonic(), shm.domain())
        self.metrics = BrokerMetrics(self.state)
        self.direct = direct_broker.Adopter()  # tasks drivers sent straight to slots (distfork/direct.py)
        self.shares = sharecache.Relay(self.state.counters)  # share()d values fetched by worker hosts
        # Prometheus /metrics, from prometheus_client's own thread (it reads numbers, never the socket).
        self.metrics_server = self.metrics.serve(metrics_port, metrics_host) if metrics_port is not None else None
        try:
            self._check_exposure(address, insecure)
        except BaseException:
            self._close_sockets()
            raise
        if self.metrics_server is not None:
            self.metrics_server.dashboard.publish(self.state, time.monotonic())
        self._stopping = False
        self._reload_keys = False
        self._wakeup = Wakeup()  # stop() and SIGHUP, from a signal handler or another thread

    def _bind(self, address: str) -> None:
        """Bind; an ipc:// socket file is made 0600 (umask 077 while binding, then chmod), whatever the umask."""
        if not address.startswith("ipc://"):
            self.sock.bind(address)
            return
        old = os.umask(0o077)
        try:
            self.sock.bind(address)
        finally:
            os.umask(old)
        os.chmod(address[len("ipc://"):], 0o600)

    def _check_exposure(self, address: str, insecure: bool) -> None:
        """Serve only what is safe: judged by what the kernel says we listen on, never by the address string."""
        if self.auth is not None:
            return  # CURVE: only admitted keys get in
        wide = endpoint.exposed()
        insecure = insecure or self.config.insecure
        if wide and not insecure:
            raise endpoint.ExposedError(
                f"refusing to bind {address} without keys: the broker listens on {', '.join(wide)}, which is "
                "not loopback, so it is reachable from other machines, and whoever can reach a distfork broker can "
                "run any code on its workers. Make keys with `distfork keygen DIR` and pass --keys-dir DIR (or "
                "DISTFORK_KEYS_DIR) to the broker, workers and drivers; or bind a loopback address (the default, "
                f"{DEFAULT_ADDRESS}); or pass --insecure if this network is trusted."
            )
        if insecure:
            where = ", ".join(f"{ip}:{port}" for ip, port in endpoint.listening()) or self.address
            log.warning(
                "INSECURE: broker bound to %s without authentication; anyone who can reach it can run code on the "
                "workers (listening on %s)", self.address, where,
            )

    def _close_sockets(self) -> None:
        self.sock.close(linger=0)
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.auth is not None:
            self.auth.stop()
        self._ctx.term()

    def stop(self) -> None:
        """Ask the loop to end (safe from a signal handler or another thread)."""
        self._stopping = True
        self._wakeup.wake_from_signal()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
        signal.signal(signal.SIGHUP, lambda *_: self._request_reload())

    def _request_reload(self) -> None:
        self._reload_keys = True
        self._wakeup.wake_from_signal()

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wakeup.fd, zmq.POLLIN)
        heartbeat_s = self.config.heartbeat_s
        next_tick = time.monotonic() + heartbeat_s
        log.info("broker serving at %s (session %s)", self.address, self.session)
        shm.sweep()  # garbage any earlier cluster on this host left (its processes all died)
        # What is alive now (modules, our sockets) lives as long as we do: out of every collection
        # (gc.freeze); and a collection per BROKER_GC_THRESHOLD new objects, not per 700.
        thresholds = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(BROKER_GC_THRESHOLD, *thresholds[1:])
        try:
            while not self._stopping:
                timeout_ms = max(0.0, next_tick - time.monotonic()) * 1000
                if self.state.may_steal():
                    timeout_ms = min(timeout_ms, STEAL_CHECK_S * 1000)
                events = dict(poller.poll(int(timeout_ms)))
                now = time.monotonic()
                if self._wakeup.fd in events:
                    self._wakeup.drain()
                if self._reload_keys:
                    self._reload_keys = False
                    if self.auth is not None:
                        self.auth.reload()
                if self.sock in events:
                    self._receive(now)
                self.state.dispatch(now)
                self._execute(self.state.take_instructions())
                if now >= next_tick:
                    self._tick(now)
                    next_tick = now + heartbeat_s
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()
            for peer in list(self.state.peers):
                self._send(peer, protocol.encode_signal(Msg.BYE))
            shm.sweep()
            self._close_sockets()
            self._wakeup.close()
            if self.parent_pid is not None and self.address.startswith("ipc://"):
                # The embedded cluster's socket, in a private directory its
                # driver made: if that driver died without stopping us, no one
                # else is left to remove them.
                path = self.address[len("ipc://"):]
                private = os.path.basename(os.path.dirname(path)).startswith("distfork-")
                if private:
                    direct.remove_sockets(os.path.dirname(path))  # the slots' (a killed worker leaves its own)
                for remove in (os.unlink, os.rmdir) if private else ():
                    try:
                        remove(path)
                    except OSError:
                        pass
                    path = os.path.dirname(path)
            log.info("broker stopped")

    # -- receiving ----------------------------------------------------------

    def _receive(self, now: float) -> None:
        # recv and Frame.more by hand: pyzmq's recv_multipart asks the socket for RCVMORE after
        # every frame, through enum-typed options, which cost this loop more than the rest of a message.
        recv = self.sock.recv
        for _ in range(RECV_BURST):
            try:
                frame = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = [frame]
            while frame.more:
                frame = recv(0, copy=False)
                frames.append(frame)
            try:
                self._handle(frames[0].bytes, frames[1:], now)
            except ProtocolError as exc:
                self.state.counters["messages_dropped"] += 1
                log.debug("dropped a message: %s", exc)
            except Exception:  # noqa: BLE001 - one bad message must not stop the broker
                self.state.counters["messages_dropped"] += 1
                log.exception("dropped a message that broke its handler")

    def _handle(self, peer: bytes, frames: list[Any], now: float) -> None:
        kind, body = protocol.decode(frames)
        if self.auth is not None and kind in _ROLE_BOUND and self._refuse_role(peer, frames, kind, body):
            return
        p = self.state.seen(peer, now)
        if p is not None:
            if kind is _SUBMIT and p.role is _DRIVER:
                entries = protocol.decode_tasks(frames, body)
                self.state.submit(p, entries, now)
                self.metrics.tasks_in(entries)
            elif kind is _RESULTS and p.role is _WORKER:
                results = _trace.take_notes(p, protocol.decode_results(frames, body), now)
                self.metrics.results_in(p, results, now)
                results = self.direct.results(self.state, p, results)
                for e in results:
                    if e.flags & Flag.OUTPUT:  # its last lines may come after it, by another socket
                        self._route_output(p, e.id)
                self.state.results(p, results, now)
            elif kind is Msg.HEARTBEAT:
                pass
            elif kind is Msg.DIRECT and p.role is Role.DRIVER:  # tasks it sent straight to slots
                self.direct.adopt(self.state, p, protocol.decode_tasks(frames, body), now)
            elif kind is Msg.CANCEL and p.role is Role.DRIVER:
                self.state.cancel(p, protocol.decode_cancel(body), now)
            elif kind is Msg.RECYCLE and p.role is Role.DRIVER:
                self.state.recycle(p, protocol.decode_recycle(body), now)
            elif kind is Msg.FETCH and p.role is Role.DRIVER:
                self.state.fetch(p, protocol.decode_cancel(body), now)
            elif kind is Msg.RELEASE and p.role is Role.DRIVER:
                self.state.release(p, protocol.decode_cancel(body), now)
            elif kind is Msg.RECLAIM and p.role is Role.DRIVER:
                self.state.reclaim(p, protocol.decode_cancel(body), now)
            elif kind is Msg.HELLO:
                self._hello(peer, body, now)
            elif kind is Msg.BYE:
                self.state.bye(peer, now)
            elif kind is Msg.STATUS:
                self._send(peer, protocol.encode_json(Msg.STATUS_REPLY, self._status(now)))
            elif kind is Msg.CODE and p.role is Role.DRIVER:
                self._code_in(frames, body)
            elif kind is Msg.CODE_GET:
                self._code_out(peer, body)
            elif kind is Msg.SHARE_GET:
                self._send(*self.shares.get(peer, body, self._is_driver))
            elif kind is Msg.SHARE and p.role is Role.DRIVER:
                self._send(*self.shares.reply(peer, frames, body))
            elif kind is Msg.SHARE_DROP and p.role is Role.DRIVER:
                self._send_all(self.shares.drop(peer, body, self._controls()))
            else:
                raise ProtocolError(f"{kind.name} from a {p.role.value}")
        elif kind is Msg.HELLO:
            self._hello(peer, body, now)
        elif kind is Msg.STATUS:
            self._send(peer, protocol.encode_json(Msg.STATUS_REPLY, self._status(now)))
        elif kind is Msg.CODE_GET:  # a worker slot's fetch socket: authenticated, never registered
            self._code_out(peer, body)
        elif kind is Msg.SHARE_GET:  # the same, for a share()d value (distfork/sharecache.py)
            self._send(*self.shares.get(peer, body, self._is_driver))
        elif kind is Msg.OUTPUT:  # a worker process's control socket: what its running tasks print
            self._output(peer, protocol.decode_output(body))
        elif kind is Msg.KEEPALIVE:
            self.state.keepalive(peer, protocol.decode_keepalive(body), now)
        elif kind is Msg.EXITED:
            ex = protocol.decode_exited(body)
            self.state.exited(ex.host, ex.pid, ex.code, now, oom=ex.oom)
        elif kind is not Msg.BYE:
            # Typically: we restarted and the peer does not know yet. A message we drop
            # may name shared-memory segments: the state frees them (BrokerState.unknown_peer).
            dropped = protocol.decode_results(frames, body) if kind is Msg.RESULTS else []
            recycled = protocol.decode_recycle(body, strict=False) if kind is Msg.RECYCLE else ()
            self.state.unknown_peer(peer, now, dropped, recycled)

    def _refuse_role(self, peer: bytes, frames: list[Any], kind: Msg, body: memoryview) -> bool:
        """A HELLO (or a worker's own message) whose key is not admitted for that role: REJECT it, never register."""
        assert self.auth is not None
        role = protocol.decode_hello(body)[0] if kind is Msg.HELLO else Role.WORKER
        why = self.auth.refusal(frames[0], role)
        if why is None:
            return False
        self.state.counters["hellos_refused"] += 1
        log.warning("refused a %s %s from a key not admitted for that role", role.value, kind.name)
        self.state.bye(peer, time.monotonic())  # a registered peer that says hello in another role
        self._send(peer, protocol.encode_json(Msg.REJECT, {"reason": why, "refused": True}))
        return True

    def _output(self, control: bytes, msg: protocol.Output) -> None:
        """Forward a task's lines to its driver, if the slot they name runs it and belongs to the sender."""
        key, body = msg.key, msg.body
        w = self.state.workers.get(msg.peer)
        if w is None or w.control not in (None, control):
            raise ProtocolError("OUTPUT for a slot of another process")
        route = self._output_routes.get((w.id, key)) or self._route_output(w, key)
        if route is None:
            return  # the task is gone (its result already went, or it was cancelled)
        driver, task_id = route
        info = w.info
        out = {"id": task_id, "lines": body["lines"], "dropped": body.get("dropped", 0),
               "final": bool(body.get("final")), "worker": info.get("name"), "host": info.get("host"),
               "pid": info.get("pid")}
        self._send(driver, protocol.encode_json(Msg.OUTPUT, out))
        if out["final"]:
            self._output_routes.pop((w.id, key), None)

    def _route_output(self, w: PeerInfo, key: int) -> tuple[bytes, int] | None:
        """Remember whose task ``key`` on slot ``w`` is, for its lines (kept for the last 10,000)."""
        task = w.assigned.get(key)
        if task is None:
            return None
        route = self._output_routes[(w.id, key)] = (task.driver, task.task_id)
        while len(self._output_routes) > OUTPUT_ROUTES_MAX:
            self._output_routes.popitem(last=False)
        return route

    def _code_in(self, frames: list[Any], body: memoryview) -> None:
        code_hash, data = protocol.decode_code(frames, body)
        if data is None or not self.code.put(code_hash, bytes(data)):
            raise ProtocolError(f"code package {code_hash[:12]} without data, or whose bytes have another hash")

    def _code_out(self, peer: bytes, body: memoryview) -> None:
        code_hash = protocol.decode_code_get(body)
        self._send(peer, protocol.encode_code(code_hash, self.code.get(code_hash)))

    def _status(self, now: float) -> dict[str, Any]:
        snap = self.state.status(now)
        snap["metrics"] = self.metrics.snapshot()
        if self.metrics_server is not None:
            snap["metrics_url"] = self.metrics_server.url
        return snap

    def _hello(self, peer: bytes, body: memoryview, now: float) -> None:
        _, info = protocol.decode_hello(body)
        try:
            p = self.state.hello(peer, info, now)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ProtocolError(f"bad hello: {exc}") from None
        self._send(peer, protocol.encode_json(Msg.WELCOME, self._welcome(p)))

    def _welcome(self, p: PeerInfo) -> dict[str, Any]:
        return {
            "session": self.session,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "heartbeat_s": self.config.heartbeat_s,
            "local_workers": self.state.local_workers(p.domain),
        }

    # -- sending ------------------------------------------------------------

    def _send(self, peer: bytes, frames: list[Any]) -> None:
        # Frame by frame with int flags: pyzmq's send_multipart checks and or-s enum flags per frame.
        # The header is small bytes (copied); the payload frames after it go without a copy.
        send = self.sock.send
        last = len(frames) - 1
        try:
            send(peer, _SNDMORE)
            send(frames[0], _SNDMORE if last else 0)
            for i in range(1, last + 1):
                send(frames[i], _SNDMORE if i < last else 0, copy=False)
        except zmq.ZMQError as exc:
            log.debug("could not send to %s: %s", peer.hex(), exc)

    def _is_driver(self, peer: bytes) -> bool:
        p = self.state.peers.get(peer)
        return p is not None and p.role is Role.DRIVER

    def _controls(self) -> list[bytes]:
        """The control socket of every worker process."""
        return sorted({w.control for w in self.state.workers.values() if w.control is not None})

    def _send_all(self, messages: list[tuple[bytes, list[Any]]]) -> None:
        for peer, frames in messages:
            self._send(peer, frames)

    def _send_batches(self, peer: bytes, kind: Msg, entries: Sequence[Entry]) -> None:
        for start in range(0, len(entries), BATCH_MAX):
            self._send(peer, protocol.encode_batch(kind, entries[start : start + BATCH_MAX]))

    def _execute(self, instructions: list[Instruction]) -> None:
        """Carry out what the state decided: sends, and unlinks in our own /dev/shm."""
        for ins in instructions:
            if type(ins) is SendTasks:
                self._send_batches(ins.worker, Msg.TASKS, ins.entries)
                self.metrics.started += len(ins.entries)
            elif type(ins) is SendResults:
                self._send_batches(ins.driver, Msg.RESULTS, ins.entries)
            elif type(ins) is Cancel:
                self._send(ins.worker, protocol.encode_cancel(ins.keys))
            elif type(ins) is Abort:
                self._send(ins.control, protocol.encode_cancel(ins.keys))
            elif type(ins) is Discard:
                self._send_batches(ins.worker, Msg.DISCARD, ins.entries)
            elif type(ins) is Recycle:
                self._send(ins.worker, protocol.encode_json(Msg.RECYCLE, {"names": ins.names}))
            elif type(ins) is UnlinkOrphan:
                shm.unlink(ins.name)
            elif type(ins) is ClusterNotice:
                self._send(ins.driver, protocol.encode_json(Msg.CLUSTER, ins.facts))
            elif type(ins) is Reclaimed:
                self._send(ins.driver, protocol.encode_json(Msg.RECLAIMED, {"granted": ins.granted,
                                                                             "asked": list(ins.asked)}))
            elif type(ins) is Reject:
                self._send(ins.peer, protocol.encode_json(Msg.REJECT, {"reason": ins.reason}))
            else:
                raise TypeError(f"unknown instruction {ins!r}")

    def _tick(self, now: float) -> None:
        if self.metrics_server is not None:
            self.metrics_server.dashboard.publish(self.state, now)  # the live page's data, once a heartbeat
        for peer in self.state.peers:
            self._send(peer, protocol.encode_signal(Msg.HEARTBEAT))
        self.state.expire(now)
        self._send_all(self.shares.gone(self._is_driver, self._controls))  # drivers that left: their values
        self._ticks += 1
        if self._ticks % 5 == 0:
            shm.sweep()  # garbage of any session: segments of processes that died mid-transfer
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.warning("parent process %d is gone; stopping", self.parent_pid)
            self.stop()

