"""POSIX shared-memory segments: files in /dev/shm that we create, map and unlink.

Ownership (one owner unlinks each segment)::

    args    driver creates, writes, sends the name ─▶ worker maps (MAP_PRIVATE:
            its writes stay its own) ─▶ driver unlinks when the task ends
    results worker creates, writes, sends the name ─▶ driver maps (the array
            lives on the mapping); when the driver drops its last array on
            it, the segment goes back to the worker (RECYCLE), which keeps
            it as a warm spare or unlinks it. The worker keeps its own
            mapping meanwhile (SegmentPool.let_go) but never writes it before
            the RECYCLE; it drops that mapping if the driver unlinks instead
    held    a result other tasks take as an argument stays in the broker
            (broker_state.Hold) until they and the driver are done with it,
            then goes back to its worker as above
    garbage every segment has a live owner or is garbage: before it is handed
            over, its owner is its creator; once handed over (renamed, just
            before the message naming it is sent), the process it is for.
            A segment whose owner is gone is unlinked by whoever sweeps
            next, of ANY session: the broker and every worker at start,
            every 5 heartbeats and at exit, and the fork server of the
            embedded cluster once its children are gone (the last one out).
            A sweep never touches a segment of another Unix user (it logs
            and skips it) and never fails on one that vanished meanwhile.

Names are ``df-<session>-<creator pid>-<creator start>-<random>``, and a
result segment gets ``-<owner pid>-<owner start>`` appended (the driver it
is for) when it is handed over. The start is the process's start time
(clock ticks since boot, /proc/PID/stat): a pid reused by a later process
does not keep garbage alive. The random part makes names unguessable, and a
name that is taken (planted by someone) is retried with another. The
session prefix ties a segment to one cluster, for the embedded cluster's
final sweep. A result whose driver died before it arrived is swept,
although the worker that wrote it lives on; a result handed to a live
driver is not swept when its worker dies (the driver, or the broker for it,
still uses it).

We do not use ``multiprocessing.shared_memory``: on Python < 3.13 it
registers every segment a process merely attaches to with the resource
tracker, which then unlinks it (or warns of a leak) when that process exits
(CPython gh-82300). Plain ``os.open`` + ``mmap`` on /dev/shm involves no
tracker; this module is the only place that unlinks.

Copying into a segment whose pages were never touched runs at page-fault
speed (about 1 GB/s here), into a touched one at memory bandwidth; and a new
mapping of touched pages faults again on every page (2 GB/s). So segments
are mapped with ``MAP_POPULATE``, and a :class:`SegmentPool` keeps warm
spares: segments allocated and touched ahead of need by a background thread,
sized after the last large transfer, and result segments that came back,
mapped again by that thread (not on the way of the next result). A
driver takes an argument segment back (:meth:`SegmentPool.recycle`) when
the task has ended and the worker reports that nothing it kept still maps it;
otherwise the segment is unlinked, so nobody ever sees its bytes change
under them.
"""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from .errors import ProtocolError
from .protocol import decode_manifest

__all__ = [
    "PARALLEL_COPY_BYTES", "SHM_DIR", "Segment", "SegmentPool", "ShmUnavailable", "attach", "copy_into", "creator",
    "domain", "hand_over", "parse", "pid_exists",
    "release_own", "segment_of", "sweep", "sweep_at_exit", "unlink",
]

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_PAGE = mmap.PAGESIZE
_NAME = re.compile(
    r"^df-(?P<session>[0-9a-f]+)-(?P<pid>\d+)-(?P<start>\d+)-(?P<rand>[0-9a-f]{16})"
    r"(?:-(?P<owner>\d+)-(?P<owner_start>\d+))?$"
)
#: Map every page at mmap time (one call) instead of one page fault per 4 KiB page at first write.
_SHARED_POPULATE = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python 3.11 lacks the name
_CREATE_TRIES = 8  # names taken (planted by someone else) before we give up
_logged_foreign: set[str] = set()  # segments of other users we said we skip (said once each)


