"""POSIX shared-memory segments: files in /dev/shm that we create, map and unlink.

Ownership (one owner unlinks each segment)::

    args    driver creates, writes, sends the name ─▶ worker maps (MAP_PRIVATE:
            its writes stay its own) ─▶ driver unlinks when the task ends
    results worker creates, writes, sends the name ─▶ driver maps (the array
            lives on the mapping); when the driver drops its last array on
            it, the segment goes back to the worker (RECYCLE), which keeps
            it as a warm spare or unlinks it
    held    a result other tasks take as an argument stays in the broker
            (broker_state.Hold) until they and the driver are done with it,
            then goes back to its worker as above
    orphans a segment whose creator died before handing it out (SIGKILL
            mid-transfer), or whose owner died, is unlinked by whoever sweeps
            next: the broker and every worker sweep their session's segments
            of dead pids; the embedded cluster sweeps the whole session's at
            its end.

Names are ``df-<session>-<creator pid>-<n>``, and a result segment gets
``-<owner pid>`` appended (the driver it is for) when it is handed out: the
session prefix ties a segment to one cluster, the pids to the processes
whose death makes it garbage. A result whose driver died before it arrived
is swept too, although the worker that wrote it lives on; a result handed
to a live driver is not swept when its worker dies (the driver, or the
broker for it, still uses it).

We do not use ``multiprocessing.shared_memory``: on Python < 3.13 it
registers every segment a process merely attaches to with the resource
tracker, which then unlinks it (or warns of a leak) when that process exits
(CPython gh-82300). Plain ``os.open`` + ``mmap`` on /dev/shm involves no
tracker; this module is the only place that unlinks.

Copying into a segment whose pages were never touched runs at page-fault
speed (about 1 GB/s here), into a touched one at memory bandwidth. So a
:class:`SegmentPool` keeps warm spares: segments allocated and touched ahead
of need by a background thread, sized after the last large transfer. A
driver takes an argument segment back (:meth:`SegmentPool.recycle`) when
the task has ended and the worker reports that nothing it kept still maps it;
otherwise the segment is unlinked, so nobody ever sees its bytes change
under them.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import mmap
import os
import re
import threading
from collections.abc import Sequence
from typing import Any

__all__ = [
    "SHM_DIR", "Segment", "SegmentPool", "ShmUnavailable", "attach", "creator", "domain", "segment_of", "sweep",
    "unlink",
]

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_PAGE = mmap.PAGESIZE
_counter = itertools.count()
_NAME = re.compile(r"^df-(?P<session>[0-9a-f]+)-(?P<pid>\d+)-\d+(?:-(?P<owner>\d+))?$")


class ShmUnavailable(OSError):
    """No shared memory for this transfer (/dev/shm full, missing or too small)."""


def domain() -> str | None:
    """Who sees the same /dev/shm as we do: boot id + the device and inode of /dev/shm.

    Two processes with equal domains open the same segment by name; a
    hostname says nothing of that (containers and network namespaces).
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        st = os.stat(SHM_DIR)
    except OSError:
        return None
    return f"{boot}:{st.st_dev}:{st.st_ino}"


class Segment:
    """A segment we created and own until we unlink it or hand it over."""

    __slots__ = ("name", "size", "mm", "view")

    def __init__(self, session: str, size: int, touch: bool = False, reopen: str | None = None) -> None:
        if reopen is not None:
            self._reopen(reopen)
            return
        self.name = f"df-{session}-{os.getpid()}-{next(_counter)}"
        self.size = size
        path = os.path.join(SHM_DIR, self.name)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError as exc:
            raise ShmUnavailable(exc.errno, f"cannot create {path}: {exc.strerror}") from None
        try:
            # Allocate now: a full /dev/shm fails here with ENOSPC instead of
            # killing us with SIGBUS when a page is first written.
            os.posix_fallocate(fd, 0, max(size, 1))
            self.mm = mmap.mmap(fd, max(size, 1))
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            raise ShmUnavailable(
                exc.errno or errno.ENOSPC, f"cannot allocate {size} bytes in {SHM_DIR}: {exc}"
            ) from None
        os.close(fd)
        self.view = memoryview(self.mm)
        if touch:
            self.view[::_PAGE] = bytes(len(range(0, max(size, 1), _PAGE)))

    def _reopen(self, name: str) -> None:
        """Take back a segment we created and handed out: strip its owner, map it again."""
        m = _NAME.match(name)
        if m is None or int(m["pid"]) != os.getpid():
            raise ValueError(f"{name} is not a segment of this process")
        self.name = name.rsplit("-", 1)[0] if m["owner"] else name
        if self.name != name:
            os.rename(os.path.join(SHM_DIR, name), os.path.join(SHM_DIR, self.name))
        fd = os.open(os.path.join(SHM_DIR, self.name), os.O_RDWR)
        try:
            self.size = os.fstat(fd).st_size
            self.mm = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self.view = memoryview(self.mm)

    def unlink(self) -> None:
        unlink(self.name)

    def adopt(self, owner: int) -> None:
        """Name the process this segment is for: it is swept if that process dies."""
        name = f"{self.name}-{owner}"
        os.rename(os.path.join(SHM_DIR, self.name), os.path.join(SHM_DIR, name))
        self.name = name

    def release(self) -> None:
        """Drop our mapping (the segment itself stays until unlinked)."""
        self.view.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # someone still holds a view; the mapping goes with it


