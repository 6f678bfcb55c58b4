"""The wire protocol: the only module that knows frame layouts.

Every message is one ZeroMQ multipart message. Its first frame is the header::

    byte 0      protocol version (VERSION)
    byte 1      message type (Msg)
    bytes 2..   type-specific body

Bodies:

* control messages (HELLO, WELCOME, STATUS_REPLY, REJECT, KEEPALIVE, CLUSTER,
  EXITED, RECLAIMED, RECYCLE, CODE_GET, OUTPUT): UTF-8 JSON
  object;
* batches (SUBMIT, TASKS, RESULTS, DISCARD, DIRECT): ``u32 count`` then ``count``
  entries of ``struct "!QHBHfI"`` = (id, nframes, code, flags, extra, pid),
  then one ``u32`` per payload frame of the entries, in order: its length
  if it is *inline*, ``0xFFFFFFFF`` if it is its own ZeroMQ frame; then the
  inline payload frames' bytes, back to back. Small payload frames (up to
  ``INLINE_MAX`` bytes, ``INLINE_BUDGET`` per message) travel inline: a
  batch of no-op tasks is one ZeroMQ frame, not one per task, which saves
  each process a send and a receive per task. The others (large buffers)
  follow the header as frames of their own, in order, sent without a copy.
  The two middle fields mean different things in the two kinds of batch,
  so each decodes to its own type: a :class:`TaskEntry` (SUBMIT, TASKS:
  ``max_retries``, 255 for the cluster default, and ``timeout_s``, 0 for
  none) or a :class:`ResultEntry` (RESULTS, DISCARD: a
  :class:`Status` and ``run_s``); ``flags`` are :class:`Flag` bits.
  ``pid`` is only set in TASKS with RESULT_SHM: the driver's pid, whose
  death frees the result's shared-memory segment.
  With ``Flag.DEPS``, a task's payload starts with a dependency frame (see
  :class:`Flag` and :func:`encode_deps`);
* CODE: a JSON object ``{"hash": sha256 hex}`` and, as a second frame,
  the package's zip bytes (absent in the broker's answer when it does not
  have that package); CODE_GET: JSON ``{"hash": ...}``;
* CANCEL, RECLAIM, FETCH, RELEASE: ``u32 count`` then ``count`` u64 task ids;
* HEARTBEAT, BYE, STATUS: empty.

The ROUTER socket of the broker prepends the sender's routing id; the
broker strips it before calling :func:`decode`. Payload frames are opaque
here: the broker forwards them without looking inside.

Malformed input raises :class:`~distfork.errors.ProtocolError`, never an
``AssertionError``: callers log it and drop the message. JSON bodies are
decoded *and validated* here, by one typed function per message
(:func:`decode_hello`, :func:`decode_keepalive`, :func:`decode_exited`,
:func:`decode_recycle`, :func:`decode_output`, :func:`decode_code_get`,
:func:`decode_reclaimed`), so the roles never index a raw dict from the wire.
The payload manifest (the second frame of a shared-memory or split payload,
see serialize.py) is parsed by :func:`decode_manifest` only.
"""

from __future__ import annotations

import enum
import functools
import json
import operator
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, TypeGuard, TypeVar

from .errors import ProtocolError

__all__ = [
    "DEFAULT_RETRIES",
    "DIRECT_KEY_BASE",
    "INLINE_BUDGET",
    "INLINE_MAX",
    "TRACE_PATHS",
    "VERSION",
    "WORKER_NOTE_BYTES",
    "Entry",
    "ResultEntry",
    "TaskEntry",
    "Exited",
    "Flag",
    "Frame",
    "Keepalive",
    "Manifest",
    "Msg",
    "Output",
    "Role",
    "Status",
    "decode",
    "decode_cancel",
    "decode_code",
    "decode_code_get",
    "decode_exited",
    "decode_hello",
    "decode_keepalive",
    "decode_manifest",
    "decode_origin",
    "decode_output",
    "decode_reclaimed",
    "decode_recycle",
    "decode_results",
    "decode_tasks",
    "decode_json",
    "decode_dep_counts",
    "decode_deps",
    "decode_devices",
    "decode_request",
    "decode_driver_note",
    "decode_notes",
    "decode_worker_note",
    "driver_note_packer",
    "encode_dep_counts",
    "encode_deps",
    "encode_devices",
    "encode_request",
    "encode_batch",
    "encode_cancel",
    "encode_code",
    "encode_json",
    "encode_origin",
    "encode_driver_note",
    "encode_framed_worker_note",
    "encode_notes",
    "encode_signal",
    "encode_worker_note",
    "fixed_driver_note_packer",
    "fixed_worker_notes",
    "framed_worker_note_packer",
    "notes_entry",
    "split_notes",
]

