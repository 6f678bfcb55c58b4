"""``distfork.trace()``: record every fork, where and when its task ran, and what it waited for.

::

    driver process                     broker                            worker process
    fork() ─ (name, submit): ─ SUBMIT+TRACE ─▶ Task(submitted, ─ TASKS+TRACE ─▶ slot: started,
      │      one number (Pending)               dispatched)                finished, bytes in/out,
      │                                                                    forks made (JSON)
      │                                    take_notes: its head  ◀── RESULTS ─── [notes entry, results...]
      │                                    + the worker's fields
      ▼                                    (one pack each)
          ◀── RESULTS [notes entry (id 0, Flag.TRACE), results...] ──
    notes_of (a _Batch: the notes, one bytes), finish (two appends) ─▶ Trace: a ring of batches ─▶
                                                  tasks() (splits the notes), graph, save() (Chrome), report()

Only tasks forked inside a ``with distfork.trace()`` block (or inside a task
that was) carry ``Flag.TRACE``: the broker and the worker add timings to
those alone, and an untraced fork pays one module-level flag check
(``ACTIVE``). A task that forks while it runs collects the Records of its
forks in a thread-local scope; they travel to the driver inside its own
trace note, so a nested run arrives as one tree.

Clocks: every process stamps wall-clock time (``time.time()``). On one host
that is one clock. Across hosts, a receiver checks the remote stamps against
its own for the same task (a worker cannot start a task before the broker
sent it, nor finish after the broker got the result); when they contradict
causality, it shifts the remote clock to the midpoint of the round trip (as
NTP does), per task, down the tree.

Memory: a trace keeps at most ``capacity`` finished top-level forks (a
ring of plain tuples; the oldest drop out and are counted in
``Trace.dropped``), plus the unfinished ones (bounded by the driver's
window).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import os
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ProtocolError, RemoteTraceback
from .protocol import (
    TRACE_PATHS,
    WORKER_NOTE_BYTES,
    Flag,
    ResultEntry,
    Status,
    TaskEntry,
    decode_driver_note,
    driver_note_packer,
    encode_framed_worker_note,
    fixed_driver_note_packer,
    fixed_worker_notes,
    framed_worker_note_packer,
    split_notes,
)
from .protocol import notes_entry as protocol_notes_entry

if TYPE_CHECKING:
    from .broker_state import PeerInfo

__all__ = ["ACTIVE", "DRIVERS", "Pending", "Record", "TaskInfo", "Trace", "trace"]

#: True while this process has an open trace or runs a traced task: the only check an untraced fork pays.
ACTIVE = False

log = logging.getLogger(__name__)

_lock = threading.Lock()
_tracers: list[Trace] = []
_tracers_now: tuple[Trace, ...] = ()  # the same, as begin() reads it (no copy per fork)
_scoped = False  # a traced task ran in this process (a worker): its forks may be traced from now on
_entered = 0  # scopes open now elsewhere (a task reclaimed or run inline, a fork from a callback)
_records = False  # a fork in a scope made a Record in this process: its note is parsed when it arrives
# The traces open at each moment, as weak references, under a number a driver's fork carries
# (``_group``: the traces open now). A number, not the traces: a tuple of plain values is left
# alone by the garbage collector, which an unfinished fork's record should be (see begin).
_groups: dict[int, tuple[weakref.ref[Trace], ...]] = {}
_group = 0
_group_numbers = itertools.count(1)
#: The drivers of this process: a trace finds its unfinished forks in their ``_traced``.
DRIVERS: weakref.WeakSet[Any] = weakref.WeakSet()


class _Local(threading.local):
    """Per thread: ``scope``, the list the forks of this thread's running traced task go to.

    A class default, not ``getattr(local, "scope", None)``: a miss on a plain
    ``threading.local`` raises and catches AttributeError inside getattr, which
    cost a third of a microsecond on every traced fork.
    """

    scope: list[Record] | None = None


_local = _Local()
# ``_local.scope`` while a worker's traced task runs and has forked nothing yet (open_task): its
# first fork makes its own list (most tasks fork nothing, and pay for no list). Never appended to.
_LAZY: list[Record] = []

_STATUS = {int(s): s.name.lower() for s in Status}
_HELD = int(Flag.HELD)
_NO_ERROR = frozenset({int(Status.OK), int(Status.CANCELLED)})
_NO_CHILDREN: list[Record] = []  # shared: never appended to (Record.kids())
_NO_DEPS: list[str] = []  # shared: never appended to


def _refresh() -> None:
    global ACTIVE, _tracers_now, _group
    now = tuple(_tracers)
    if now != _tracers_now:
        _tracers_now = now
        for k in [k for k, refs in _groups.items() if all(r() is None for r in refs)]:
            del _groups[k]  # every trace of it is gone: nobody can read what it would get
        for k in [k for k, (_, g) in _kinds.items() if g not in _groups]:
            del _kinds[k]
        _kind_ids.clear()
        _group = 0
        if now:
            _group = next(_group_numbers)
            _groups[_group] = tuple(weakref.ref(t) for t in now)
    ACTIVE = bool(_tracers) or _scoped or _entered > 0


class Record:
    """One fork as this process saw it, with what the broker and worker reported (times: this clock)."""

    __slots__ = ("gid", "aliases", "func", "deps", "submit", "done", "start", "end", "where", "status", "held",
                 "note", "remote", "children", "error", "sinks")

    def __init__(self, func: str, deps: list[str], submit: float) -> None:
        self.gid = ""  # driver name # task id, once submitted
        self.aliases: tuple[str, ...] = ()  # earlier gids: sent again under a new id (the broker asked: RESUBMIT)
        self.func = func
        self.deps = deps  # gids of the futures among its arguments (shared empty list when none)
        self.submit = submit
        self.done = 0.0  # when its result (or notice) arrived here
        self.start = 0.0  # set when it ran in this process (inline mode, or reclaimed by a waiting task)
        self.end = 0.0
        self.where = ""  # "", "inline" or "reclaimed"
        self.status = "pending"
        self.held = False
        # [worker, host, pid, b_recv, b_disp, b_ret, losses, w_recv, w_start, w_end, in_b, in_path, out_b, out_path]
        self.remote: tuple[Any, ...] | None = None
        self.note: bytes | None = None  # the broker's trace note, parsed into remote and children when asked
        # Forks made while its task ran. Tuples and one shared empty list keep a million records cheap
        # for the garbage collector; a record that gets children gets its own list (kids()).
        self.children: list[Record] = _NO_CHILDREN
        self.error = ""
        self.sinks: tuple[Trace, ...] = ()  # the traces to hand it to, frozen, when it finishes

    def bind(self, driver_name: str, task_id: int) -> None:
        if self.gid:
            self.aliases += (self.gid,)
        self.gid = f"{driver_name}#{task_id}"

    def kids(self) -> list[Record]:
        """Its children list, to add to."""
        if self.children is _NO_CHILDREN:
            self.children = []
        return self.children

    def finish(self, code: int, flags: int, fut: Any) -> None:
        """Its result arrived (I/O thread), after the future was completed."""
        self.done = time.time()
        self.status = _STATUS.get(code) or str(code)
        self.held = bool(flags & _HELD)  # plain ints: an IntFlag's & and IntEnum's == run Python code
        if code not in _NO_ERROR:
            self.error = _error_text(fut)
        sinks = self.sinks
        if sinks:
            self.sinks = ()
            frozen = self.freeze()
            for t in sinks:
                t._finished(self, frozen)

    def freeze(self) -> tuple[Any, ...]:
        """Its fields as a tuple of plain values (the garbage collector stops scanning such tuples)."""
        return (self.gid, self.aliases, self.func, tuple(self.deps), self.submit, self.done, self.start, self.end,
                self.where, self.status, self.held, self.note, self.remote,
                tuple([c.freeze() for c in self.children]) if self.children else (), self.error)

    @classmethod
    def thaw(cls, t: tuple[Any, ...]) -> Record:
        rec = cls(t[2], list(t[3]), t[4])
        (rec.gid, rec.aliases, rec.done, rec.start, rec.end, rec.where, rec.status, rec.held, rec.note, rec.remote,
         rec.error) = (t[0], t[1], *t[5:13], t[14])
        if t[13]:
            rec.children = [cls.thaw(c) for c in t[13]]
        return rec

    def resolve(self) -> None:
        """Parse the trace note that arrived with its result (kept as bytes until needed: cheap on the
        I/O thread, and bytes are nothing for the garbage collector to scan)."""
        note, self.note = self.note, None
        if note is not None:
            _parse_note(self, note)

    def to_json(self) -> dict[str, Any]:
        try:
            self.resolve()
        except ProtocolError as exc:  # a nested task's malformed note: leave it out, keep the record
            log.warning("dropped a malformed trace note: %s", exc)
        return {"g": self.gid, "f": self.func, "d": self.deps, "s": self.submit, "e": self.done, "a": self.start,
                "b": self.end, "w": self.where, "o": self.status, "h": self.held, "r": self.remote,
                "c": [c.to_json() for c in self.children], "x": self.error}

    @classmethod
    def from_json(cls, d: Any, depth: int = 0) -> Record:
        if not isinstance(d, dict) or depth > 200:
            raise TypeError("a trace record must be an object")
        rec = cls(str(d["f"]), [str(x) for x in d["d"]], float(d["s"]))
        rec.gid, rec.done, rec.start, rec.end = str(d["g"]), float(d["e"]), float(d["a"]), float(d["b"])
        rec.where, rec.status, rec.held, rec.error = str(d["w"]), str(d["o"]), bool(d["h"]), str(d["x"])
        remote = d["r"]
        rec.remote = _remote_row(remote) if remote is not None else None
        kids = [cls.from_json(c, depth + 1) for c in d["c"]]
        if kids:
            rec.children = kids
        return rec


def _remote_row(row: Any) -> tuple[Any, ...]:  # from JSON: a nested record's
    if not isinstance(row, list) or len(row) != 14:
        raise TypeError("a remote trace row has 14 fields")
    return (str(row[0]), str(row[1]), int(row[2]), *(float(x) for x in row[3:6]), int(row[6]),
            *(float(x) for x in row[7:10]), int(row[10]), str(row[11]), int(row[12]), str(row[13]))


def _error_text(fut: Any) -> str:
    try:
        exc = fut.exception(0)
    except BaseException as err:  # noqa: BLE001 - cancelled, or not done: say so
        return f"{type(err).__name__}: {err}"
    if exc is None:
        return ""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        text = f"{cause.tb.rstrip()}\n{text}"
    return text


def _name_of(func: Any) -> str:
    name = getattr(func, "__qualname__", None) or type(func).__qualname__
    return str(name)


def _gid_of(fut: Any) -> str | None:
    driver = getattr(fut, "driver", None)
    task_id: int = getattr(fut, "task_id", 0)
    if driver is not None and task_id:
        return f"{driver.name}#{task_id}"
    return getattr(fut, "_trace_gid", None)


@functools.cache
def _future_class() -> type:
    from .future import Future  # not at import: future.py imports the driver's side

    return Future


def _deps_of(args: Sequence[Any], kwargs: dict[str, Any]) -> list[str]:
    if not args and not kwargs:
        return _NO_DEPS
    Future = _future_class()

    out: list[str] = []

    def look(x: Any, depth: int) -> None:
        if isinstance(x, Future):
            gid = _gid_of(x)
            if gid is not None:
                out.append(gid)
        elif depth < 2 and isinstance(x, (list, tuple)) and len(x) <= 1000:
            for y in x:
                look(y, depth + 1)
        elif depth < 2 and isinstance(x, dict) and len(x) <= 1000:
            for y in x.values():
                look(y, depth + 1)

    for a in args:
        look(a, 0)
    for a in kwargs.values():
        look(a, 0)
    return out or _NO_DEPS


# -- hooks called by api.py, driver.py, worker.py and broker.py --------------------------------------------


#: What a driver keeps of a traced fork until its result arrives: a :class:`Record`, or, for a fork of
#: an open trace (not of a task's scope) that a driver sends, the tuple ``(function name, dependency
#: gids, submit time, group, earlier task ids)``: plain values, which the garbage collector stops
#: scanning, made in a tenth of a Record's time; :func:`finish` turns it into a ring entry. Mostly
#: (no futures among its arguments, not sent again) not even a tuple but one ``complex``: its submit
#: time and, as its imaginary part, the number of its (function name, group) in ``_kinds``. A tuple
#: is a container the collector tracks until its next collection: one more per fork in flight made
#: the driver's collections cost ~1.4 µs more per traced fork; a number is never tracked.
Pending = Record | tuple[Any, ...] | complex

# (function name, group) of the forks that a complex Pending stands for, by number; ``_kind_ids``:
# the numbers of the current group's, by name (emptied when the group changes). Pruned with _groups.
_kinds: dict[int, tuple[str, int]] = {}
_kind_ids: dict[str, int] = {}
_kind_numbers = itertools.count(1)


def _kind(name: str) -> int:
    """The number of ``name`` forked under the traces open now (made once per name and group)."""
    with _lock:
        kid = _kind_ids.get(name)
        if kid is None:
            kid = next(_kind_numbers)
            _kinds[kid] = (name, _group)
            _kind_ids[name] = kid
    return kid


def _expand(p: tuple[Any, ...] | complex) -> tuple[Any, ...] | None:
    """A driver's Pending as its tuple (None: a number whose traces are all gone)."""
    if isinstance(p, complex):
        kind = _kinds.get(int(p.imag))
        return None if kind is None else (kind[0], (), p.real, kind[1], ())
    return p


