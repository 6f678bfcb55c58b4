"""``distfork.share(obj)``: put a large object in shared memory once, pass a handle to many forks.

::

    driver                                   worker on the driver's host
    share(m); first fork ─ pickle once ─▶ segment df-<session>-<driver pid>-<n>  (read-only by contract)
    fork(h, x) ─ pickles h as (name, layout, small pickle stream, key) ─▶ _attach(...)
                                                ├─ cached? same object, if unchanged
                                                └─ else map (private), unpickle, cache
                                             worker on another host: the same, on the host's copy,
                                             fetched once per host by key (distfork/sharecache.py)
    h.release() ─ unlink; SHARE_DROP ─▶ workers drop their copy (other hosts: told by the broker)

A fork whose arguments (or function) hold a :class:`Shared` handle sends a
few hundred bytes instead of the object's buffers: its bytes were copied
into one segment by the first such fork, and every worker maps that
segment (or its host's copy) and unpickles it once, then keeps the object
in a cache for the next tasks. What a task gets is the same object each
time on a worker, so the value is read-only by contract:

- numpy arrays in it are built read-only (writes raise ``ValueError``);
- torch tensors carry a version counter that every in-place op bumps: a
  worker that finds a cached tensor changed unpickles a fresh copy from the
  segment (whose bytes never change) before handing it to the next task.
  Writes through ``tensor.data`` or a numpy view bypass the counter: don't.

Ownership (see shm.py): the driver creates the segment and is its one
owner: it unlinks it on ``release()``, when the handle is garbage-collected,
or at exit; a driver killed leaves it to the sweepers (its pid is in the
name). Workers only map it (private, copy-on-write); a worker's mapping of a
released segment goes at its next share lookup, or with the worker. A host
copy on another host belongs to the worker process that fetched it
(sharecache.py).

In inline mode (or pickled outside a fork) a handle pickles its object by
value. Handles are not pinned to the driver's host.

The same machinery serves forks of plain modules: :class:`ParamCache`
sends a large ``nn.Parameter`` (or read-only array) forked again unchanged
as a reference to a copy of its bytes (such forks are pinned to the
driver's host: :func:`pins`); and :func:`dep_value` reuses a torch module a
held future stands for.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from . import serialize, sharecache, shm
from .errors import DistforkError

__all__ = ["Shared", "share"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_ALIGN = 64


class _Pins(threading.local):
    count = 0  # references to segments of this driver pickled by this thread


_pins = _Pins()


def pins() -> int:
    """How many shared-memory references this thread has pickled: a fork that pickled any is
    pinned to the workers of the driver's host (``Flag.PINNED``), the only ones that can map them."""
    return _pins.count


class _Forking(threading.local):
    driver: Any = None  # the Driver a fork in this thread pickles for (set by api._fork)


_forking = _Forking()


