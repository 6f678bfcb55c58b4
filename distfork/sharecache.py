"""A ``share()``d value's bytes reach each worker host once, and stay there until released.

::

    driver (I/O thread)            broker (Relay)                    worker host (any of its worker processes)
    ┌────────────────────────┐     ┌─────────────────────────┐       ┌───────────────────────────────────────┐
    │ Server: key -> handle  │     │ routes SHARE_GET to the  │       │ a task's handle names key K:          │
    │ (its segment, or bytes)│ ◀── │ driver the handle names, │ ◀──── │  in this process's cache? use it       │
    │ SHARE_GET: send them   │ ──▶ │ the answer back to the   │ ────▶ │  else under flock(/dev/shm): a copy    │
    │ (frames of 16 MiB, the │     │ asker (only one it asked │       │  df-<session>-<pid>-<start>-<K[:16]>?  │
    │ sha256 in the header)  │     │ for); counts share_bytes │       │  map it; else claim it, SHARE_GET on a │
    │ release(): SHARE_DROP  │ ──▶ │ SHARE_DROP to every      │ ────▶ │  socket of its own, check sha256,      │
    └────────────────────────┘     │ worker's control socket  │       │  write, rename into place              │
                                   └─────────────────────────┘       │ SHARE_DROP: forget, unlink the copy    │
                                                                     └───────────────────────────────────────┘

The handle travels in every fork as a reference (a few hundred bytes).
Workers on the driver's host map the driver's own segment by name
(distfork/shared.py). A worker on another host looks for the host's copy in
its /dev/shm: one segment per value per host, made by the first worker
process of that host that needed it (the others wait for it under a lock on
the /dev/shm directory, then map it), so the bytes cross the network once
per host. Its maker owns it: it unlinks it on SHARE_DROP (any process of the
host that gets the drop does: the name says which value), and if it dies
the sweepers remove it (the others keep their mappings; a later task
fetches again). A worker without /dev/shm (``DISTFORK_SHM=0``) keeps the
bytes in its process.

Security: the fetch goes over an authenticated connection to the broker (a
DEALER of the worker's own keys, as codeship's CODE_GET), never a new port;
the broker forwards only answers to fetches it routed, from the driver it
asked; the worker checks the bytes against the sha256 the driver computed
and only maps a host copy owned by its own user. The key is a random
128-bit token: a peer that never saw the handle cannot name the value.
If the driver that shared a value goes away, the broker sends the drops for
the values it served.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from . import protocol, shm
from .errors import DistforkError, ProtocolError
from .protocol import Msg

__all__ = ["Relay", "Server", "configure_worker", "dropped", "host_copy", "new_key", "stats"]

log = logging.getLogger(__name__)

FRAME_BYTES = 16 * 1024 * 1024  # as serialize.FRAME_BYTES: under the broker's max_message_bytes
_PENDING_MAX = 10_000  # fetches the broker routes at once at most
_ASK_AGAIN_S = 5.0  # a fetch unanswered this long is sent again


def new_key() -> str:
    return secrets.token_hex(16)


class Digest:
    """The sha256 of a value's bytes, computed in a thread of its own (off the fork that copied them)."""

    def __init__(self, read: Callable[[], memoryview]) -> None:
        self._read = read
        self.value = ""
        self._thread = threading.Thread(target=self._run, name="distfork-share-digest", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            view = self._read()
            self.value = hashlib.sha256(view).hexdigest()  # hashlib drops the GIL on large buffers
            view.release()
        except Exception:  # noqa: BLE001 - a fetch then fails, saying so
            log.exception("could not hash a shared value")

    def wait(self) -> str:
        self._thread.join()
        return self.value


# -- the driver side ---------------------------------------------------------------------------


class Server:
    """A driver's shared values, by key, for workers of other hosts to fetch (from its I/O thread)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._handles: dict[str, weakref.ref[Any]] = {}  # key -> the shared.Shared handle
        self._served: set[str] = set()  # keys some host fetched: a release tells the workers
        self.drops: collections.deque[str] = collections.deque()  # for the I/O thread to send

    def register(self, key: str, handle: Any) -> None:
        with self._lock:
            self._handles[key] = weakref.ref(handle)

    def forget(self, key: str) -> None:
        """The handle was released (or collected): hosts that fetched it drop their copies."""
        with self._lock:
            self._handles.pop(key, None)
            if key not in self._served:
                return
            self._served.discard(key)
        self.drops.append(key)
        self._wake()

    def flush(self, sock: Any) -> None:
        """I/O thread: tell the broker which values were released."""
        keys = [self.drops.popleft() for _ in range(len(self.drops))]
        if keys:
            sock.send_multipart(protocol.encode_share_drop(keys))

    def serve(self, sock: Any, body: memoryview) -> None:
        """I/O thread: a worker host asks for a value's bytes: send them (no copy: frames of its segment)."""
        key, _, asker = protocol.decode_share_get(body)
        with self._lock:
            ref = self._handles.get(key)
            handle = ref() if ref is not None else None
            if handle is not None:
                self._served.add(key)
        source = handle.source() if handle is not None else None
        if source is None:
            sock.send_multipart(protocol.encode_share(key, asker, None))
            return
        view, digest = source
        chunks = [view[i : i + FRAME_BYTES] for i in range(0, view.nbytes, FRAME_BYTES)]
        log.debug("sending shared value %s (%d bytes) to %s", key, view.nbytes, asker)
        sock.send_multipart(protocol.encode_share(key, asker, chunks, digest, view.nbytes), copy=False)


# -- the broker side ---------------------------------------------------------------------------


class Relay:
    """Routes fetches from worker hosts to the driver that has the value, and its answer back.

    No I/O: each method returns the messages to send, as (peer, frames).
    The broker forwards bytes it never looks into, and only answers to
    fetches it routed itself, from the driver it asked.
    """

    def __init__(self, counters: collections.Counter[str]) -> None:
        self.counters = counters
        self._pending: collections.OrderedDict[tuple[bytes, str], bytes] = collections.OrderedDict()
        self._served: dict[bytes, set[str]] = {}  # driver -> keys some worker host fetched

    def get(self, asker: bytes, body: memoryview, is_driver: Callable[[bytes], bool]) -> tuple[bytes, list[Any]]:
        key, driver_hex, _ = protocol.decode_share_get(body)
        driver = bytes.fromhex(driver_hex)
        if not is_driver(driver):
            return asker, protocol.encode_share(key, "", None)  # that driver is gone: so is its value
        self._pending[(asker, key)] = driver
        while len(self._pending) > _PENDING_MAX:
            self._pending.popitem(last=False)
        return driver, protocol.encode_share_get(key, driver_hex, asker.hex())

    def reply(self, driver: bytes, frames: list[Any], body: memoryview) -> tuple[bytes, list[Any]]:
        share = protocol.decode_share(frames, body)
        asker = bytes.fromhex(share.asker) if share.asker else b""
        if self._pending.get((asker, share.key)) != driver:
            raise ProtocolError("SHARE that answers no fetch of this driver")
        del self._pending[(asker, share.key)]
        if share.data is not None:
            self.counters["share_fetches"] += 1
            self.counters["share_bytes"] += sum(len(f) for f in share.data)
            self._served.setdefault(driver, set()).add(share.key)
        return asker, protocol.encode_share(share.key, "", share.data, share.sha256, share.size)

    def drop(self, driver: bytes, body: memoryview, controls: Sequence[bytes]) -> list[tuple[bytes, list[Any]]]:
        keys = protocol.decode_share_drop(body)
        served = self._served.get(driver, set())
        served.difference_update(keys)
        if not served:
            self._served.pop(driver, None)
        return [(c, protocol.encode_share_drop(keys)) for c in controls]

    def gone(self, live: Callable[[bytes], bool],
             controls: Callable[[], Sequence[bytes]]) -> list[tuple[bytes, list[Any]]]:
        """Drivers that left: their values go from every host (called once a heartbeat)."""
        out: list[tuple[bytes, list[Any]]] = []
        for driver in [d for d in self._served if not live(d)]:
            keys = sorted(self._served.pop(driver))
            out += [(c, protocol.encode_share_drop(keys)) for c in controls()]
        return out


# -- the worker side ---------------------------------------------------------------------------


class _WorkerShares:
    def __init__(self) -> None:
        self.address = ""
        self.keys: Any = None
        self.use_shm = False
        self.timeout_s = 30.0
        self.fetches = 0  # values this process fetched over the network
        self.fetched_bytes = 0
        self.memory: dict[str, memoryview] = {}  # key -> bytes, without /dev/shm


_w = _WorkerShares()


def configure_worker(address: str, keys: Any, use_shm: bool, timeout_s: float) -> None:
    """Called once by a worker process: where to fetch values from, whether the host copy is in /dev/shm."""
    _w.address, _w.keys, _w.use_shm, _w.timeout_s = address, keys, use_shm and shm.domain() is not None, timeout_s


def stats() -> dict[str, int]:
    """What this process fetched (for tests and status)."""
    return {"fetches": _w.fetches, "fetched_bytes": _w.fetched_bytes}


def _fetch(key: str, driver: str, size: int, into: memoryview) -> None:
    """Ask the broker for value ``key`` of ``driver``; write its ``size`` bytes into ``into``, checked."""
    import zmq

    from . import security

    if not _w.address:
        raise DistforkError("a shared value reached a process that is not a distfork worker connected to a broker")
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    security.secure_client(sock, _w.keys)
    sock.connect(_w.address)
    timeout_s = _w.timeout_s + size / 20e6  # the bytes may take a while on a slow link
    try:
        deadline = time.monotonic() + timeout_s
        again_s = _ASK_AGAIN_S + size / 20e6  # not while a large answer may still be on its way
        asked = 0.0
        while True:
            now = time.monotonic()
            if now - asked >= again_s:  # again: a restarted broker forgot the first (it drops extra answers)
                sock.send_multipart(protocol.encode_share_get(key, driver))
                asked = now
            left = deadline - now
            if left <= 0:
                raise DistforkError(
                    f"the shared value {key} did not arrive from its driver within {timeout_s:.0f} s "
                    "(code_fetch_timeout_s); is the driver that shared it still connected?")
            if not sock.poll(int(min(left, again_s) * 1000) + 1):
                continue
            frames = sock.recv_multipart(copy=False)
            kind, body = protocol.decode(frames)
            if kind is not Msg.SHARE:
                continue
            share = protocol.decode_share(frames, body)
            if share.key != key:
                continue
            if share.data is None:
                raise DistforkError(f"the shared value {key} was released (or its driver left) before this task "
                                    "started")
            h = hashlib.sha256()
            offset = 0
            for f in share.data:
                b = memoryview(f.buffer if hasattr(f, "buffer") else f).cast("B")
                if offset + b.nbytes > size:
                    raise DistforkError(f"the shared value {key} arrived with more than its {size} bytes")
                h.update(b)
                into[offset : offset + b.nbytes] = b
                offset += b.nbytes
            if offset != size or share.size != size or h.hexdigest() != share.sha256:
                raise DistforkError(f"the shared value {key} arrived damaged: {offset} of {size} bytes, "
                                    "or not the bytes its driver hashed")
            _w.fetches += 1
            _w.fetched_bytes += size
            log.info("fetched shared value %s (%d bytes) from its driver", key, size)
            return
    finally:
        sock.close(linger=0)


def _suffix(key: str) -> str:
    return "-" + key[:16]


def _find(session: str, key: str, size: int) -> tuple[str, int] | None:
    """The host's copy of ``key`` (a segment of our user): (name, its size now; 0 while being written)."""
    prefix, suffix, uid = f"df-{session}-", _suffix(key), os.geteuid()
    try:
        names = os.listdir(shm.SHM_DIR)
    except OSError:
        return None
    for name in names:
        if name.startswith(prefix) and name.endswith(suffix) and shm.parse(name) is not None:
            try:
                st = os.stat(os.path.join(shm.SHM_DIR, name))
            except FileNotFoundError:
                continue
            if st.st_uid == uid and not st.st_mode & 0o077 and st.st_size in (0, size):
                return name, st.st_size
    return None


class _DirLock:
    """flock on the /dev/shm directory: one process of the host at a time looks for and claims a copy."""

    def __init__(self, wait_s: float = 5.0) -> None:
        self.wait_s = wait_s
        self.fd = -1

    def __enter__(self) -> _DirLock:
        self.fd = os.open(shm.SHM_DIR, os.O_RDONLY)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    log.warning("no lock on %s (%s): a shared value may be fetched twice here", shm.SHM_DIR, exc)
                    return self  # someone holds it for long: go on without (a second fetch at worst)
                time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the lock


def host_copy(session: str, key: str, size: int, driver: str) -> tuple[str | None, memoryview]:
    """This host's copy of shared value ``key``: (its segment, our private mapping of it), fetched if
    no process of the host has it yet. Without /dev/shm: (None, bytes of this process)."""
    if not _w.use_shm:
        view = _w.memory.get(key)
        if view is None:
            buf = memoryview(bytearray(size))
            _fetch(key, driver, size, buf)
            _w.memory[key] = view = buf
        return None, view
    deadline = time.monotonic() + _w.timeout_s + size / 20e6
    while True:
        with _DirLock():
            found = _find(session, key, size)
            if found is None:
                claim = _claim(session, key)
        if found is None:
            return claim, _fill(claim, session, key, size, driver)
        if found[1] == size:
            try:
                return found[0], shm.attach(found[0], size, private=True)
            except FileNotFoundError:
                continue  # dropped meanwhile
        # Another process of this host is fetching it: wait for it (or for its death).
        n = shm.parse(found[0])
        if n is not None and not shm._alive(n.pid, n.start):
            shm.unlink(found[0])
        elif time.monotonic() > deadline:
            raise DistforkError(f"another worker process of this host fetched the shared value {key} for too long")
        else:
            time.sleep(0.01)


def _claim(session: str, key: str) -> str:
    """Say (under the directory lock) that this process fetches ``key`` for the host: an empty segment."""
    pid, start = shm._me()
    name = f"df-{session}-{pid}-{start}{_suffix(key)}"
    fd = os.open(os.path.join(shm.SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.close(fd)
    return name


def _fill(claim: str, session: str, key: str, size: int, driver: str) -> memoryview:
    """Fetch ``key`` into a new segment, then put it in place of the (empty) claim, atomically."""
    try:
        seg = shm.Segment(session, size)
        try:
            _fetch(key, driver, size, seg.view[:size])
            os.rename(os.path.join(shm.SHM_DIR, seg.name), os.path.join(shm.SHM_DIR, claim))
        except BaseException:
            seg.release()
            seg.unlink()
            raise
        seg.release()
        return shm.attach(claim, size, private=True)
    except BaseException:
        shm.unlink(claim)
        raise


def dropped(keys: Sequence[str]) -> None:
    """SHARE_DROP (a worker's control thread): values released; their host copies and cached objects go."""
    from . import shared

    for name in _names_of(keys):
        shm.unlink(name)
    for key in keys:
        _w.memory.pop(key, None)
    shared.forget(keys)


def _names_of(keys: Sequence[str]) -> list[str]:
    suffixes = {_suffix(k) for k in keys}
    try:
        names = os.listdir(shm.SHM_DIR)
    except OSError:
        return []
    return [n for n in names if shm.parse(n) is not None and n[-17:] in suffixes]