def segment_of(frames: Sequence[Any]) -> str | None:
    """The segment a payload ``[stream, manifest]`` names (see serialize.route), or None."""
    if len(frames) != 2:
        return None
    try:
        name = json.loads(bytes(frames[1])).get("shm")
    except (ValueError, AttributeError, TypeError, RecursionError):
        return None
    return name if isinstance(name, str) else None


def creator(name: str) -> int | None:
    """The pid of the process that created segment ``name``, or None if it is not one of ours."""
    m = _NAME.match(name)
    return int(m["pid"]) if m else None


def unlink(name: str) -> None:
    """Remove segment ``name`` of /dev/shm; a name not of our form (a path, say) is refused."""
    if _NAME.match(name) is None:
        log.warning("refused to unlink %r: not the name of a distfork segment", name)
        return
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def attach(name: str, size: int, private: bool) -> memoryview:
    """Map a segment someone else created; writable. ``private``: our writes stay ours."""
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR if not private else os.O_RDONLY)
    try:
        flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
        mm = mmap.mmap(fd, max(size, 1), flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return memoryview(mm)


def sweep(session: str, pid: int | None = None, dead_only: bool = True) -> int:
    """Unlink this session's segments: of ``pid`` only (creator or owner), of dead ones only. Returns how many.

    A segment is dead when its owner is, or, before it has one, its creator.
    A result segment handed to a driver outlives the worker that wrote it:
    the broker may hold it for tasks that take it as an argument.
    """
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    gone = 0
    for name in names:
        m = _NAME.match(name)
        if m is None or m["session"] != session:
            continue
        pids = [int(m["pid"])] + ([int(m["owner"])] if m["owner"] else [])
        if pid is not None and pid not in pids:
            continue
        if dead_only and _alive(pids[-1]):
            continue
        unlink(name)
        gone += 1
    if gone:
        log.info("swept %d shared-memory segments of session %s", gone, session)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SegmentPool:
    """Hands out segments, keeping warm (pre-touched) spares ready in the background."""

    def __init__(self, session: str, spare_bytes: int) -> None:
        self.session = session
        self.spare_bytes = spare_bytes
        self._spares: list[Segment] = []
        self._lock = threading.Lock()
        self._want = 0  # size of spare to prepare next
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._thread: threading.Thread | None = None

    def take(self, size: int, owner: int = 0) -> Segment:
        """A segment of at least ``size`` bytes: a warm spare if one fits, else a new one.

        ``owner``: the pid of the process it is for (see :meth:`Segment.adopt`).
        """
        with self._lock:
            fit = [s for s in self._spares if size <= s.size <= 2 * size + _PAGE]
            seg = min(fit, key=lambda s: s.size) if fit else None
            if seg is not None:
                self._spares.remove(seg)
            if size <= self.spare_bytes and not self._closed:
                self._want = size
                self._wake.notify()
                if self._thread is None:
                    self._thread = threading.Thread(target=self._warm, name="distfork-shm-warmer", daemon=True)
                    self._thread.start()
        if seg is None:
            seg = Segment(self.session, size)
        if owner:
            seg.adopt(owner)
        return seg

    def _warm(self) -> None:
        with self._lock:
            while not self._closed:
                size = self._want
                held = sum(s.size for s in self._spares)
                if (
                    not size
                    or any(size <= s.size <= 2 * size + _PAGE for s in self._spares)
                    or held + size > self.spare_bytes
                ):
                    self._want = 0
                    self._wake.wait()
                    continue
                self._lock.release()
                try:
                    seg: Segment | None = Segment(self.session, size, touch=True)
                except ShmUnavailable as exc:
                    log.info("no warm shared-memory spare of %d bytes: %s", size, exc)
                    seg = None
                finally:
                    self._lock.acquire()
                if seg is None:
                    self._want = 0
                elif self._closed:
                    seg.release()
                    seg.unlink()
                else:
                    self._spares.append(seg)

    def take_back(self, name: str) -> None:
        """A segment we handed out as a result comes back unmapped by its receiver: keep it warm."""
        try:
            seg = Segment(self.session, 0, reopen=name)
        except (OSError, ValueError) as exc:
            log.debug("cannot take back %s: %s", name, exc)
            unlink(name)
            return
        self.recycle(seg)

    def recycle(self, seg: Segment) -> None:
        """Take back a segment nobody else maps any more: a warm spare, or unlinked if we hold enough."""
        with self._lock:
            if not self._closed and sum(s.size for s in self._spares) + seg.size <= self.spare_bytes:
                self._spares.append(seg)
                return
        seg.release()
        seg.unlink()

    def close(self) -> None:
        """Unlink every spare; segments already handed out are their owners' business."""
        with self._lock:
            self._closed = True
            self._wake.notify()
            spares, self._spares = self._spares, []
        for seg in spares:
            seg.release()
            seg.unlink()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"spares": len(self._spares), "spare_bytes": sum(s.size for s in self._spares)}