def begin(func: Any, args: Sequence[Any], kwargs: dict[str, Any], light: bool = False) -> Pending | None:
    """A fork is about to be submitted: its Record, if a trace wants it (call only when ``ACTIVE``).

    ``light`` (a driver will send it): a fork of the open traces gets a :data:`Pending` tuple instead.
    """
    global _records
    # A thread has a scope only in a process that ran a traced task or entered one: not a driver's.
    scope = _local.scope if _scoped or _entered else None
    if scope is _LAZY:  # the first fork of a worker's traced task: its scope, now
        scope = _local.scope = []
    if scope is None:
        if not _tracers:
            return None
        if light:  # (_name_of inlined: a call is a tenth of this path)
            name = str(getattr(func, "__qualname__", None) or type(func).__qualname__)
            if args or kwargs:
                deps = _deps_of(args, kwargs)
                if deps:
                    return (name, tuple(deps), time.time(), _group, ())
            kid = _kind_ids.get(name)
            return complex(time.time(), _kind(name) if kid is None else kid)
    rec = Record(_name_of(func), _deps_of(args, kwargs), time.time())
    if scope is not None:
        _records = True
        scope.append(rec)
    elif len(_tracers_now) == 1:  # the usual case, without a call per trace (Trace._add inlined)
        t = _tracers_now[0]
        rec.sinks = t._me
        t._pending.add(rec)
    else:
        for t in _tracers_now:
            t._add(rec)
    return rec


