"""``distfork.share(obj)``: put a large object in shared memory once, pass a handle to many forks.

::

    driver                                   worker (any on the driver's host)
    share(m) ─ pickle once ─▶ segment df-<session>-<driver pid>-<n>  (read-only by contract)
    fork(h, x) ─ pickles h as (name, layout, small pickle stream) ─▶ _attach(...)
                                                ├─ cached? same object, if unchanged
                                                └─ else map (private), unpickle, cache
    h.release() ─ unlink ─▶ workers drop their copy at their next share lookup

A fork whose arguments (or function) hold a :class:`Shared` handle sends a
few hundred bytes instead of the object's buffers: its bytes were copied
into one segment when the handle was made, and every worker on that host
maps that segment and unpickles it once, then keeps the object in a cache
for the next tasks. What a task gets is the same object each time on a
worker, so the value is read-only by contract:

- numpy arrays in it are built read-only (writes raise ``ValueError``);
- torch tensors carry a version counter that every in-place op bumps: a
  worker that finds a cached tensor changed unpickles a fresh copy from the
  segment (whose bytes never change) before handing it to the next task.
  Writes through ``tensor.data`` or a numpy view bypass the counter: don't.

Ownership (see shm.py): the driver creates the segment and is its one
owner: it unlinks it on ``release()``, when the handle is garbage-collected,
or at exit; a driver killed leaves it to the sweepers (its pid is in the
name). Workers only map it (private, copy-on-write); a worker's mapping of a
released segment goes at its next share lookup, or with the worker.

Without shared memory to the workers (inline mode, a cluster on other
hosts, ``DISTFORK_SHM=0``) a handle pickles its object by value, as if it
were passed directly: correct, without the saving.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from . import serialize, shm
from .errors import DistforkError

__all__ = ["Shared", "share"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_ALIGN = 64


class Shared(Generic[T]):
    """A handle to an object copied into shared memory once (see :func:`share`).

    Pass it to ``fork`` wherever the object would go (as the function, an
    argument, inside a list...): the task gets the object. Calling the
    handle calls the object here. ``release()`` (or ``with``) frees the
    segment; a released handle cannot be forked.
    """

    def __init__(self, obj: T, session: str | None, oob_threshold_bytes: int) -> None:
        self.value = obj
        self.name: str | None = None
        self.nbytes = 0
        self._extents: list[tuple[int, int]] = []
        self._stream = b""
        self._domain = shm.domain()
        self._released = False
        self._finalizer: weakref.finalize | None = None  # type: ignore[type-arg]
        if session is None or self._domain is None:
            return  # no worker shares our /dev/shm: pickled by value
        frames = serialize.dumps(obj, oob_threshold_bytes)
        bufs = [memoryview(b).cast("B") for b in frames[1:]]
        if not bufs:
            return  # nothing large: by value is as cheap
        total = 0
        for b in bufs:
            total = -(-total // _ALIGN) * _ALIGN
            self._extents.append((total, b.nbytes))
            total += b.nbytes
        seg = shm.Segment(session, total)
        try:
            for (off, n), b in zip(self._extents, bufs, strict=True):
                seg.view[off : off + n] = b
        except BaseException:
            seg.release()
            seg.unlink()
            raise
        seg.release()  # we own it, but need no mapping of it: the object itself stays ours
        self.name, self.nbytes, self._stream = seg.name, total, bytes(frames[0])
        self._finalizer = weakref.finalize(self, shm.unlink, seg.name)
        log.debug("shared %s as %s (%d bytes)", serialize.describe(obj), seg.name, total)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.value(*args, **kwargs)  # type: ignore[operator]

    def release(self) -> None:
        """Unlink the segment; workers drop their copies at their next share lookup."""
        self._released = True
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Shared[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        where = f"segment {self.name}, {self.nbytes} bytes" if self.name else "by value"
        return f"<distfork.Shared {serialize.describe(self.value)}: {where}{', released' if self._released else ''}>"

    def __reduce__(self) -> Any:
        if self._released:
            raise DistforkError(
                f"{self!r} was released; fork with the object itself, or share it again"
            )
        if self.name is None:
            return _by_value, (self.value,)
        return _attach, (self.name, self.nbytes, tuple(self._extents), self._stream, self._domain)


def share(obj: T) -> Shared[T]:
    """Copy ``obj``'s large buffers into shared memory once; fork with the handle many times.

    >>> h = distfork.share(model)              # 100 MB of weights: copied once
    >>> futs = [distfork.fork(h, x) for x in batches]   # each sends ~1 KB

    Each worker on this host maps the segment and unpickles the object once,
    then reuses it for later tasks while it is unchanged (see the module
    docstring: the value is read-only by contract). Release the handle with
    ``h.release()`` or a ``with`` block; it is also released when garbage-
    collected and at exit. Without shared memory to the workers, the handle
    pickles ``obj`` by value on every fork.
    """
    from . import api

    rt = api._current()
    driver = rt.driver
    session = None
    if driver is not None and driver._pool is not None:  # a worker shares our /dev/shm
        session = driver._session
    return Shared(obj, session, rt.config.oob_threshold_bytes)


def _by_value(obj: T) -> T:
    return obj


# -- the worker's side ------------------------------------------------------------------


class _Entry:
    """A shared object unpickled in this process, and what tells whether a task changed it."""

    __slots__ = ("obj", "tensors", "versions")

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.tensors = list(_tensors_in(obj))
        self.versions = [t._version for t in self.tensors]

    def unchanged(self) -> bool:
        return all(t._version == v for t, v in zip(self.tensors, self.versions, strict=True))


_lock = threading.Lock()
_cache: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
_CACHE_MAX = 16  # shared objects a process keeps; the least recently used goes first


def _attach(name: str, size: int, extents: tuple[tuple[int, int], ...], stream: bytes, domain: str | None) -> Any:
    """Unpickling a handle: the object, from this process's cache or from the segment."""
    with _lock:
        _drop_released()
        entry = _cache.get(name)
        if entry is not None and entry.unchanged():
            _cache.move_to_end(name)
            return entry.obj
        if domain is None or domain != shm.domain():
            raise DistforkError(
                f"a distfork.share() handle ({name}) reached a process on another host: shared values "
                "reach workers on the driver's host only; pass the object itself to forks that may run elsewhere"
            )
        try:
            view = shm.attach(name, size, private=True)
        except FileNotFoundError:
            raise DistforkError(f"the shared value {name} was released before this task started") from None
        bufs = [view[off : off + n].toreadonly() for off, n in extents]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")  # torch on read-only arrays
            obj = pickle.loads(stream, buffers=bufs)
        _cache[name] = _Entry(obj)
        _cache.move_to_end(name)
        while len(_cache) > _CACHE_MAX:
            _cache.popitem(last=False)
        return obj


def _drop_released() -> None:
    """Forget cached objects whose segment the driver unlinked (released, or the driver is gone)."""
    for name in [n for n in _cache if not os.path.exists(os.path.join(shm.SHM_DIR, n))]:
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