class Name(NamedTuple):
    """What a segment's name says: its session, who made it and who it is for (0: nobody yet)."""

    session: str
    pid: int
    start: int
    owner: int
    owner_start: int

    @property
    def holder(self) -> tuple[int, int]:
        """The process whose death makes the segment garbage: its owner, or before it has one, its creator."""
        return (self.owner, self.owner_start) if self.owner else (self.pid, self.start)


def parse(name: str) -> Name | None:
    """The parts of a distfork segment name, or None if ``name`` is not one."""
    m = _NAME.match(name)
    if m is None:
        return None
    return Name(m["session"], int(m["pid"]), int(m["start"]), int(m["owner"] or 0), int(m["owner_start"] or 0))


def _start_of(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot); None if it is gone (or a zombie); 0 if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None if os.path.isdir("/proc/self") else (0 if pid_exists(pid) else None)
    except OSError:
        return 0
    fields = stat.rsplit(b")", 1)[-1].split()
    try:
        if fields[0] in (b"Z", b"X", b"x"):
            return None  # dead, not yet reaped
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


def pid_exists(pid: int) -> bool:
    """A process of this pid exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_mine: tuple[int, int] = (0, 0)


def _me() -> tuple[int, int]:
    """Our pid and start time (computed again in a forked child)."""
    global _mine
    pid = os.getpid()
    if _mine[0] != pid:
        _mine = (pid, _start_of(pid) or 0)
    return _mine


def _alive(pid: int, start: int) -> bool:
    """Whether the process that is ``pid`` and started at ``start`` (0: any start) still runs."""
    now = _start_of(pid)
    if now is None:
        return False
    return start == 0 or now == 0 or now == start


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

    # name: what receivers are told; file: its name in /dev/shm now (the two differ
    # between adopt() and the hand-over, see hand_over()).
    __slots__ = ("name", "file", "size", "mm", "view", "ino")

    def __init__(self, session: str, size: int, touch: bool = False, reopen: str | None = None) -> None:
        if reopen is not None:
            self._reopen(reopen)
            return
        pid, start = _me()
        self.size = size
        for _ in range(_CREATE_TRIES):
            self.name = f"df-{session}-{pid}-{start}-{_random_part()}"
            self.file = self.name
            path = os.path.join(SHM_DIR, self.name)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                break
            except FileExistsError:
                log.warning("shared-memory segment %s exists already (not made by us?): trying another name", path)
            except OSError as exc:
                raise ShmUnavailable(exc.errno, f"cannot create {path}: {exc.strerror}") from None
        else:
            raise ShmUnavailable(errno.EEXIST,
                                 f"{_CREATE_TRIES} names in {SHM_DIR} were taken; is someone planting them?")
        try:
            # Allocate now: a full /dev/shm fails here with ENOSPC instead of
            # killing us with SIGBUS when a page is first written.
            os.posix_fallocate(fd, 0, max(size, 1))
            self.mm = mmap.mmap(fd, max(size, 1), flags=_SHARED_POPULATE)
            self.ino = os.fstat(fd).st_ino  # which file we map, whatever its name becomes
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
        n = parse(name)
        if n is None or (n.pid, n.start) != _me():
            raise ValueError(f"{name} is not a segment of this process")
        self.name = self.file = _unowned(name) if n.owner else name
        if self.name != name:
            os.rename(os.path.join(SHM_DIR, name), os.path.join(SHM_DIR, self.name))
        fd = os.open(os.path.join(SHM_DIR, self.name), os.O_RDWR)
        try:
            st = os.fstat(fd)
            self.size, self.ino = st.st_size, st.st_ino
            # Populated: a new mapping of pages that exist faults on every page we
            # write (a 100 MB copy took 45 ms instead of 18 ms, plus 2 ms here).
            self.mm = mmap.mmap(fd, self.size, flags=_SHARED_POPULATE)
        finally:
            os.close(fd)
        self.view = memoryview(self.mm)

    def unlink(self) -> None:
        unlink(self.file)

    def adopt(self, owner: int) -> None:
        """Name the process this segment is for; the file takes that name at :func:`hand_over`.

        Until then it stays ours (swept if we die): a result written but
        never sent must not live as long as the driver it was meant for.
        """
        self.name = f"{self.file}-{owner}-{_start_of(owner) or 0}"

    def release(self) -> None:
        """Drop our mapping (the segment itself stays until unlinked)."""
        self.view.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # someone still holds a view; the mapping goes with it


#: Copies of at least this many bytes are shared with helper threads (one per core, up to 4): one
#: thread copies ~7 GB/s here, two ~14 GB/s; starting a thread costs ~0.1 ms.
PARALLEL_COPY_BYTES = 16 * 1024 * 1024
_COPY_THREADS_MAX = 4
_COPY_CHUNK = 4 * 1024 * 1024  # threads take chunks in turn: one descheduled thread delays one chunk, not half


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def copy_into(dst: memoryview, src: Any) -> None:
    """``dst[:] = src`` for a contiguous buffer ``src`` of ``dst.nbytes`` bytes; a large copy is shared
    with helper threads (numpy copies without the GIL), which take chunks in turn."""
    n = dst.nbytes
    np: Any = sys.modules.get("numpy")  # (not imported for this: ~0.1 s in a process that never used it)
    helpers = min(_cores(), _COPY_THREADS_MAX) - 1 if n >= PARALLEL_COPY_BYTES and np is not None else 0
    if helpers < 1:
        dst[:] = memoryview(src).cast("B")
        return
    d = np.frombuffer(dst, np.uint8)
    s = np.frombuffer(src, np.uint8)
    if s.nbytes != n:
        raise ValueError(f"cannot copy {s.nbytes} bytes into {n}")
    chunks = itertools.count(0, _COPY_CHUNK)  # next() is atomic under the GIL
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while (at := next(chunks)) < n:
                np.copyto(d[at : at + _COPY_CHUNK], s[at : at + _COPY_CHUNK])
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller below
            errors.append(exc)

    threads = [threading.Thread(target=work, name="distfork-copy", daemon=True) for _ in range(helpers)]
    for t in threads:
        t.start()
    work()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _is(name: str, ino: int) -> bool:
    """Whether /dev/shm/``name`` is the file ``ino``."""
    try:
        return os.stat(os.path.join(SHM_DIR, name)).st_ino == ino
    except OSError:
        return False


def segment_of(frames: Sequence[Any]) -> str | None:
    """The segment a payload ``[stream, manifest]`` names (see serialize.route), or None."""
    if len(frames) != 2:
        return None
    try:
        return decode_manifest(frames[1]).shm
    except (ProtocolError, TypeError):  # TypeError: not a buffer
        return None


def creator(name: str) -> int | None:
    """The pid of the process that created segment ``name``, or None if it is not one of ours."""
    n = parse(name)
    return n.pid if n is not None else None


def _unowned(name: str) -> str:
    """The name a segment had before it was handed over (its owner's part stripped)."""
    return "-".join(name.split("-")[:5])


def _random_part() -> str:
    return os.urandom(8).hex()


def hand_over(name: str) -> None:
    """Just before a message naming segment ``name`` (adopted, see :meth:`Segment.adopt`) is sent:
    give the file that name, so that it lives as long as its new owner."""
    n = parse(name)
    if n is None or not n.owner:
        return
    try:
        os.rename(os.path.join(SHM_DIR, _unowned(name)), os.path.join(SHM_DIR, name))
    except OSError as exc:
        log.debug("cannot hand over %s: %s", name, exc)


def unlink(name: str) -> None:
    """Remove segment ``name`` of /dev/shm; a name not of our form (a path, say) is refused."""
    if _NAME.match(name) is None:
        log.warning("refused to unlink %r: not the name of a distfork segment", name)
        return
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass
    except OSError as exc:  # another user's (sticky /dev/shm), a read-only one: not ours to remove
        log.warning("cannot unlink shared-memory segment %s: %s", name, exc)


def attach(name: str, size: int, private: bool) -> memoryview:
    """Map a segment someone else created; writable. ``private``: our writes stay ours."""
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR if not private else os.O_RDONLY)
    try:
        flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
        mm = mmap.mmap(fd, max(size, 1), flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    if private:
        # Task arguments, which tasks read: map every page now, read-only (copy-on-write stays),
        # ~2 ms for 100 MB instead of ~3.5 ms of read faults. (MAP_POPULATE would copy every page.)
        try:
            mm.madvise(_MADV_POPULATE_READ)
        except OSError:
            pass  # a kernel before 5.14
    return memoryview(mm)


def sweep(session: str | None = None, pid: int | None = None, dead_only: bool = True) -> int:
    """Unlink garbage segments: of ``session`` only (None: of any session), of ``pid`` only (creator
    or owner), and unless not ``dead_only``, only those whose holder is gone. Returns how many.

    A segment is garbage when its owner is gone, or, before it has one, its
    creator ("gone" includes a pid now used by a process started later). A
    result segment handed to a driver outlives the worker that wrote it: the
    broker may hold it for tasks that take it as an argument. Segments of
    another Unix user are skipped (and logged once); one that vanishes
    meanwhile, or cannot be removed, is skipped: a sweep never raises.
    """
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    gone = 0
    uid = os.geteuid()
    for name in names:
        n = parse(name)
        if n is None or (session is not None and n.session != session):
            continue
        if pid is not None and pid not in (n.pid, n.owner):
            continue
        if dead_only and _alive(*n.holder):
            continue
        try:
            st = os.lstat(os.path.join(SHM_DIR, name))
            if st.st_uid != uid:
                if name not in _logged_foreign and len(_logged_foreign) < 10_000:
                    _logged_foreign.add(name)
                    log.warning("skipping shared-memory segment %s/%s: it belongs to uid %d, not to us (uid %d)",
                                SHM_DIR, name, st.st_uid, uid)
                continue
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            continue  # its owner (or another sweep) removed it meanwhile
        except OSError as exc:
            log.warning("cannot unlink shared-memory segment %s/%s: %s", SHM_DIR, name, exc)
            continue
        gone += 1
    if gone:
        log.info("swept %d shared-memory segments%s", gone, f" of session {session}" if session else "")
    return gone


def release_own() -> int:
    """Unlink the segments this process made and never handed over (it is about to exit)."""
    pid, start = _me()
    gone = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        n = parse(name)
        if n is not None and not n.owner and (n.pid, n.start) == (pid, start):
            unlink(name)
            gone += 1
    return gone


def sweep_at_exit(wait_s: float = 1.0) -> None:
    """We are about to exit: unlink what we made and never handed over, sweep, and if a process
    that owns a segment we made is dying right now (a fatal signal pending: a shutdown signalled
    it and us together), give it up to ``wait_s`` to go, then sweep again. We may be the last
    distfork process on this host."""
    release_own()
    sweep()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and _owners_dying():
        time.sleep(0.02)
        sweep()


def _owners_dying() -> bool:
    pid, start = _me()
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return False
    owners = {n.owner for name in names
              if (n := parse(name)) is not None and n.owner and (n.pid, n.start) == (pid, start)}
    return any(_dying(owner) for owner in owners)


_FATAL_BY_DEFAULT = [signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGKILL, signal.SIGUSR1,
                     signal.SIGUSR2, signal.SIGALRM, signal.SIGPIPE]


def _dying(pid: int) -> bool:
    """Whether ``pid`` has a signal pending that will end it (not caught, not ignored)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
        handled = int(fields["SigCgt"], 16) | int(fields["SigIgn"], 16)
    except (OSError, KeyError, ValueError):
        return False
    fatal = sum(1 << (sig - 1) for sig in _FATAL_BY_DEFAULT)
    return bool(pending & fatal & ~handled) or bool(pending & (1 << (signal.SIGKILL - 1)))


_KEEP_MAPPED_BYTES = 1 << 20  # handed-out segments at least this large stay mapped here (see let_go) ...
_KEEP_MAPPED_MAX = 32  # ... this many at most (each is checked at every take and let_go)


class SegmentPool:
    """Hands out segments, keeping warm (pre-touched) spares ready in the background."""

    def __init__(self, session: str, spare_bytes: int) -> None:
        self.session = session
        self.spare_bytes = spare_bytes
        self._spares: list[Segment] = []
        self._lock = threading.Lock()
        self._want = 0  # size of spare to prepare next
        self._retired = 0  # buffers this large travel by reference now: no spares that large (see retire)
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._thread: threading.Thread | None = None
        self._unmap: list[Segment] = []  # handed out: our mappings, dropped by the warmer thread
        self._returned: list[str] = []  # came back (RECYCLE), no longer mapped here: mapped again by the warmer
        # Handed out and still mapped here, by file name: reused as they are when they come back.
        self._out: dict[str, Segment] = {}

    def take(self, size: int, owner: int = 0) -> Segment:
        """A segment of at least ``size`` bytes: a warm spare if one fits, else a new one.

        ``owner``: the pid of the process it is for (see :meth:`Segment.adopt`).
        """
        with self._lock:
            seg = self._fit(size)
            returned, self._returned = (self._returned, []) if seg is None else ([], self._returned)
        for name in returned:  # none fits yet: map the ones that came back now, rather than make one
            self._reopen(name)
        with self._lock:
            if seg is None:
                seg = self._fit(size)
            if size <= self.spare_bytes and not self._closed:
                if self._retired and size >= self._retired:
                    self._retired = 0  # the argument path needs such segments again (a changed model)
                self._want = size
                self._wake.notify()
                self._start()
        if seg is None:
            seg = Segment(self.session, size)
        if owner:
            seg.adopt(owner)  # named after it at hand_over()
        return seg

    def _fit(self, size: int) -> Segment | None:
        """The smallest spare that fits ``size``, taken out of the spares (with the lock held)."""
        fit = [s for s in self._spares if size <= s.size <= 2 * size + _PAGE]
        seg = min(fit, key=lambda s: s.size) if fit else None
        if seg is not None:
            self._spares.remove(seg)
        return seg

    def _start(self) -> None:
        if self._thread is None:  # (with the lock held)
            self._thread = threading.Thread(target=self._warm, name="distfork-shm-warmer", daemon=True)
            self._thread.start()

    def let_go(self, seg: Segment) -> None:
        """``seg`` is handed over: we keep our mapping of it (1 MiB or more; the last 32, up to
        ``spare_bytes``; the others are unmapped in the background), so that
        when it comes back (:meth:`take_back`) it needs no new mapping (populating 100 MB: ~2 ms),
        and no unmapping now (2-5 ms); mappings of segments gone meanwhile are dropped by :meth:`prune`."""
        with self._lock:
            if not self._closed:
                self._prune()
                if seg.size >= _KEEP_MAPPED_BYTES:
                    self._out[seg.file] = seg
                else:
                    self._unmap.append(seg)  # small: mapping it again costs little
                while len(self._out) > _KEEP_MAPPED_MAX or sum(s.size for s in self._out.values()) > self.spare_bytes:
                    self._unmap.append(self._out.pop(next(iter(self._out))))  # the oldest
                if self._unmap:
                    self._wake.notify()
                    self._start()
                return
        seg.release()

    def prune(self) -> None:
        """Drop our mappings of handed-out segments that their owner unlinked (call now and then:
        our mapping keeps their memory)."""
        with self._lock:
            self._prune()

    def _prune(self) -> None:
        gone = [f for f, seg in self._out.items() if not (_is(seg.name, seg.ino) or _is(seg.file, seg.ino))]
        for f in gone:
            self._unmap.append(self._out.pop(f))
        if gone:
            self._wake.notify()
            self._start()

    def _warm(self) -> None:
        with self._lock:
            while not self._closed:
                if self._unmap:
                    unmap, self._unmap = self._unmap, []
                    self._lock.release()
                    try:
                        for handed in unmap:
                            handed.release()
                    finally:
                        self._lock.acquire()
                    continue
                if self._returned:
                    returned, self._returned = self._returned, []
                    self._lock.release()
                    try:
                        for name in returned:
                            self._reopen(name)
                    finally:
                        self._lock.acquire()
                    continue
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
                elif self._closed or (self._retired and seg.size >= self._retired):
                    seg.release()
                    seg.unlink()
                else:
                    self._spares.append(seg)

    def take_back(self, name: str) -> None:
        """A segment we handed out as a result comes back unmapped by its receiver: keep it warm.

        The warmer thread maps it again (populated: 2-10 ms for 100 MB), not
        the slot thread about to run the next task; :meth:`take` does it at
        once if it needs it first.
        """
        with self._lock:
            kept = self._out.pop(_unowned(name), None) if not self._closed else None
            if kept is None and not self._closed:
                self._returned.append(name)
                self._wake.notify()
                self._start()
                return
        if kept is None:
            unlink(name)
            return
        # Still mapped here: ours again once it has its own name back, if it is still the file we map.
        base = kept.file
        try:
            if name != base:
                os.rename(os.path.join(SHM_DIR, name), os.path.join(SHM_DIR, base))
            same = _is(base, kept.ino)
        except OSError as exc:
            log.debug("cannot take back %s: %s", name, exc)
            same = False
        if not same:  # gone, or replaced by another file: not a segment we can hand out again
            unlink(base)
            kept.release()
            return
        kept.name = base
        self.recycle(kept)

    def _reopen(self, name: str) -> None:
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
            if not self._closed and sum(s.size for s in self._spares) + seg.size <= self.spare_bytes \
                    and not (self._retired and seg.size >= self._retired):
                self._spares.append(seg)
                return
        seg.release()
        seg.unlink()

    def retire(self, size: int) -> Segment | None:
        """Buffers of ``size`` bytes and more travel by reference now (a parameter forked again unchanged:
        distfork/shared.py): drop the warm spares that large, warm none until a :meth:`take` of that size
        again, and return the best fitting one (warm, so a copy into it runs at memory speed), or None.

        Kept, those spares would be copies of the weights that no fork uses any more.
        """
        with self._lock:
            self._want = 0
            self._retired = size if not self._retired else min(self._retired, size)
            big = [s for s in self._spares if s.size >= size]
            self._spares = [s for s in self._spares if s.size < size]
        fit = [s for s in big if s.size <= size + size // 8 + _PAGE]  # not much bigger: it stays that size
        keep = min(fit, key=lambda s: s.size) if fit else None
        for seg in big:
            if seg is not keep:
                seg.release()
                seg.unlink()
        return keep

    def close(self) -> None:
        """Unlink every spare; segments already handed out are their owners' business."""
        with self._lock:
            self._closed = True
            self._wake.notify()
            spares, self._spares = self._spares, []
            unmap, self._unmap = [*self._unmap, *self._out.values()], []
            self._out.clear()
            returned, self._returned = self._returned, []
        for name in returned:
            unlink(name)
        for seg in unmap:
            seg.release()
        for seg in spares:
            seg.release()
            seg.unlink()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"spares": len(self._spares), "spare_bytes": sum(s.size for s in self._spares),
                    "largest": max((s.size for s in self._spares), default=0)}