class Shared(Generic[T]):
    """A handle to an object copied into shared memory once (see :func:`share`).

    Pass it to ``fork`` wherever the object would go (as the function, an
    argument, inside a list...): the task gets the object. Calling the
    handle calls the object here. ``release()`` (or ``with``) frees the
    segment here and the copies on other hosts; a released handle cannot be
    forked.

    The copy is made by the first fork through a cluster (a fork in inline
    mode pickles the object by value).
    """

    def __init__(self, obj: T, oob_threshold_bytes: int) -> None:
        self.value = obj
        self.name: str | None = None  # the segment on the driver's host (None: bytes in this process)
        self.key: str | None = None  # what worker hosts fetch it by (distfork/sharecache.py)
        self.nbytes = 0
        self._threshold = oob_threshold_bytes
        self._extents: tuple[tuple[int, int], ...] = ()
        self._stream = b""
        self._domain = shm.domain()
        self._session = ""
        self._blob: bytearray | None = None  # the bytes, when this driver has no /dev/shm
        self._digest: sharecache.Digest | None = None
        self._servers: list[weakref.ref[sharecache.Server]] = []  # drivers it was forked through
        self._lock = threading.Lock()
        self._copied = False
        self._released = False
        self._finalizer: weakref.finalize | None = None  # type: ignore[type-arg]

    def _copy(self, session: str, use_shm: bool) -> None:
        """Pickle the object once; its large buffers go to a segment of ours (caller holds ``_lock``)."""
        self._copied = True
        copier, serialize._local.share_copy = serialize._local.share_copy, None  # all bytes in our segment
        try:
            frames = serialize.dumps(self.value, self._threshold)
        finally:
            serialize._local.share_copy = copier
        bufs = [memoryview(b).cast("B") for b in frames[1:]]
        if not bufs:
            return  # nothing large: by value is as cheap
        extents, total = [], 0
        for b in bufs:
            total = -(-total // _ALIGN) * _ALIGN
            extents.append((total, b.nbytes))
            total += b.nbytes
        read: Callable[[], memoryview]
        if self._domain is not None and use_shm:
            seg = shm.Segment(session, total)
            try:
                for (off, n), b in zip(extents, bufs, strict=True):
                    seg.view[off : off + n] = b
            except BaseException:
                seg.release()
                seg.unlink()
                raise
            seg.release()  # we own it, but need no mapping of it: the object itself stays ours
            name = self.name = seg.name
            read = lambda: shm.attach(name, total, private=True)  # noqa: E731
        else:
            blob = self._blob = bytearray(total)
            for (off, n), b in zip(extents, bufs, strict=True):
                blob[off : off + n] = b
            self._domain = None
            read = lambda: memoryview(blob)  # noqa: E731
        self.nbytes, self._extents, self._stream, self._session = total, tuple(extents), bytes(frames[0]), session
        self.key = sharecache.new_key()
        self._digest = sharecache.Digest(read)  # for hosts that fetch it: in the background
        self._finalizer = weakref.finalize(self, _free, self.name, self.key, self._servers)
        log.debug("shared %s as %s (%d bytes)", serialize.describe(self.value), self.name or "bytes", total)

    def source(self) -> tuple[memoryview, str] | None:
        """Its bytes and their sha256, for a worker host that fetches them (the driver's I/O thread)."""
        with self._lock:
            if self._released or self.key is None or self._digest is None:
                return None
            if self.name is not None:
                try:
                    view = shm.attach(self.name, self.nbytes, private=True)
                except FileNotFoundError:
                    return None
            else:
                assert self._blob is not None
                view = memoryview(self._blob)
        return view[: self.nbytes], self._digest.wait()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.value(*args, **kwargs)  # type: ignore[operator]

    def release(self) -> None:
        """Unlink the segment; workers drop their copies (on other hosts: told by the broker)."""
        with self._lock:
            self._released = True
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Shared[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        where = f"segment {self.name}, {self.nbytes} bytes" if self.name else (
            f"{self.nbytes} bytes in this process" if self.key else "by value" if self._copied else "not copied yet")
        return f"<distfork.Shared {serialize.describe(self.value)}: {where}{', released' if self._released else ''}>"

    def __reduce__(self) -> Any:
        driver = _forking.driver
        with self._lock:
            if self._released:
                raise DistforkError(f"{self!r} was released; fork with the object itself, or share it again")
            session = getattr(driver, "_session", None)
            if driver is None or not isinstance(session, str):
                return _by_value, (self.value,)  # inline mode, or pickled outside a fork
            if not self._copied:
                self._copy(session, driver.shm_domain is not None)
            if self.key is None:
                return _by_value, (self.value,)
            server: sharecache.Server = driver.shares
            if not any(r() is server for r in self._servers):
                server.register(self.key, self)
                self._servers.append(weakref.ref(server))
        return _attach, (self.name, self.nbytes, self._extents, self._stream, self._domain, self.key,
                         driver.identity.hex(), self._session)


def _free(name: str | None, key: str, servers: list[weakref.ref[sharecache.Server]]) -> None:
    """A handle released (or collected): its segment goes, and hosts that fetched it drop their copies."""
    if name is not None:
        shm.unlink(name)
    for ref in servers:
        server = ref()
        if server is not None:
            server.forget(key)


def share(obj: T) -> Shared[T]:
    """A handle that sends ``obj``'s large buffers to each host once; fork with it many times.

    >>> h = distfork.share(model)              # 100 MB of weights: copied once
    >>> futs = [distfork.fork(h, x) for x in batches]   # each sends ~1 KB

    The first fork copies the buffers into shared memory on the driver's
    host; each worker there maps the segment, and each other host fetches
    the bytes once into a copy of its own; every worker process unpickles
    the object once, then reuses it for later tasks while it is unchanged
    (see the module docstring: the value is read-only by contract). Release
    the handle with ``h.release()`` or a ``with`` block (it frees the copies
    on every host); it is also released when garbage-collected and at exit.
    In inline mode a handle pickles ``obj`` by value.
    """
    from . import api

    return Shared(obj, api._current().config.oob_threshold_bytes)


def _by_value(obj: T) -> T:
    return obj


# -- forks of the same parameters (or read-only arrays) again and again --------------------


class _Copy:
    """Driver side: what a parameter (or array) looked like when last forked, and the segment
    holding a copy of its bytes once it was forked unchanged twice (``name``; None before)."""

    __slots__ = ("name", "size", "ref", "address", "version", "sample", "finalizer")

    def __init__(self, ref: Any, address: int, version: int, sample: bytes) -> None:
        self.name: str | None = None
        self.size = 0
        self.ref, self.address, self.version, self.sample = ref, address, version, sample
        self.finalizer: weakref.finalize | None = None  # type: ignore[type-arg]


class ParamCache:
    """What a driver copied into shared memory for forks of its ``nn.Parameter``s and read-only arrays.

    A large parameter (``Config.share_min_bytes``) forked a second time
    unchanged has its bytes copied into a segment of its own; that fork and
    later ones, while it stays unchanged, pickle a reference (as a
    :class:`Shared` handle does) and each worker reuses the tensor it built.
    A parameter that changes between forks (training) keeps the usual path
    (a warm argument segment each fork): no copy is made for it.

    Unchanged means: the same storage address, the same version counter
    (every in-place op bumps it), and the same sample of 64 words spread
    over it (which catches most writes that bypass the counter, through
    ``.data`` or a numpy view). A read-only numpy array is its own marker
    (no counter): its address and sample. On a change the copy is unlinked.
    The segment goes with the parameter (a finalizer), at exit, or with the
    cluster's session.
    """

    def __init__(self, session: str, min_bytes: int, pool: shm.SegmentPool | None = None) -> None:
        self.session = session
        self.min_bytes = min_bytes
        self.pool = pool  # the driver's argument segments: its warm spares that large retire (shm.py)
        self._lock = threading.RLock()  # a finalizer (forget) may run under it: a change, or the GC
        self._copies: dict[int, _Copy] = {}

    def reduce(self, obj: Any) -> Any:
        """The reduction of ``obj`` as a reference to its copy, or NotImplemented (pickle it as usual)."""
        if not self.min_bytes:
            return NotImplemented
        raw, rebuild = _raw_bytes(obj)
        if raw is None or raw.nbytes < self.min_bytes:
            return NotImplemented
        address = raw.__array_interface__["data"][0]
        version = getattr(obj, "_version", 0)
        sample = _sample(raw)
        with self._lock:
            copy = self._copies.get(id(obj))
            if copy is None or copy.ref() is not obj or copy.address != address or copy.version != version \
                    or copy.sample != sample:
                if copy is not None and copy.finalizer is not None:
                    copy.finalizer()  # changed (or another object at that id): its copy goes
                self._remember(obj, address, version, sample)
                return NotImplemented  # first sight (or changed): the usual path
            if copy.name is None:
                self._fill(copy, obj, raw)
            name, size = copy.name, copy.size
        _pins.count += 1
        return _attach_one, (name, size, rebuild, shm.domain())

    def _remember(self, obj: Any, address: int, version: int, sample: bytes) -> None:
        copy = _Copy(weakref.ref(obj), address, version, sample)
        key = id(obj)

        def forget() -> None:
            if copy.name is not None:
                shm.unlink(copy.name)
            with self._lock:
                if self._copies.get(key) is copy:
                    del self._copies[key]

        copy.finalizer = weakref.finalize(obj, forget)
        self._copies[key] = copy

    def _fill(self, copy: _Copy, obj: Any, raw: Any) -> None:
        # The argument path's warm spares this large held the bytes of earlier forks of it; from
        # now on they travel by reference: one of them holds the copy, the others go.
        seg = self.pool.retire(raw.nbytes) if self.pool is not None else None
        if seg is None:
            seg = shm.Segment(self.session, raw.nbytes)
        try:
            seg.view[: raw.nbytes] = memoryview(raw).cast("B")
        except BaseException:
            seg.release()
            seg.unlink()
            raise
        seg.release()
        copy.name, copy.size = seg.name, raw.nbytes
        log.debug("copied %s into %s for later forks", serialize.describe(obj), seg.name)

    def names(self) -> set[str]:
        """The segments holding copies now."""
        with self._lock:
            return {c.name for c in self._copies.values() if c.name is not None}

    def close(self) -> None:
        """Unlink every copy (the runtime shuts down)."""
        with self._lock:
            copies = list(self._copies.values())
        for copy in copies:
            if copy.finalizer is not None:
                copy.finalizer()


def _raw_bytes(obj: Any) -> tuple[Any, bytes]:
    """``obj``'s bytes as a uint8 numpy array, and a pickle of how to rebuild ``obj`` on them; or (None, b"")."""
    np = sys.modules.get("numpy")
    if np is not None and type(obj) is np.ndarray:
        if obj.flags.writeable or obj.dtype.hasobject or not obj.flags.c_contiguous:
            return None, b""
        return obj.reshape(-1).view(np.uint8), pickle.dumps(("ndarray", obj.dtype.str, obj.shape))
    torch = sys.modules.get("torch")
    if torch is None or type(obj) is not torch.nn.Parameter:
        return None, b""
    reduced = serialize._reduce_tensor(obj.data)
    if reduced is NotImplemented:
        return None, b""
    raw, dtype, shape, stride, _ = reduced[1]
    return raw, pickle.dumps(("parameter", dtype, shape, stride, obj.requires_grad))


def _sample(raw: Any) -> bytes:
    """64 words of 8 bytes spread over ``raw`` (whole words: a change of any byte of a value shows)."""
    n = raw.nbytes
    if n <= 512:
        return bytes(raw)
    import numpy as np

    starts = np.linspace(0, n - 8, 64).astype(np.int64) & ~7
    return bytes(raw[starts[:, None] + np.arange(8)])


def _rebuild(rebuild: bytes, buf: Any) -> Any:
    """Worker side: the array or parameter ``rebuild`` describes, on the read-only buffer ``buf``."""
    import numpy as np

    kind, *spec = pickle.loads(rebuild)
    if kind == "ndarray":
        dtype, shape = spec
        return np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape)
    import torch

    dtype, shape, stride, requires_grad = spec
    tensor = serialize._rebuild_tensor(np.frombuffer(buf, np.uint8), dtype, shape, stride, False)
    return torch.nn.Parameter(tensor, requires_grad)


# -- the worker's side ------------------------------------------------------------------


class _Entry:
    """A shared object unpickled in this process, and what tells whether a task changed it."""

    __slots__ = ("obj", "path", "tensors", "versions", "shape")

    def __init__(self, obj: Any, path: str | None) -> None:
        self.obj = obj
        self.path = path  # the segment it was built on (gone: released), or None (bytes of ours)
        self.tensors = list(_tensors_in(obj))
        self.versions = [t._version for t in self.tensors]
        self.shape = _module_shape(obj)

    def unchanged(self) -> bool:
        """No task changed a tensor in place, gave it a gradient or hooked it, swapped a module's
        tensors or flipped its train/eval mode: the next task may have it."""
        return all(
            t._version == v and t.grad is None and not t._backward_hooks
            for t, v in zip(self.tensors, self.versions, strict=True)
        ) and _module_shape(self.obj) == self.shape


def _module_shape(obj: Any) -> tuple[Any, ...] | None:
    """What a task could change in a torch module besides its tensors' values: which tensors it holds
    and its submodules' modes (None: not a module)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(obj, torch.nn.Module):
        return None
    return (tuple(id(t) for t in (*obj.parameters(), *obj.buffers())),
            tuple(m.training for m in obj.modules()))


_lock = threading.RLock()  # a value's unpickling may look up another (re-entrant)
_cache: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
_CACHE_MAX = 4096  # shared objects (or parameters) a process keeps; the least recently used goes first
_SWEEP_S = 0.5  # how often a lookup checks which cached segments their drivers unlinked
_last_sweep = 0.0
_drops: collections.deque[str] = collections.deque()  # keys released (SHARE_DROP), applied under _lock


def _attach(
    name: str | None, size: int, extents: tuple[tuple[int, int], ...], stream: bytes, domain: str | None,
    key: str | None = None, driver: str = "", session: str = "",
) -> Any:
    """Unpickling a :class:`Shared` handle: the object, from this process's cache, from the driver's
    segment (on its host) or from this host's copy (fetched once per host: distfork/sharecache.py)."""

    def load(bufs: list[memoryview]) -> Any:
        return pickle.loads(stream, buffers=bufs)

    if key is None or (name is not None and domain is not None and domain == shm.domain()):
        assert name is not None
        return _cached(name, size, extents, domain, load)
    return _cached(f"k:{key}", size, extents, domain, load,
                   lambda: sharecache.host_copy(session, key, size, driver))


def _attach_one(name: str, size: int, rebuild: bytes, domain: str | None) -> Any:
    """Unpickling a :class:`ParamCache` reference: the parameter or array, cached or from the segment."""
    return _cached(name, size, ((0, size),), domain, lambda bufs: _rebuild(rebuild, bufs[0]))


def _cached(
    name: str, size: int, extents: tuple[tuple[int, int], ...], domain: str | None,
    load: Callable[[list[memoryview]], Any],
    fetch: Callable[[], tuple[str | None, memoryview]] | None = None,
) -> Any:
    with _lock:
        _apply_drops()
        _drop_released(time.monotonic())
        entry = _cache.get(name)
        if entry is not None and entry.unchanged():
            _cache.move_to_end(name)
            return entry.obj
        path: str | None = name
        if fetch is not None:
            path, view = fetch()
        else:
            if domain is None or domain != shm.domain():
                raise DistforkError(
                    f"a shared-memory reference ({name}) reached a process on another host; tasks that take "
                    "these run on the driver's host only (the broker pins them there)"
                )
            try:
                view = shm.attach(name, size, private=True)
            except FileNotFoundError:
                raise DistforkError(f"the shared value {name} was released before this task started") from None
        bufs = [view[off : off + n].toreadonly() for off, n in extents]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")  # torch on read-only arrays
            obj = load(bufs)
        _cache[name] = _Entry(obj, path)
        _cache.move_to_end(name)
        while len(_cache) > _CACHE_MAX:
            _cache.popitem(last=False)
        return obj


def dep_value(frames: Sequence[Any], leases: list[serialize.Lease]) -> Any:
    """A held value a task takes as an argument (``serialize.unpack_call``): a torch module or tensor
    in a segment is built once per worker process and reused while unchanged, as a shared value is.

    Other values (numpy arrays arrive writable) are unpickled for each task.
    The first task's lease reports the mapping kept (``Flag.RETAINED``), so
    the broker unlinks the segment when the hold ends instead of recycling it
    under our mapping; the object goes at the next lookup after that.
    """
    name = shm.segment_of(frames)
    if name is None:
        return serialize.unpack(frames, private=True, leases=leases)
    key = f"h:{name}"
    with _lock:
        _drop_released(time.monotonic())
        entry = _cache.get(key)
        if entry is not None and entry.unchanged():
            _cache.move_to_end(key)
            return entry.obj
        value = serialize.unpack(frames, private=True, leases=leases)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(value, (torch.nn.Module, torch.Tensor)):
            _cache[key] = _Entry(value, name)
            while len(_cache) > _CACHE_MAX:
                _cache.popitem(last=False)
        return value


def forget(keys: Sequence[str]) -> None:
    """Shared values released (SHARE_DROP, from a worker's control thread): drop their objects, now if
    no task is looking a value up, else at the next lookup."""
    _drops.extend(keys)
    if _lock.acquire(blocking=False):
        try:
            _apply_drops()
        finally:
            _lock.release()


def _apply_drops() -> None:
    while _drops:
        _cache.pop(f"k:{_drops.popleft()}", None)


def _drop_released(now: float | None = None) -> None:
    """Forget cached objects whose segment the driver unlinked (released, or the driver is gone);
    at most every ``_SWEEP_S`` seconds unless ``now`` is None."""
    global _last_sweep
    if now is not None:
        if now - _last_sweep < _SWEEP_S:
            return
        _last_sweep = now
    for name in [n for n, e in _cache.items()
                 if e.path is not None and not os.path.exists(os.path.join(shm.SHM_DIR, e.path))]:
        del _cache[name]


def cached_names() -> list[str]:
    """The segments whose objects this process keeps (for tests and status)."""
    with _lock:
        return list(_cache)


def _tensors_in(obj: Any, depth: int = 4) -> Iterator[Any]:
    """The torch tensors in ``obj``: a tensor, a module's parameters and buffers, or in containers."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    seen: set[int] = set()

    def walk(o: Any, d: int) -> Iterator[Any]:
        if id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            yield o
        elif isinstance(o, torch.nn.Module):
            yield from o.parameters()
            yield from o.buffers()
        elif d > 0 and isinstance(o, (list, tuple)):
            for x in o:
                yield from walk(x, d - 1)
        elif d > 0 and isinstance(o, dict):
            for x in o.values():
                yield from walk(x, d - 1)

    yield from walk(obj, depth)