# 2: flags widened to 16 bits (TRACE = 256); 3: small payload frames inline in a batch's header;
# 4: trace notes carry their (id, length) head and no receive time; DIRECT (27), SHARE_GET/SHARE/SHARE_DROP
VERSION = 4
#: Task ``code`` meaning "use the cluster's default max_retries".
DEFAULT_RETRIES = 255
#: Keys of direct tasks (distfork/direct.py) start here: above any key the broker hands out (it
#: counts up from below 2**49); a driver picks them at random, so two never pick the same one.
DIRECT_KEY_BASE = 1 << 62

# A frame as it travels: bytes we built, or a zmq.Frame / memoryview received.
Frame = bytes | memoryview | Any


class Msg(enum.IntEnum):
    """Message types. Direction: D driver, W worker, B broker."""

    HELLO = 1  # D/W -> B: register (JSON: role, host, pid, slots, ...)
    WELCOME = 2  # B -> D/W: registered (JSON: session, ...)
    SUBMIT = 3  # D -> B: batch of tasks
    TASKS = 4  # B -> W: batch of tasks to run
    RESULTS = 5  # W -> B, B -> D: batch of results
    CANCEL = 6  # D -> B, B -> W: task ids to cancel
    HEARTBEAT = 7  # any direction
    BYE = 8  # D/W -> B: leaving; B -> D/W: broker stopping
    STATUS = 9  # anyone -> B: status query
    STATUS_REPLY = 10  # B -> asker (JSON)
    REJECT = 11  # B -> peer: unknown or refused peer (JSON: reason)
    KEEPALIVE = 12  # W process -> B: its slot peers are alive, or leaving (JSON: peers, bye)
    CLUSTER = 13  # B -> D: facts that changed (JSON: local_workers)
    DISCARD = 14  # B -> W: results nobody will take, back to their maker to free (batch)
    EXITED = 15  # supervisor -> B: a worker process ended (JSON: host, pid, code)
    RECLAIM = 16  # D -> B: give these queued tasks back, I will run them myself (ids, as CANCEL)
    RECLAIMED = 17  # B -> D: which of them it gave back (JSON: granted, refused)
    RECYCLE = 18  # D -> B -> W: result segments nobody maps any more, back to their maker (JSON: names)
    FETCH = 19  # D -> B: send me the values of these held results (ids, as CANCEL)
    RELEASE = 20  # D -> B: I dropped the futures of these held results unfetched (ids, as CANCEL)
    CODE = 21  # D -> B: a package of the driver's code; B -> asker: the one asked for (see encode_code)
    CODE_GET = 22  # W (any peer) -> B: send me the code package of this hash (JSON: hash)
    OUTPUT = 23  # W control -> B -> D: lines a running task printed or logged (JSON, see distfork/output.py)
    # distfork/sharecache.py: a share()d value's bytes, fetched once per worker host from its driver.
    SHARE_GET = 24  # W fetch socket -> B -> D: send me this shared value (JSON: key, driver; B adds asker)
    SHARE = 25  # D -> B -> asker: its bytes (JSON: key, asker, sha256, size; then the bytes in frames)
    SHARE_DROP = 26  # D -> B -> W control sockets: shared values released, free their copies (JSON: keys)
    # D -> B: tasks this driver sent straight to slots (distfork/direct.py): a batch whose entries
    # carry the task's key and, as their first frame, encode_origin(slot, the driver's task id).
    DIRECT = 27


class Role(str, enum.Enum):
    """Who a peer is, as its HELLO says; on the wire, the value string."""

    DRIVER = "driver"
    WORKER = "worker"


class Flag:
    """Bits of a task entry's ``flags``.

    Plain ints, not an ``enum.IntFlag``: every task and result tests a few of
    them, and an ``IntFlag`` operation costs about a microsecond.
    """

    PINNED = 1  # SUBMIT: the payload names a shared-memory segment of the driver's domain
    RESULT_SHM = 2  # TASKS: the driver shares the worker's /dev/shm; return large buffers there
    RETAINED = 4  # RESULTS: the task kept something that maps its argument segment: do not reuse it
    NESTED = 8  # SUBMIT: forked by a task; never prefetched, so its parent can reclaim it while queued
    # SUBMIT: the payload starts with a frame of u64 driver task ids: the futures its arguments name.
    # TASKS: the payload starts with a frame of u32 frame counts, one per dependency, then those
    # dependencies' result frames in order, then the call's frames.
    DEPS = 16
    # RESULTS (B -> D): the value stays in the broker for tasks that take it; FETCH it. Payload:
    # nothing, or the name of the shared-memory segment it is in.
    HELD = 32
    # RESULTS (W -> B): the task printed; its lines travel in OUTPUT from the worker's control socket
    # and may reach the broker after this result: keep routing them to its driver.
    OUTPUT = 64
    # SUBMIT: the payload starts with a frame of what the task asks for (encode_request), before any
    # DEPS frame. TASKS: the payload starts with a frame of the GPU ids it was given (encode_devices).
    RESOURCES = 128
    # SUBMIT, TASKS: forked inside distfork.trace(): the worker and the broker report its timings.
    # RESULTS: on the entry of id 0 that comes first in a batch with traced results: it carries
    # their trace notes (see encode_notes).
    TRACE = 256
    # RESULTS (W -> B): the outcome of a task run on the direct path (distfork/direct.py), already
    # delivered to its driver: the broker counts it and does not route it. Payload: none.
    DIRECT = 512