def capture() -> list[Record] | None:
    """The scope of the running traced task in this thread (to fork into it from a callback later)."""
    if not ACTIVE:
        return None
    scope = _local.scope
    if scope is _LAZY:
        scope = _local.scope = []
    return scope


def open_task() -> None:
    """A worker's traced task starts in this thread: the forks it makes are its children (recorded
    from its first fork on: most tasks fork nothing, and pay no scope). The process keeps ``ACTIVE``
    on from then on, which costs its untraced forks one lookup. :func:`close_task` when it returns."""
    global ACTIVE, _scoped
    _local.scope = _LAZY
    _scoped = ACTIVE = True


def close_task(key: int, started: float, finished: float, frames_in: Sequence[Any],
               frames_out: Sequence[Any]) -> bytes:
    """The traced task ``key`` that :func:`open_task` began returned: its trace note, with its head.

    ``started``, ``finished``: the worker's ``time.perf_counter()`` stamps
    of its run (turned into wall-clock time here, with an offset that
    :func:`notes_entry` refreshes once a batch)."""
    kids = _local.scope
    _local.scope = None
    wall = _wall
    if kids is _LAZY or kids is None:
        if len(frames_in) == 1 and len(frames_out) == 1:  # mostly: one pack, no more calls
            return _PACK_NOTE(key, _NOTE_SIZE, started + wall, finished + wall, len(frames_in[0]),
                              len(frames_out[0]), 1, 1)
        kids = _NO_CHILDREN
    return worker_note(key, started + wall, finished + wall, frames_in, frames_out, kids)


def notes_entry(notes: Sequence[bytes]) -> ResultEntry:
    """A worker's notes, joined into the entry that goes first in its RESULTS batch."""
    global _wall
    _wall = time.time() - time.perf_counter()  # for the next notes: the wall clock may have been set
    return protocol_notes_entry(notes)


_wall = time.time() - time.perf_counter()  # what to add to a worker's perf_counter() stamps: wall-clock


def enter(scope: list[Record], sticky: bool = True) -> list[Record] | None:
    """Forks made in this thread go to ``scope`` until :func:`leave` (given what this returned).

    ``sticky`` (a worker's slot, on its hot path): no lock; the process
    keeps ``ACTIVE`` on from then on, which costs its untraced forks one
    lookup. Otherwise (a driver) ``ACTIVE`` goes off again with the last scope.
    """
    global ACTIVE, _scoped, _entered
    prev = _local.scope
    _local.scope = scope
    if sticky:
        _scoped = ACTIVE = True
    else:
        with _lock:
            _entered += 1
            _refresh()
    return prev


def leave(prev: list[Record] | None, sticky: bool = True) -> None:
    global _entered
    _local.scope = prev
    if not sticky:
        with _lock:
            _entered -= 1
            _refresh()