class Status(enum.IntEnum):
    """Outcome of a task, carried in a RESULTS entry's ``code``."""

    OK = 0  # payload: the pickled value
    RAISED = 1  # payload: the pickled exception (with its remote traceback)
    LOST = 2  # payload: UTF-8 text, the worker was lost too often
    CANCELLED = 3  # payload: none
    TIMED_OUT = 4  # payload: UTF-8 text, the task ran past its timeout_s
    FAILED = 5  # payload: UTF-8 text, distfork could not run or return it
    RESUBMIT = 6  # payload: none; a future its arguments name is not in the broker any more: send its value


_HEADER = struct.Struct("!BB")
_COUNT = struct.Struct("!I")
_ENTRY = struct.Struct("!QHBHfI")
_U64 = struct.Struct("!Q")
_SIGNALS = {m: _HEADER.pack(VERSION, m) for m in Msg}
_MSGS: dict[int, Msg] = {int(m): m for m in Msg}  # a dict lookup, not an enum call, per message
#: Payload frames of at most this many bytes travel inside a batch's header frame.
INLINE_MAX = 4096
#: Inline bytes per batch message at most (the rest go as frames of their own): bounds the header frame.
INLINE_BUDGET = 1 << 20
_SEPARATE = 0xFFFFFFFF  # in a batch's frame table: this payload frame is a ZeroMQ frame of its own
_U32 = struct.Struct("!I")
_NFRAMES = operator.itemgetter(1)  # of an unpacked _ENTRY


class TaskEntry(NamedTuple):
    """One task of a SUBMIT or TASKS batch."""

    id: int  # SUBMIT: the driver's task id; TASKS: the broker's key
    max_retries: int  # DEFAULT_RETRIES: the cluster's default
    timeout_s: float  # 0: none
    frames: Sequence[Frame]
    flags: int = 0  # Flag bits
    pid: int = 0  # TASKS with RESULT_SHM: the driver's pid, whose death frees the result's segment


class ResultEntry(NamedTuple):
    """One result of a RESULTS or DISCARD batch (same wire layout as a task: ``status`` and ``run_s``
    stand where a task has ``max_retries`` and ``timeout_s``)."""

    id: int  # W -> B: the broker's key; B -> D: the driver's task id
    status: int  # a Status
    run_s: float  # the task's run time in the worker
    frames: Sequence[Frame]
    flags: int = 0  # Flag bits
    pid: int = 0  # unused


#: Either kind of batch entry: the codec packs both alike.
Entry = TaskEntry | ResultEntry


def _header(frames: Sequence[Frame]) -> tuple[Msg, memoryview]:
    if not frames:
        raise ProtocolError("empty message")
    head = memoryview(frames[0])
    if head.nbytes < 2:
        raise ProtocolError(f"header of {head.nbytes} bytes, need at least 2")
    version, kind = head[0], head[1]
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {VERSION}")
    msg = _MSGS.get(kind)
    if msg is None:
        raise ProtocolError(f"unknown message type {kind}")
    return msg, head[2:]


def decode(frames: Sequence[Frame]) -> tuple[Msg, memoryview]:
    """The type and the body of a message (body still encoded)."""
    return _header(frames)


def encode_signal(kind: Msg) -> list[Frame]:
    """A message without a body (HEARTBEAT, BYE, ...)."""
    return [_SIGNALS[kind]]


def encode_json(kind: Msg, body: dict[str, Any]) -> list[Frame]:
    return [_SIGNALS[kind] + json.dumps(body, separators=(",", ":")).encode()]


def decode_json(body: memoryview) -> dict[str, Any]:
    try:
        value = json.loads(bytes(body))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: hostile nesting
        raise ProtocolError(f"bad JSON body: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"JSON body is a {type(value).__name__}, expected an object")
    return value


def encode_batch(kind: Msg, entries: Sequence[Entry]) -> list[Frame]:
    """One message carrying many tasks or results (SUBMIT, TASKS, RESULTS, DISCARD)."""
    parts: list[Frame] = [_SIGNALS[kind], _COUNT.pack(len(entries))]
    sizes: list[int] = []
    inline: list[Frame] = []
    frames: list[Frame] = [b""]
    pack = _ENTRY.pack
    budget = INLINE_BUDGET
    for entry_id, code, extra, entry_frames, flags, pid in entries:
        parts.append(pack(entry_id, len(entry_frames), code, flags, extra, pid))
        for f in entry_frames:
            n = len(f) if type(f) is bytes else f.nbytes if isinstance(f, memoryview) else memoryview(f).nbytes
            if n <= INLINE_MAX and n <= budget:
                budget -= n
                sizes.append(n)
                inline.append(f)
            else:
                sizes.append(_SEPARATE)
                frames.append(f)
    if sizes:
        parts.append(struct.pack(f"!{len(sizes)}I", *sizes))
        parts += inline
    frames[0] = b"".join(parts)
    return frames


def decode_tasks(frames: Sequence[Frame], body: memoryview) -> list[TaskEntry]:
    """The tasks of a SUBMIT or TASKS message whose header was already decoded."""
    return _decode_batch(frames, body, TaskEntry)


def decode_results(frames: Sequence[Frame], body: memoryview) -> list[ResultEntry]:
    """The results of a RESULTS or DISCARD message whose header was already decoded."""
    return _decode_batch(frames, body, ResultEntry)


_E = TypeVar("_E", TaskEntry, ResultEntry)


def _decode_batch(frames: Sequence[Frame], body: memoryview, make: type[_E]) -> list[_E]:
    size = body.nbytes
    if size < _COUNT.size:
        raise ProtocolError("batch without a count")
    (count,) = _COUNT.unpack_from(body)
    table = _COUNT.size + count * _ENTRY.size
    if size < table:
        raise ProtocolError(f"batch of {count} entries has a {size}-byte header")
    if count == 1:  # the common case of a lone task or result, without the list and sum
        one = _ENTRY.unpack_from(body, _COUNT.size)
        if one[1] == 1 and len(frames) == 1 and size >= table + 4:  # with one inline frame: at once
            (length,) = _U32.unpack_from(body, table)
            if length != _SEPARATE and table + 4 + length == size:
                return [make(one[0], one[2], one[4], [body[table + 4 :]], one[3], one[5])]
        raw = [one]
        nframes = one[1]
    else:
        raw = list(_ENTRY.iter_unpack(body[_COUNT.size : table]))
        nframes = sum(map(_NFRAMES, raw))
    at = table + 4 * nframes  # where the inline bytes start
    if size < at:
        raise ProtocolError(f"batch of {count} entries has a {size}-byte header")
    sizes = _U32.unpack_from(body, table) if nframes == 1 else struct.unpack_from(f"!{nframes}I", body, table)
    entries: list[_E] = []
    append = entries.append
    k = 0  # the next frame-table index
    nxt = 1  # the next ZeroMQ frame
    for task_id, n, code, flags, extra, pid in raw:
        if n == 1 and sizes[k] != _SEPARATE:  # one inline frame: most tasks and results
            end = at + sizes[k]
            if end > size:
                raise ProtocolError(f"batch of {count} entries has a {size}-byte header")
            own: list[Frame] = [body[at:end]]
            at = end
            k += 1
            append(make(task_id, code, extra, own, flags, pid))
            continue
        own = []
        for length in sizes[k : k + n]:
            if length == _SEPARATE:
                if nxt >= len(frames):
                    raise ProtocolError(f"batch entries name more frames than the message's {len(frames)}")
                own.append(frames[nxt])
                nxt += 1
            else:
                end = at + length
                if end > size:
                    raise ProtocolError(f"batch of {count} entries has a {size}-byte header")
                own.append(body[at:end])
                at = end
        k += n
        append(make(task_id, code, extra, own, flags, pid))
    if at != size:
        raise ProtocolError(f"batch of {count} entries has a {size}-byte header")
    if nxt != len(frames):
        raise ProtocolError(f"batch has {len(frames) - nxt} frames no entry names")
    return entries


def encode_cancel(ids: Sequence[int], kind: Msg = Msg.CANCEL) -> list[Frame]:
    """A list of task ids (CANCEL, RECLAIM)."""
    return [_SIGNALS[kind] + _COUNT.pack(len(ids)) + b"".join(_U64.pack(i) for i in ids)]


def decode_cancel(body: memoryview) -> list[int]:
    if body.nbytes < _COUNT.size:
        raise ProtocolError("cancel without a count")
    (count,) = _COUNT.unpack_from(body)
    if body.nbytes != _COUNT.size + count * _U64.size:
        raise ProtocolError(f"cancel of {count} ids has {body.nbytes} bytes")
    return [i for (i,) in _U64.iter_unpack(body[_COUNT.size :])]


_DEP_ID = struct.Struct("!Q")
_DEP_COUNT = struct.Struct("!I")


_ORIGIN = struct.Struct("!Q")


def encode_origin(driver: bytes, task_id: int) -> bytes:
    """DIRECT's first frame of an entry: which driver sent the task straight to the slot, and its id there."""
    return _ORIGIN.pack(task_id) + driver


def decode_origin(frame: Frame) -> tuple[bytes, int]:
    raw = bytes(frame)
    if len(raw) <= _ORIGIN.size or len(raw) > _ORIGIN.size + 255:
        raise ProtocolError(f"direct task origin of {len(raw)} bytes")
    return raw[_ORIGIN.size:], _ORIGIN.unpack_from(raw)[0]


def encode_deps(ids: Sequence[int]) -> bytes:
    """SUBMIT's dependency frame: the driver task ids of the futures among a task's arguments."""
    return b"".join(_DEP_ID.pack(i) for i in ids)


def decode_deps(frame: Frame) -> list[int]:
    view = memoryview(frame)
    if view.nbytes == 0 or view.nbytes % _DEP_ID.size:
        raise ProtocolError(f"dependency frame of {view.nbytes} bytes, need a multiple of {_DEP_ID.size}")
    return [i for (i,) in _DEP_ID.iter_unpack(view)]


def encode_dep_counts(counts: Sequence[int]) -> bytes:
    """TASKS' dependency frame: how many frames each dependency's value has, in order."""
    return b"".join(_DEP_COUNT.pack(n) for n in counts)


def decode_dep_counts(frames: Sequence[Frame]) -> tuple[list[Sequence[Frame]], Sequence[Frame]]:
    """Split a TASKS payload with ``Flag.DEPS``: (each dependency's frames, the call's frames)."""
    if not frames:
        raise ProtocolError("a task with dependencies but no payload")
    view = memoryview(frames[0])
    if view.nbytes == 0 or view.nbytes % _DEP_COUNT.size:
        raise ProtocolError(f"dependency frame of {view.nbytes} bytes, need a multiple of {_DEP_COUNT.size}")
    deps: list[Sequence[Frame]] = []
    at = 1
    for (n,) in _DEP_COUNT.iter_unpack(view):
        if n == 0 or at + n > len(frames):
            raise ProtocolError(f"dependency of {n} frames at frame {at} of {len(frames)}")
        deps.append(frames[at : at + n])
        at += n
    if at >= len(frames):
        raise ProtocolError("a task with dependencies but no call")
    return deps, frames[at:]


def encode_code(code_hash: str, data: Frame | None) -> list[Frame]:
    """A code package (driver -> broker), or the broker's answer to CODE_GET (``data`` None: it has none)."""
    head = encode_json(Msg.CODE, {"hash": code_hash})
    return head if data is None else [*head, data]


def decode_code(frames: Sequence[Frame], body: memoryview) -> tuple[str, Frame | None]:
    """(hash, zip bytes or None) of a CODE message whose header was already decoded."""
    code_hash = decode_json(body).get("hash")
    if not isinstance(code_hash, str) or len(code_hash) != 64:
        raise ProtocolError(f"CODE message names package {code_hash!r}, expected a sha256 hex digest")
    if len(frames) > 2:
        raise ProtocolError(f"CODE message of {len(frames)} frames, expected at most 2")
    return code_hash, (frames[1] if len(frames) == 2 else None)


def encode_request(needs: dict[str, float] | None, labels: dict[str, str] | None) -> bytes:
    """SUBMIT's resource frame (``Flag.RESOURCES``): what a task asks of the worker that runs it."""
    return json.dumps({"resources": needs or {}, "labels": labels or {}}, separators=(",", ":")).encode()


def decode_request(frame: Frame) -> tuple[dict[str, float] | None, dict[str, str] | None]:
    body = decode_json(memoryview(frame))
    needs, labels = body.get("resources"), body.get("labels")
    if not isinstance(needs, dict) or not isinstance(labels, dict):
        raise ProtocolError("resource frame without resources and labels objects")
    for k, v in needs.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            raise ProtocolError(f"resource {k!r} asks for {v!r}")
    if not all(isinstance(v, str) for v in labels.values()):
        raise ProtocolError("labels must be strings")
    return ({str(k): float(v) for k, v in needs.items()} or None), (dict(labels) or None)


def encode_devices(ids: Sequence[int]) -> bytes:
    """TASKS' resource frame (``Flag.RESOURCES``): the GPU ids the task was given."""
    return json.dumps(list(ids)).encode()


def decode_devices(frame: Frame) -> list[int]:
    try:
        ids = json.loads(bytes(frame))
    except ValueError:
        raise ProtocolError("device frame is not JSON") from None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ProtocolError(f"device frame {ids!r} is not a list of ids")
    return ids


# Trace notes: what the worker (then the broker) adds to the result of a traced task. A RESULTS batch
# with traced results starts with an entry of id 0 and Flag.TRACE whose one frame holds, for each,
# u64 id (worker: the task key; broker: the driver's task id), u32 length, the note.
_NOTE_HEAD = struct.Struct("!QI")


def encode_notes(notes: Sequence[tuple[int, bytes]]) -> ResultEntry:
    """The entry that carries a batch's trace notes; it goes first in the batch. Its ``pid`` field
    (unused on results) says how many notes it holds."""
    pack = _NOTE_HEAD.pack
    return ResultEntry(0, 0, 0.0, [b"".join(pack(i, len(n)) + n for i, n in notes)], Flag.TRACE, len(notes))


def decode_notes(entries: Sequence[ResultEntry]) -> tuple[list[tuple[int, memoryview]], Sequence[ResultEntry]]:
    """(the trace notes of a RESULTS batch, its other entries); one test when it has none."""
    if not entries or entries[0].id != 0 or not entries[0].flags & Flag.TRACE:
        return [], entries
    head = entries[0]
    if len(head.frames) != 1:
        raise ProtocolError(f"trace notes in {len(head.frames)} frames, expected 1")
    return split_notes(head.frames[0]), entries[1:]


def split_notes(frame: Frame) -> list[tuple[int, memoryview]]:
    """The (id, note) pairs of a notes entry's frame."""
    view = memoryview(frame)
    notes = []
    at = 0
    size = _NOTE_HEAD.size
    unpack = _NOTE_HEAD.unpack_from
    while at < view.nbytes:
        if at + size > view.nbytes:
            raise ProtocolError("a trace note cut short")
        i, n = unpack(view, at)
        at += size
        if at + n > view.nbytes:
            raise ProtocolError(f"a trace note of {n} bytes at {at} of {view.nbytes}")
        notes.append((i, view[at : at + n]))
        at += n
    return notes


# Each note.
# Worker's: (started, finished, bytes in, bytes out, path in, path out), its wall-clock seconds, then
# the JSON list of the records of the forks the task made (or nothing).
_WORKER_NOTE = struct.Struct("!ddQQBB")
# Broker's, to the driver: (reached the broker, dispatched, result back: the broker's wall clock; losses;
# length of the JSON naming the worker), that JSON, then the worker's note as it came (the broker
# forwards it without decoding it: its fields and its JSON list).
_DRIVER_NOTE = struct.Struct("!dddHH")
#: How a payload travelled, as a trace note's path byte.
TRACE_PATHS = ("none", "inline", "shm", "frames")


def encode_worker_note(start: float, end: float, in_bytes: int, out_bytes: int, in_path: int, out_path: int,
                       children: bytes = b"") -> bytes:
    return _WORKER_NOTE.pack(start, end, in_bytes, out_bytes, in_path, out_path) + children


# A note with its (id, length) head, in one pack: what a worker and the broker write per task, so that
# a batch's notes entry is one join (notes_entry), not a pack per note.
_FRAMED_WORKER_NOTE = struct.Struct("!QIddQQBB")
_FRAMED_DRIVER_HEAD = struct.Struct("!QIdddHH")


def encode_framed_worker_note(key: int, start: float, end: float, in_bytes: int, out_bytes: int, in_path: int,
                              out_path: int, children: bytes = b"") -> bytes:
    """A worker's note for task ``key``, with its head, ready for :func:`notes_entry`."""
    return _FRAMED_WORKER_NOTE.pack(key, _WORKER_NOTE.size + len(children), start, end, in_bytes, out_bytes,
                                    in_path, out_path) + children


def framed_worker_note_packer() -> tuple[Callable[..., bytes], int]:
    """``(pack, size)``: ``pack(key, size + len(children), start, end, in_bytes, out_bytes, in_path,
    out_path) + children`` is :func:`encode_framed_worker_note` without its call (a worker's hot path)."""
    return _FRAMED_WORKER_NOTE.pack, _WORKER_NOTE.size


def notes_entry(framed: Sequence[bytes]) -> ResultEntry:
    """The notes entry of a batch from notes that carry their heads (encode_framed_worker_note,
    driver_note_packer): the same layout as :func:`encode_notes`."""
    return ResultEntry(0, 0, 0.0, [b"".join(framed)], Flag.TRACE, len(framed))


def decode_worker_note(frame: Frame) -> tuple[tuple[Any, ...], memoryview]:
    """(the worker's six fields, the JSON bytes of its nested records, maybe empty)."""
    view = memoryview(frame)
    if view.nbytes < _WORKER_NOTE.size:
        raise ProtocolError(f"trace note of {view.nbytes} bytes, need {_WORKER_NOTE.size}")
    return _WORKER_NOTE.unpack_from(view), view[_WORKER_NOTE.size :]


def encode_driver_note(broker: tuple[float, float, float, int], who: bytes, worker_note: Frame) -> bytes:
    """The broker's times and the worker's name ahead of the worker's note, which stays as it came."""
    if len(who) > 65535:
        raise ValueError("worker description too long for a trace note")
    if len(worker_note) < _WORKER_NOTE.size:
        raise ProtocolError(f"trace note of {len(worker_note)} bytes, need {_WORKER_NOTE.size}")
    return _DRIVER_NOTE.pack(*broker, len(who)) + who + worker_note


def driver_note_packer() -> tuple[Callable[[int, int, float, float, float, int, int], bytes], int]:
    """``(pack, size)``: ``pack(task_id, size + len(who) + len(worker_note), arrived, dispatched, back,
    losses, len(who)) + who + worker_note`` is a driver note with its head, ready for
    :func:`notes_entry`, for a broker that writes many (``encode_driver_note`` for one, headless)."""
    return _FRAMED_DRIVER_HEAD.pack, _DRIVER_NOTE.size


def fixed_worker_notes(frame: Frame, count: int) -> Iterator[tuple[Any, ...]] | None:
    """A batch's ``count`` worker notes as tuples ``(key, length, *the six fields)``, in one C loop,
    when none carries nested records (each of the fixed size); else None (:func:`split_notes` them)."""
    view = memoryview(frame)
    if count * _FRAMED_WORKER_NOTE.size != view.nbytes or not count:
        return None
    return _FRAMED_WORKER_NOTE.iter_unpack(view)


@functools.lru_cache(maxsize=256)
def fixed_driver_note_packer(who_bytes: int) -> tuple[Callable[..., bytes], int]:
    """``(pack, size)`` for a broker forwarding a worker note of the fixed size (no nested records):
    ``pack(task_id, size, arrived, dispatched, back, losses, who_bytes, who, *the worker's six fields)``
    is the driver note with its head, the same bytes as :func:`driver_note_packer`'s and the note
    joined, in one call."""
    s = struct.Struct(f"!QIdddHH{who_bytes}s{_WORKER_NOTE.format[1:]}")
    return s.pack, s.size - _NOTE_HEAD.size


#: A worker's note is at least this long (the broker checks no more before it forwards one).
WORKER_NOTE_BYTES = _WORKER_NOTE.size


def decode_driver_note(frame: Frame) -> tuple[tuple[Any, ...], memoryview, memoryview]:
    """(the broker's four and the worker's six fields, the JSON naming the worker, the JSON of nested
    records or nothing); the JSON is the caller's to parse."""
    view = memoryview(frame)
    if view.nbytes < _DRIVER_NOTE.size:
        raise ProtocolError(f"trace note of {view.nbytes} bytes, need {_DRIVER_NOTE.size}")
    *fields, n = _DRIVER_NOTE.unpack_from(view)
    end = _DRIVER_NOTE.size + n
    if view.nbytes < end:
        raise ProtocolError(f"trace note of {view.nbytes} bytes names {end}")
    worker, kids = decode_worker_note(view[end:])
    return (*fields, *worker), view[_DRIVER_NOTE.size : end], kids


# -- JSON bodies, decoded and validated ---------------------------------------------


def _int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def decode_hello(body: memoryview) -> tuple[Role, dict[str, Any]]:
    """HELLO: (the role it says, its whole body, checked: a worker's ``slots`` a positive int)."""
    info = decode_json(body)
    try:
        role = Role(info.get("role"))
    except ValueError:
        raise ProtocolError(f"HELLO with role {str(info.get('role'))[:40]!r}, expected driver or worker") from None
    slots = info.get("slots", 1)
    if role is Role.WORKER and not (_int(slots) and 1 <= slots < 2**16):
        raise ProtocolError(f"worker HELLO announces {str(info.get('slots'))[:40]!r} slots")
    return role, info


class Keepalive(NamedTuple):
    """KEEPALIVE from a worker process's control socket."""

    peers: list[bytes]  # its slots' routing ids
    bye: bool = False  # the process ends: forget those slots
    rss_bytes: int | None = None  # its resident memory, if told
    timed_out: frozenset[int] = frozenset()  # with bye: the task keys it ended to stop
    cancelled: bool = False  # with bye: it ended to stop cancelled tasks (the wire lists their keys)


def decode_keepalive(body: memoryview) -> Keepalive:
    raw = decode_json(body)
    peers = raw.get("peers")
    if not isinstance(peers, list) or not all(isinstance(h, str) for h in peers):
        raise ProtocolError("KEEPALIVE without a list of peer ids")
    try:
        ids = [bytes.fromhex(h) for h in peers]
    except ValueError:
        raise ProtocolError("KEEPALIVE names a peer id that is not hex") from None
    rss = raw.get("rss")
    timed_out = raw.get("timed_out") or []
    if not isinstance(timed_out, list) or not all(_int(k) for k in timed_out):
        raise ProtocolError("KEEPALIVE whose timed_out is not a list of task keys")
    return Keepalive(ids, bool(raw.get("bye")), rss if _int(rss) and rss >= 0 else None, frozenset(timed_out),
                     bool(raw.get("cancelled")))


class Exited(NamedTuple):
    """EXITED from a supervisor: a worker process ended."""

    host: str
    pid: int
    code: int  # exit code, or minus the signal number
    oom: bool  # the supervisor saw the kernel's OOM killer act


def decode_exited(body: memoryview) -> Exited:
    raw = decode_json(body)
    host, pid, code = raw.get("host"), raw.get("pid"), raw.get("code")
    if not isinstance(host, str) or not _int(pid) or not _int(code):
        raise ProtocolError("EXITED without host, pid and exit code")
    return Exited(host, pid, code, raw.get("oom") is True)


def decode_recycle(body: memoryview, strict: bool = True) -> list[str]:
    """RECYCLE: segment names (``strict``: anything but a list of strings is a ProtocolError; else
    the strings among it, for a message we only clean up after)."""
    names = decode_json(body).get("names")
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return names
    if strict:
        raise ProtocolError("RECYCLE without a list of segment names")
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


class Output(NamedTuple):
    """OUTPUT from a worker process's control socket: lines task ``key`` on slot ``peer`` printed."""

    peer: bytes
    key: int
    body: dict[str, Any]  # lines, dropped, final: forwarded to the driver as they are


def decode_output(body: memoryview) -> Output:
    raw = decode_json(body)
    peer, key = raw.get("peer"), raw.get("key")
    if not isinstance(peer, str) or not _int(key) or not isinstance(raw.get("lines"), list):
        raise ProtocolError("OUTPUT without peer, key or lines")
    try:
        return Output(bytes.fromhex(peer), key, raw)
    except ValueError:
        raise ProtocolError(f"OUTPUT names peer {peer[:40]!r}") from None


def decode_code_get(body: memoryview) -> str:
    """CODE_GET: the sha256 hex of the package asked for."""
    code_hash = decode_json(body).get("hash")
    if not isinstance(code_hash, str) or len(code_hash) != 64:
        raise ProtocolError(f"CODE_GET names package {str(code_hash)[:80]!r}")
    return code_hash


def _hex(value: object, most: int) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= most and all(c in "0123456789abcdef" for c in value)


def encode_share_get(key: str, driver: str, asker: str = "") -> list[Frame]:
    """SHARE_GET: a worker asks (through the broker, which adds ``asker``) driver ``driver`` for value ``key``."""
    body = {"key": key, "driver": driver, **({"asker": asker} if asker else {})}
    return encode_json(Msg.SHARE_GET, body)


def decode_share_get(body: memoryview) -> tuple[str, str, str]:
    """SHARE_GET: (key, driver routing id hex, asker routing id hex or "")."""
    raw = decode_json(body)
    key, driver, asker = raw.get("key"), raw.get("driver"), raw.get("asker", "")
    if not _hex(key, 64) or not _hex(driver, 64) or not (asker == "" or _hex(asker, 64)):
        raise ProtocolError("SHARE_GET without a hex key and driver")
    return key, driver, asker


def encode_share(key: str, asker: str, data: Sequence[Frame] | None, sha256: str = "", size: int = 0) -> list[Frame]:
    """SHARE: value ``key``'s bytes in ``data`` (frames of at most serialize.FRAME_BYTES), or None: gone."""
    head = encode_json(Msg.SHARE, {"key": key, "asker": asker, "found": data is not None, "sha256": sha256,
                                   "size": size})
    return [*head, *(data or ())]


class Share(NamedTuple):
    key: str
    asker: str  # routing id hex of the fetch socket ("" on the broker's way out)
    data: Sequence[Frame] | None  # None: the driver has no such value (released, or gone)
    sha256: str
    size: int


def decode_share(frames: Sequence[Frame], body: memoryview) -> Share:
    raw = decode_json(body)
    key, asker, sha, size = raw.get("key"), raw.get("asker", ""), raw.get("sha256", ""), raw.get("size", 0)
    if not _hex(key, 64) or not (asker == "" or _hex(asker, 64)) or not (sha == "" or _hex(sha, 64)) \
            or not _int(size) or size < 0:
        raise ProtocolError("SHARE with a malformed key, asker, sha256 or size")
    return Share(key, asker, list(frames[1:]) if raw.get("found") else None, sha, size)


def encode_share_drop(keys: Sequence[str]) -> list[Frame]:
    return encode_json(Msg.SHARE_DROP, {"keys": list(keys)})


def decode_share_drop(body: memoryview) -> list[str]:
    keys = decode_json(body).get("keys")
    if not isinstance(keys, list) or not all(_hex(k, 64) for k in keys):
        raise ProtocolError("SHARE_DROP without a list of hex keys")
    return keys


def decode_reclaimed(body: memoryview) -> tuple[set[int], list[int]]:
    """RECLAIMED: (the task ids given back, the ids asked for)."""
    raw = decode_json(body)
    granted, asked = raw.get("granted") or [], raw.get("asked") or []
    if not isinstance(granted, list) or not isinstance(asked, list) or not all(_int(i) for i in granted + asked):
        raise ProtocolError("RECLAIMED without lists of task ids")
    return set(granted), asked


# -- the payload manifest ---------------------------------------------------------

class Manifest(NamedTuple):
    """The second frame of a payload that is not inline (serialize.route writes it).

    ``[stream, manifest]``: the buffers are in segment ``shm`` (``size`` bytes)
    at ``bufs`` (offset, length). ``[stream, manifest, frames...]``: ``bufs``
    holds each buffer's length; with ``chunks``, each buffer is split into
    that many frames; with ``stream``, the pickle stream itself is that many frames.
    """

    shm: str | None
    size: int
    bufs: list[Any]
    stream: int | None
    chunks: list[int] | None


def decode_manifest(frame: Frame) -> Manifest:
    raw = decode_json(memoryview(frame))
    name, size, bufs = raw.get("shm"), raw.get("size", 0), raw.get("bufs")
    stream, chunks = raw.get("stream"), raw.get("chunks")
    if (name is not None and not isinstance(name, str)) or not _int(size) or not isinstance(bufs, list) \
            or (stream is not None and not _int(stream)) \
            or (chunks is not None and not (isinstance(chunks, list) and all(_int(c) for c in chunks))):
        raise ProtocolError("malformed payload manifest")
    return Manifest(name, size, bufs, stream, chunks)