@contextlib.contextmanager
def scoped(scope: list[Record] | None) -> Iterator[None]:
    """Forks made in this thread inside the block go to ``scope`` (None: nothing changes)."""
    if scope is None:
        yield
        return
    prev = enter(scope, sticky=False)
    try:
        yield
    finally:
        leave(prev, sticky=False)


@contextlib.contextmanager
def run_here(rec: Pending | None, where: str) -> Iterator[None]:
    """A traced task runs in this thread (inline mode, or reclaimed by a waiting task).

    A :data:`Pending` tuple or number (a worker's own trace: rare) records no run times.
    """
    if rec is None or not isinstance(rec, Record):
        yield
        return
    rec.where = where
    rec.start = time.time()
    try:
        with scoped(rec.kids()):
            yield
    finally:
        rec.end = rec.done = time.time()


def payload(frames: Sequence[Any]) -> tuple[int, int]:
    """Bytes of a payload and the path it took (an index of ``TRACE_PATHS``), from its frame layout."""
    n = len(frames)
    if n == 1:
        return len(frames[0]), 1
    if n == 2:  # the buffers' bytes are in the shared-memory manifest
        from .metrics import classify

        return sum(classify([TaskEntry(0, 0, 0.0, frames)])[0]), 2
    return sum(map(len, frames)), 3 if n else 0


def worker_note(key: int, start: float, end: float, frames_in: Sequence[Any], frames_out: Sequence[Any],
                children: list[Record]) -> bytes:
    """What a worker reports of traced task ``key`` it ran (wall-clock times), with its head: one of
    the notes that go first in its next RESULTS (:func:`notes_entry`)."""
    if not children and len(frames_in) == 1 and len(frames_out) == 1:  # mostly: one pack, no more calls
        return _PACK_NOTE(key, _NOTE_SIZE, start, end, len(frames_in[0]), len(frames_out[0]), 1, 1)
    in_b, in_path = payload(frames_in)
    out_b, out_path = payload(frames_out)
    kids = json.dumps([c.to_json() for c in children], separators=(",", ":")).encode() if children else b""
    return encode_framed_worker_note(key, start, end, in_b, out_b, in_path, out_path, kids)


_PACK_NOTE, _NOTE_SIZE = framed_worker_note_packer()


def take_notes(worker: PeerInfo, entries: list[ResultEntry], now: float) -> list[ResultEntry]:
    """The broker's part, on RESULTS from a worker: take the batch's trace notes off and leave on each
    traced task the note for its driver (``Task.note``), with the broker's times and the worker's name.

    ``now`` and the task's times are monotonic; they go out as wall-clock. A
    batch without notes costs one test. Malformed notes are dropped (and
    logged); the results they came with go on as usual.
    """
    if not entries or entries[0].id != 0 or not entries[0].flags & Flag.TRACE:
        return entries
    head = entries[0]
    try:
        if len(head.frames) != 1:
            raise ProtocolError(f"trace notes in {len(head.frames)} frames, expected 1")
        fixed = fixed_worker_notes(head.frames[0], head.pid)
        notes = split_notes(head.frames[0]) if fixed is None else []
    except ProtocolError as exc:
        log.warning("dropped the trace notes of a RESULTS batch from %s: %s", worker.info.get("name"), exc)
        return entries[1:]
    info = worker.info
    who = _who_json(str(info.get("name")), str(info.get("host")), info.get("pid"))
    wall = time.time() - time.monotonic()
    back = now + wall  # the broker's stamps of the batch: once, not once per note
    n_who = len(who)
    assigned = worker.assigned
    if fixed is not None:  # no note carries nested records: each driver note is one pack, from one C loop
        fpack, fsize = fixed_driver_note_packer(n_who)
        for key, _, start, end, in_b, out_b, in_p, out_p in fixed:
            task = assigned.get(key)
            if task is not None and task.trace:
                losses = task.losses
                task.note = fpack(task.task_id, fsize, task.submitted + wall, task.dispatched + wall, back,
                                  losses if losses < 65535 else 65535, n_who, who, start, end, in_b, out_b, in_p,
                                  out_p)
        return entries[1:]
    pack, size = _DRIVER_NOTE
    size += n_who
    for key, note in notes:
        task = assigned.get(key)
        if task is not None and task.trace:
            if note.nbytes < WORKER_NOTE_BYTES:  # the rest of the worker's note is the driver's to check
                log.warning("dropped a trace note of %d bytes from %s", note.nbytes, info.get("name"))
                continue
            # The worker's note goes on as it came (no unpacking and packing it again), behind a head
            # that names the driver's task: the broker's notes entry for the driver is then one join.
            task.note = pack(task.task_id, size + note.nbytes, task.submitted + wall, task.dispatched + wall, back,
                             min(task.losses, 65535), n_who) + who + note
    return entries[1:]


_DRIVER_NOTE = driver_note_packer()


@functools.lru_cache(maxsize=1024)
def _who_json(name: str, host: str, pid: Any) -> bytes:
    """The JSON naming a worker in its tasks' notes: made once per worker, not once per RESULTS batch."""
    return json.dumps({"name": name[:1000], "host": host[:1000], "pid": pid}).encode()[:65535]


def note_received(rec: Record | None, frame: Any) -> None:
    """The driver's part: what the broker and worker said of one of our traced tasks (parsed later)."""
    if rec is not None:
        rec.note = bytes(frame)


class _Batch:
    """The traced results of one RESULTS message, as a driver's I/O thread finishes them: their notes
    as one bytes object, when they arrived, and, for each fork of one group of traces that ended
    well, its task id and its :data:`Pending` tuple (two appends per fork: :func:`finish`). The
    traces of that group keep it as one ring entry (``Trace._batch``) and split it when read."""

    __slots__ = ("blob", "done", "driver", "flags", "group", "ids", "kind", "recs")

    def __init__(self, blob: bytes, done: float) -> None:
        self.blob = blob
        self.done = done
        self.driver = ""
        self.group = -1  # not yet handed to the traces of a group (open)
        self.kind = -1.0  # the kind number (imaginary part) of a complex Pending of that group
        self.ids: list[int] = []
        self.recs: list[tuple[Any, ...] | complex] = []
        self.flags: dict[int, int] | None = None  # nonzero result flags (HELD), by task id

    def open(self, group: int, driver: str) -> bool:
        """Its first fork, of traces ``group``: into their rings. False if it went to another group."""
        if self.group != -1:
            return False
        self.group, self.driver = group, driver
        for ref in _groups.get(group, ()):
            t = ref()
            if t is not None:
                t._batch(self)
        return True

    def sliced(self, cut: int) -> _Batch:
        """A copy without its first ``cut`` forks (a ring that is full drops them)."""
        b = _Batch(self.blob, self.done)
        b.driver, b.group, b.flags, b.ids, b.recs = self.driver, self.group, self.flags, self.ids[cut:], self.recs[cut:]
        return b

    def entries(self) -> list[tuple[Any, ...]]:
        """Its forks as :func:`finish`'s per-fork ring tuples."""
        flags = self.flags or {}
        out = []
        for task_id, pending in zip(list(self.ids), list(self.recs), strict=False):  # one half added: left
            p = _expand(pending)
            if p is not None:
                out.append((self.driver, task_id, p[4], p[0], p[1], p[2], self.done, 0, flags.get(task_id, 0), "",
                            self.blob))
        return out


def notes_of(entries: Sequence[ResultEntry], traced: dict[int, Pending]) -> tuple[_Batch | None, Sequence[ResultEntry]]:
    """The driver's I/O thread, on RESULTS that start with trace notes: (the notes, as a
    :class:`_Batch` that collects the batch's traced forks, the results).

    The notes stay as they came, one bytes object per batch, which the batch's forks share
    (:func:`finish`); a trace splits them when it is read. Only Records (forks made in a traced
    task's scope, in a worker process) take their own note now.
    """
    frames = entries[0].frames
    blob = bytes(frames[0]) if len(frames) == 1 else None
    if _records and traced and blob is not None:
        try:
            notes = split_notes(blob)
        except ProtocolError as exc:  # the results still count
            log.warning("dropped the trace notes of a message from the broker: %s", exc)
            notes = []
        for task_id, note in notes:
            rec = traced.get(task_id)
            if isinstance(rec, Record):
                rec.note = bytes(note)
    return (None if blob is None else _Batch(blob, time.time())), entries[1:]


def again(rec: Pending, task_id: int) -> Pending:
    """A traced fork the driver sends again (RESUBMIT): it keeps ``task_id`` as an earlier id."""
    if isinstance(rec, Record):
        return rec  # Record.bind keeps its earlier gid
    p = _expand(rec)
    return rec if p is None else (*p[:4], (*p[4], task_id))


def finish(rec: Pending, code: int, flags: int, fut: Any, driver: str, task_id: int,
           notes: _Batch | bytes | None = None) -> None:
    """A traced fork's result (or cancel) arrived (the driver's I/O thread, after its future completed):
    into the ring of each trace open when it was forked, as one tuple of plain values, or, mostly,
    as two appends to the batch it came with.

    ``notes``: the trace notes of the message its result came with (:func:`notes_of`).
    """
    if isinstance(notes, _Batch):
        if code == 0 and isinstance(rec, complex) and rec.imag == notes.kind:  # mostly: as the one before
            notes.ids.append(task_id)
            notes.recs.append(rec)
            if flags:
                if notes.flags is None:
                    notes.flags = {}
                notes.flags[task_id] = flags
            return
        if code == 0 and not isinstance(rec, Record):
            if isinstance(rec, complex):
                kind = _kinds.get(int(rec.imag))
                group = -2 if kind is None else kind[1]  # -2: its traces are all gone
                if group >= 0 and (group == notes.group or notes.group == -1):
                    notes.kind = rec.imag
            else:
                group = rec[3]
            if group == notes.group or (group >= 0 and notes.open(group, driver)):
                notes.ids.append(task_id)
                notes.recs.append(rec)
                if flags:
                    if notes.flags is None:
                        notes.flags = {}
                    notes.flags[task_id] = flags
                return
        notes = notes.blob
    if isinstance(rec, Record):
        rec.finish(code, flags, fut)
        return
    p = _expand(rec)
    if p is None:
        return
    func, deps, submit, group, aliases = p
    frozen = (driver, task_id, aliases, func, deps, submit, time.time(), code, flags,
              "" if code in _NO_ERROR else _error_text(fut), notes)
    for ref in _groups.get(group, ()):
        t = ref()
        if t is not None:
            t._keep(frozen)


def _parse_note(rec: Record, note: bytes) -> None:
    fields, who_json, kids = decode_driver_note(note)
    try:
        who = _who(bytes(who_json))
        b_recv, b_disp, b_ret, losses, w_start, w_end, in_b, out_b, in_p, out_p = fields
        # (the row's worker-received field, kept for saved traces, is its start: the worker stamps no more)
        rec.remote = (*who, b_recv, b_disp, b_ret, losses, w_start, w_start, w_end, in_b, _path(in_p), out_b,
                      _path(out_p))
        if kids:
            children = json.loads(bytes(kids))
            if not isinstance(children, list):
                raise TypeError("nested records must be a list")
            rec.kids().extend(Record.from_json(c) for c in children)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as exc:
        raise ProtocolError(f"bad trace note: {exc!r}") from None


@functools.lru_cache(maxsize=256)
def _who(raw: bytes) -> tuple[str, str, int]:
    """(name, host, pid) of a worker from a note's JSON; the same few workers ran most tasks."""
    who = json.loads(raw)
    return str(who["name"]), str(who["host"]), int(who["pid"] or 0)


def _path(i: int) -> str:
    return TRACE_PATHS[i] if i < len(TRACE_PATHS) else "?"


# -- the user's side ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class TaskInfo:
    """One traced task, times in seconds since the trace started (the tracing process's clock)."""

    id: int  # 1, 2, ... in the order of forks (parents before their children)
    func: str
    parent: int | None  # the task that forked it (None: the driver)
    deps: list[int]  # tasks whose futures it took as arguments
    submitted: float  # fork() returned
    dispatched: float | None  # the broker handed it to a worker
    started: float | None  # the function was called
    finished: float | None  # the function returned
    done: float | None  # its result reached the process that forked it
    worker: str  # worker slot name ("" if unknown; "inline"; a reclaimed child: its parent's worker)
    host: str
    pid: int
    run_s: float | None
    bytes_in: int
    path_in: str
    bytes_out: int
    path_out: str  # inline / shm / frames / held (kept in the broker for the tasks that take it)
    retries: int
    status: str  # ok, raised, lost, cancelled, timed_out, failed, pending
    error: str  # the failure with its remote traceback
    where: str  # "" (a worker), "inline", "reclaimed" (run by the task that waited for it)

    @property
    def queued_s(self) -> float | None:
        return None if self.started is None else self.started - self.submitted


class Trace:
    """What ``distfork.trace()`` returns: the forks made while it was open."""

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is None:
            from .config import load

            capacity = load().trace_capacity
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: a trace keeps at least one fork")
        self.capacity = capacity
        # Finished forks, frozen (Record.freeze, finish's tuples) or a batch of them (_Batch), in the
        # order they finished, ``_kept`` forks in all (and those of ``_open``, the batch that may still
        # grow); unfinished ones apart.
        self._done: deque[tuple[Any, ...] | _Batch] = deque()
        self._kept = 0
        self._open: _Batch | None = None
        self._pending: set[Record] = set()
        self._me = (self,)
        self.dropped = 0
        self.bad_notes = 0
        self.started = time.time()
        self.stopped: float | None = None

    def _add(self, rec: Record) -> None:
        rec.sinks = self._me if not rec.sinks else (*rec.sinks, self)
        self._pending.add(rec)

    def _finished(self, rec: Record, frozen: tuple[Any, ...]) -> None:
        self._pending.discard(rec)
        self._keep(frozen)

    def _keep(self, entry: tuple[Any, ...]) -> None:
        """One finished fork into the ring."""
        self._settle()
        self._done.append(entry)
        self._kept += 1
        self._trim()

    def _batch(self, batch: _Batch) -> None:
        """A batch of finished forks into the ring: it grows until the next entry comes."""
        self._settle()
        self._done.append(batch)
        self._open = batch

    def _settle(self) -> None:
        batch = self._open
        if batch is not None:
            self._open = None
            self._kept += len(batch.ids)
            self._trim()

    def _trim(self) -> None:
        """The oldest forks drop out (counted) while more than ``capacity`` are kept."""
        done = self._done
        while self._kept > self.capacity:
            first = done[0]
            over = self._kept - self.capacity
            if isinstance(first, _Batch) and len(first.ids) > over:  # a batch, partly
                done[0] = first.sliced(over)
                n = over
            else:
                done.popleft()
                n = len(first.ids) if isinstance(first, _Batch) else 1
            self._kept -= n
            self.dropped += n

    def __enter__(self) -> Trace:
        self.started = time.time()
        with _lock:
            _tracers.append(self)
            _refresh()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop recording new forks (tasks already forked still report when they finish)."""
        with _lock:
            if self in _tracers:
                _tracers.remove(self)
            _refresh()
        self.stopped = time.time()

    def __len__(self) -> int:
        return len(self.tasks())

    def tasks(self) -> list[TaskInfo]:
        """Every recorded task, parents before children, times aligned to this process's clock."""
        out: list[TaskInfo] = []
        ids: dict[str, int] = {}
        pending_deps: list[tuple[TaskInfo, list[str]]] = []
        split: dict[int, dict[int, memoryview]] = {}
        records = [self._thaw(e, split) for t in list(self._done)
                   for e in (t.entries() if isinstance(t, _Batch) else (t,))]
        records += list(self._pending.copy()) + self._unfinished()
        records.sort(key=lambda r: r.submit)
        for rec in records:
            self._flatten(rec, 0.0, None, None, out, ids, pending_deps)
        if self.bad_notes:
            log.warning("%d trace notes were malformed and left out", self.bad_notes)
        for info, gids in pending_deps:
            info.deps = [ids[g] for g in gids if g in ids]
        return out

    def _thaw(self, t: tuple[Any, ...], split: dict[int, dict[int, memoryview]]) -> Record:
        """A ring entry as a Record: from :meth:`Record.freeze`, or from :func:`finish` (whose trace
        note is found in its batch's notes, split once per batch, in ``split``)."""
        if len(t) != 11:
            return Record.thaw(t)
        driver, task_id, aliases, func, deps, submit, done, code, flags, error, notes = t
        rec = Record(func, list(deps), submit)
        rec.gid = f"{driver}#{task_id}"
        if aliases:
            rec.aliases = tuple(f"{driver}#{a}" for a in aliases)
        rec.done, rec.status, rec.held, rec.error = done, _STATUS.get(code) or str(code), bool(flags & _HELD), error
        if notes is not None:
            found = split.get(id(notes))
            if found is None:
                try:
                    found = dict(split_notes(notes))
                except ProtocolError:
                    self.bad_notes += 1
                    found = {}
                split[id(notes)] = found  # the bytes live on in ``t`` meanwhile: their id is theirs
            note = found.get(task_id)
            if note is not None:
                rec.note = bytes(note)
        return rec

    def _unfinished(self) -> list[Record]:
        """Our forks whose results have not arrived, from the drivers that hold them (:func:`begin`)."""
        out = []
        for d in list(DRIVERS):
            for task_id, pending in d._traced.copy().items():
                p = None if isinstance(pending, Record) else _expand(pending)
                if p is not None and any(r() is self for r in _groups.get(p[3], ())):
                    rec = Record(p[0], list(p[1]), p[2])
                    rec.gid = f"{d.name}#{task_id}"
                    rec.aliases = tuple(f"{d.name}#{a}" for a in p[4])
                    out.append(rec)
        return out

    def _flatten(self, rec: Record, offset: float, parent: TaskInfo | None, enclosing: tuple[str, str, int] | None,
                 out: list[TaskInfo], ids: dict[str, int], pending: list[tuple[TaskInfo, list[str]]]) -> None:
        t0 = self.started
        try:
            rec.resolve()
        except ProtocolError:
            self.bad_notes += 1
        r = rec.remote
        child_offset = offset
        dispatched = started = finished = None
        worker, host, pid = enclosing or ("", "", 0)
        in_b = out_b = retries = 0
        in_path = out_path = ""
        if r is not None:
            b_off = _shift(rec.submit, rec.done, r[3], r[5])
            w_off = b_off + _shift(r[4], r[5], r[7], r[9])
            dispatched = r[4] + b_off + offset - t0
            started = r[8] + w_off + offset - t0
            finished = r[9] + w_off + offset - t0
            worker, host, pid = r[0], r[1], r[2]
            retries, in_b, in_path, out_b, out_path = r[6], r[10], r[11], r[12], r[13]
            child_offset = offset + w_off  # its forks were stamped by the worker's clock
        elif rec.where:
            started, finished = rec.start + offset - t0, rec.end + offset - t0
            if rec.where == "inline":
                worker, host, pid = "inline", "", os.getpid()
        if rec.held:
            out_path = "held"
        info = TaskInfo(
            id=len(out) + 1, func=rec.func, parent=parent.id if parent else None, deps=[],
            submitted=rec.submit + offset - t0, dispatched=dispatched, started=started, finished=finished,
            done=rec.done + offset - t0 if rec.done else None, worker=worker, host=host, pid=pid,
            run_s=None if started is None or finished is None else finished - started,
            bytes_in=in_b, path_in=in_path, bytes_out=out_b, path_out=out_path, retries=retries,
            status=rec.status, error=rec.error, where=rec.where,
        )
        out.append(info)
        if rec.gid:
            ids[rec.gid] = info.id
            for alias in rec.aliases:
                ids[alias] = info.id
        if rec.deps:
            pending.append((info, rec.deps))
        here = (worker, host, pid) if worker else enclosing
        for child in list(rec.children):
            self._flatten(child, child_offset, info, here, out, ids, pending)

    @property
    def graph(self) -> Graph:
        """The fork graph; ``print(t.graph)`` shows it as text."""
        return Graph(self.tasks(), self)

    def chrome(self) -> dict[str, Any]:
        """The trace in Chrome's trace event format (a dict; :meth:`save` writes it)."""
        return chrome_trace(self.tasks())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a Chrome trace (JSON; open it in https://ui.perfetto.dev or chrome://tracing)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.chrome(), f, separators=(",", ":"))

    def report(self, path: str | os.PathLike[str], title: str = "distfork run") -> None:
        """Write one self-contained HTML page (no network needed) with the task stream, the fork graph,
        run times, throughput, bytes by path and the failures."""
        from .report import write_report

        write_report(self.tasks(), path, title=title, dropped=self.dropped)


def _shift(sent: float, back: float, r_in: float, r_out: float) -> float:
    """What to add to a remote clock's times so that [r_in, r_out] lies within [sent, back] (our clock).

    Nothing if it already does (one host, or clocks in step); else the
    midpoint offset of the round trip.
    """
    if back <= 0 or (r_in >= sent and r_out <= back):
        return 0.0
    return ((sent + back) - (r_in + r_out)) / 2


def trace(capacity: int | None = None) -> Trace:
    """Record every fork made until the block ends, from this process and from the tasks it forks.

    ::

        with distfork.trace() as t:
            distfork.wait(distfork.fork(fib, 10))
        print(t.graph)
        t.save("run.json")      # Chrome trace: Perfetto, chrome://tracing
        t.report("run.html")    # one self-contained page

    ``capacity``: top-level forks kept (a ring; default
    ``Config.trace_capacity``, ``DISTFORK_TRACE_CAPACITY``).
    """
    return Trace(capacity)


class Graph:
    """The fork graph, printed in the spirit of TorchScript's IR (``%n`` values, ``fork``, ``with`` blocks)."""

    def __init__(self, tasks: list[TaskInfo], trace_: Trace | None = None) -> None:
        self.tasks = tasks
        self._trace = trace_

    def edges(self) -> list[tuple[int, int, str]]:
        """(from, to, kind): "fork" from a parent task to its child, "value" from a producer to a taker."""
        out = [(t.parent, t.id, "fork") for t in self.tasks if t.parent is not None]
        out += [(d, t.id, "value") for t in self.tasks for d in t.deps]
        return out

    def __str__(self) -> str:
        kids: dict[int | None, list[TaskInfo]] = {}
        for t in self.tasks:
            kids.setdefault(t.parent, []).append(t)
        workers = {t.worker for t in self.tasks if t.worker}
        end = max((t.done or t.finished or t.submitted for t in self.tasks), default=0.0)
        lines = [f"graph(driver pid {os.getpid()}): {len(self.tasks)} forks on {len(workers)} workers, {end:.3f} s"]
        if self._trace is not None and self._trace.dropped:
            lines.append(f"  # {self._trace.dropped} earlier forks dropped (capacity {self._trace.capacity})")
        self._block(kids, None, "  ", lines)
        return "\n".join(lines)

    def _block(self, kids: dict[int | None, list[TaskInfo]], parent: int | None, indent: str,
               lines: list[str]) -> None:
        for t in kids.get(parent, ()):
            args = "".join(f", %{d}" for d in t.deps)
            lines.append(f"{indent}%{t.id} : Future = fork({t.func}{args})  # {_describe(t)}")
        for t in kids.get(parent, ()):
            waits = " ".join(f"%{d}" for d in t.deps)
            line = f"{indent}%{t.id}.value = wait(%{t.id})"
            if t.status != "ok":
                line += f"  # {t.status.upper()}"
                if t.error:
                    line += ": " + t.error.strip().splitlines()[-1]
            lines.append(line)
            if t.id in kids:
                lines.append(f"{indent}with %{t.id} = task {t.func}({waits}) on {t.worker or '?'}:")
                self._block(kids, t.id, indent + "  ", lines)

    def __repr__(self) -> str:
        return f"<distfork fork graph of {len(self.tasks)} tasks>"


def _describe(t: TaskInfo) -> str:
    parts = []
    if t.where == "reclaimed":
        parts.append("ran in its waiting parent")
    elif t.where == "inline":
        parts.append("ran inline")
    elif t.worker:
        parts.append(f"on {t.worker} ({t.host}, pid {t.pid})")
    if t.started is not None and t.run_s is not None:
        parts.append(f"+{t.started * 1000:.1f} ms, ran {_ms(t.run_s)}")
    if t.queued_s is not None and t.where == "":
        parts.append(f"waited {_ms(t.queued_s)}")
    if t.deps:
        parts.append("took " + ", ".join(f"%{d}" for d in t.deps))
    if t.bytes_in or t.bytes_out:
        parts.append(f"in {t.bytes_in} B {t.path_in}, out {t.bytes_out} B {t.path_out}")
    if t.retries:
        parts.append(f"{t.retries} retries")
    parts.append(t.status)
    return ", ".join(parts)


def _ms(s: float) -> str:
    return f"{s * 1000:.2f} ms" if s < 1 else f"{s:.3f} s"


def chrome_trace(tasks: list[TaskInfo]) -> dict[str, Any]:
    """Chrome trace event format: a process per host, a thread (track) per worker slot, the driver's
    forks on their own track, flow arrows fork -> task and producer -> taker."""
    events: list[dict[str, Any]] = []
    hosts: dict[str, int] = {}
    tracks: dict[tuple[str, str], tuple[int, int]] = {}

    def track(host: str, name: str) -> tuple[int, int]:
        key = (host, name)
        if key not in tracks:
            if host not in hosts:
                hosts[host] = len(hosts) + 1
                events.append({"ph": "M", "name": "process_name", "pid": hosts[host], "tid": 0,
                               "args": {"name": host}})
            tid = len(tracks) + 1
            tracks[key] = (hosts[host], tid)
            events.append({"ph": "M", "name": "thread_name", "pid": hosts[host], "tid": tid, "args": {"name": name}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": hosts[host], "tid": tid,
                           "args": {"sort_index": tid}})
        return tracks[key]

    def us(s: float) -> float:
        return round(s * 1e6, 3)

    driver = track("driver", f"driver (pid {os.getpid()})")
    end = max((max(t.done or 0.0, t.finished or 0.0, t.submitted) for t in tasks), default=0.0)
    # One slice for the whole run on the driver's track: the flow arrows of its forks start inside it.
    events.append({"ph": "X", "name": "driver", "cat": "driver", "pid": driver[0], "tid": driver[1], "ts": 0,
                   "dur": max(us(end), 1.0)})
    where: dict[int, tuple[int, int]] = {}
    by_id = {t.id: t for t in tasks}
    flow = 0
    for t in tasks:
        if t.started is not None and t.finished is not None:
            where[t.id] = track(t.host or "local", t.worker or "?")
    for t in tasks:
        src = where.get(t.parent) if t.parent is not None else driver
        if src is None:
            src = driver
        # the fork itself: an instant on the forking track (inside the driver's or the parent's slice,
        # where its flow arrow starts); a slice of its own could overlap a child's and break the nesting
        events.append({"ph": "i", "s": "t", "name": f"fork {t.func}", "cat": "fork", "pid": src[0], "tid": src[1],
                       "ts": us(t.submitted), "args": {"task": t.id}})
        if t.id not in where or t.started is None or t.finished is None:
            continue
        pid, tid = where[t.id]
        args = {"task": t.id, "parent": t.parent, "status": t.status, "retries": t.retries,
                "bytes_in": t.bytes_in, "path_in": t.path_in, "bytes_out": t.bytes_out, "path_out": t.path_out,
                "queued_ms": round((t.started - t.submitted) * 1000, 3)}
        if t.error:
            args["error"] = t.error
        events.append({"ph": "X", "name": t.func, "cat": "task", "pid": pid, "tid": tid, "ts": us(t.started),
                       "dur": max(us(t.finished - t.started), 1.0), "args": args})
        flow += 1
        events.append({"ph": "s", "name": "fork", "cat": "fork", "id": flow, "pid": src[0], "tid": src[1],
                       "ts": us(t.submitted)})
        events.append({"ph": "f", "bp": "e", "name": "fork", "cat": "fork", "id": flow, "pid": pid, "tid": tid,
                       "ts": us(t.started)})
        for d in t.deps:
            producer = by_id.get(d)
            if producer is None or producer.finished is None or d not in where:
                continue
            flow += 1
            ppid, ptid = where[d]
            events.append({"ph": "s", "name": "value", "cat": "value", "id": flow, "pid": ppid, "tid": ptid,
                           "ts": us(max(producer.started or producer.finished, producer.finished - 1e-6))})
            events.append({"ph": "f", "bp": "e", "name": "value", "cat": "value", "id": flow, "pid": pid,
                           "tid": tid, "ts": us(t.started)})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"tool": "distfork", "tasks": len(tasks)}}


def from_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> Trace | None:
    """``distfork trace -- cmd``: a trace for the whole process, written at exit (not in workers)."""
    out = environ.get("DISTFORK_TRACE_OUT")
    if not out or environ.get("DISTFORK_IN_WORKER") == "1" or _tracers:
        return None
    t = Trace().__enter__()
    import atexit

    def write() -> None:
        t.close()
        t.save(out)
        html = environ.get("DISTFORK_TRACE_HTML")
        if html:
            t.report(html)
        summary = environ.get("DISTFORK_TRACE_GRAPH")
        if summary:
            with open(summary, "w", encoding="utf-8") as f:
                f.write(str(t.graph) + "\n")

    atexit.register(write)
    return t

