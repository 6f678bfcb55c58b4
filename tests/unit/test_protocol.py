"""The wire protocol: round trips, and malformed input raising only ProtocolError."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distfork import protocol
from distfork.errors import ProtocolError
from distfork.protocol import DEFAULT_RETRIES, VERSION, Flag, Msg, ResultEntry, Status, TaskEntry


def _bytes(frames: list[object]) -> list[bytes]:
    return [bytes(f) for f in frames]  # type: ignore[call-overload]


# -- round trips ---------------------------------------------------------------


def _decode(kind: Msg, frames: list[Any], body: memoryview) -> list[Any]:
    """Tasks of a SUBMIT or TASKS, results of a RESULTS: each batch kind decodes to its own entry type."""
    got = (protocol.decode_results if kind is Msg.RESULTS else protocol.decode_tasks)(frames, body)
    assert all(type(e) is (protocol.ResultEntry if kind is Msg.RESULTS else protocol.TaskEntry) for e in got)
    return list(got)


def test_a_result_reads_as_status_and_run_time_a_task_as_retries_and_timeout() -> None:
    frames = protocol.encode_batch(Msg.RESULTS, [ResultEntry(3, Status.RAISED, 0.25, [b"exc"], Flag.RETAINED)])
    (result,) = protocol.decode_results(frames, protocol.decode(frames)[1])
    assert (result.id, result.status, result.run_s, result.flags) == (3, Status.RAISED, 0.25, Flag.RETAINED)
    frames = protocol.encode_batch(Msg.SUBMIT, [TaskEntry(4, 2, 1.5, [b"call"], Flag.NESTED)])
    (task,) = protocol.decode_tasks(frames, protocol.decode(frames)[1])
    assert (task.id, task.max_retries, task.timeout_s, task.flags) == (4, 2, 1.5, Flag.NESTED)


@pytest.mark.parametrize("kind", [Msg.SUBMIT, Msg.TASKS, Msg.RESULTS])
def test_batch_round_trip_keeps_ids_codes_extras_and_frames_in_order(kind: Msg) -> None:
    entries = [
        TaskEntry(1, DEFAULT_RETRIES, 0.0, [b"stream-1"]),
        TaskEntry(2**64 - 1, 0, 2.5, [b"stream-2", b"buf-a" * protocol.INLINE_MAX, b"buf-b"]),
        ResultEntry(7, Status.LOST, 0.125, []),
        TaskEntry(8, 3, 1e-3, [b""]),
    ]
    frames = protocol.encode_batch(kind, entries)
    assert len(frames) == 2  # small payload frames inline in the header, the large one its own frame

    decoded_kind, body = protocol.decode(frames)
    assert decoded_kind is kind
    got = _decode(kind, frames, body)

    assert [e.id for e in got] == [e.id for e in entries]
    assert [e[1] for e in got] == [e[1] for e in entries]  # max_retries / status
    # timeout_s / run_s travels as a 32-bit float
    assert [e[2] for e in got] == pytest.approx([e[2] for e in entries], rel=1e-6)
    assert [_bytes(list(e.frames)) for e in got] == [list(e.frames) for e in entries]


def test_small_payload_frames_travel_inline_up_to_a_budget_and_large_ones_as_their_own_frames() -> None:
    small, large = b"s" * protocol.INLINE_MAX, b"L" * (protocol.INLINE_MAX + 1)
    frames = protocol.encode_batch(Msg.TASKS, [TaskEntry(i, 1, 0.0, [small, large]) for i in range(3)])
    assert len(frames) == 4 and all(f is large for f in frames[1:])  # sent as they are: no copy
    many = protocol.INLINE_BUDGET // protocol.INLINE_MAX + 5
    frames = protocol.encode_batch(Msg.TASKS, [TaskEntry(i, 1, 0.0, [small]) for i in range(many)])
    assert len(frames[0]) < protocol.INLINE_BUDGET + 30 * many and len(frames) == 1 + 5
    got = protocol.decode_tasks(frames, protocol.decode(frames)[1])
    assert [bytes(e.frames[0]) for e in got] == [small] * many


def test_a_frame_table_naming_more_inline_bytes_than_there_are_is_a_protocol_error() -> None:
    frames = _bytes(protocol.encode_batch(Msg.RESULTS, [ResultEntry(1, Status.OK, 0.0, [b"abc"])]))
    cut = [frames[0][:-1]]
    with pytest.raises(ProtocolError, match="batch of 1 entries"):
        protocol.decode_results(cut, protocol.decode(cut)[1])


def test_empty_batch_round_trip() -> None:
    frames = protocol.encode_batch(Msg.RESULTS, [])
    kind, body = protocol.decode(frames)
    assert kind is Msg.RESULTS
    assert protocol.decode_results(frames, body) == []


def test_batch_decodes_from_memoryview_frames() -> None:
    frames = protocol.encode_batch(Msg.TASKS, [TaskEntry(5, 1, 0.5, [b"abc", b"de"])])
    views = [memoryview(f) for f in frames]
    kind, body = protocol.decode(views)
    (entry,) = protocol.decode_tasks(views, body)
    assert kind is Msg.TASKS
    assert (entry.id, entry.max_retries, entry.timeout_s) == (5, 1, 0.5)
    assert _bytes(list(entry.frames)) == [b"abc", b"de"]


@pytest.mark.parametrize(
    "body",
    [{}, {"role": "worker", "host": "h", "pid": 12, "slots": 2}, {"nested": {"list": [1, 2.5, None, "é"]}}],
)
def test_json_round_trip(body: dict[str, object]) -> None:
    frames = protocol.encode_json(Msg.HELLO, body)
    kind, raw = protocol.decode(frames)
    assert kind is Msg.HELLO
    assert protocol.decode_json(raw) == body


@pytest.mark.parametrize("ids", [[], [1], [0, 2**64 - 1, 42, 42]])
def test_cancel_round_trip(ids: list[int]) -> None:
    frames = protocol.encode_cancel(ids)
    kind, body = protocol.decode(frames)
    assert kind is Msg.CANCEL
    assert protocol.decode_cancel(body) == ids


@pytest.mark.parametrize("kind", list(Msg))
def test_signal_is_a_header_without_body(kind: Msg) -> None:
    frames = protocol.encode_signal(kind)
    assert _bytes(frames) == [bytes([VERSION, kind])]
    decoded, body = protocol.decode(frames)
    assert decoded is kind
    assert body.nbytes == 0


# -- malformed input -----------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([], "empty message"),
        ([b""], "header of 0 bytes"),
        ([bytes([VERSION])], "header of 1 bytes"),
        ([bytes([VERSION + 1, Msg.HEARTBEAT])], "protocol version"),
        ([bytes([0, Msg.HEARTBEAT])], "protocol version"),
        ([bytes([VERSION, 0])], "unknown message type 0"),
        ([bytes([VERSION, 200])], "unknown message type 200"),
    ],
)
def test_decode_rejects_bad_headers(frames: list[bytes], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.decode(frames)


def _results(*frame_counts: int) -> list[bytes]:
    """A well-formed RESULTS message whose entries carry ``frame_counts`` frames (too large to go inline)."""
    big = b"f" * (protocol.INLINE_MAX + 1)
    entries = [ResultEntry(i, Status.OK, 0.0, [big + b"%d" % j for j in range(n)]) for i, n in enumerate(frame_counts)]
    return _bytes(protocol.encode_batch(Msg.RESULTS, entries))


def _with_count(frames: list[bytes], count: int) -> list[bytes]:
    """``frames`` with the batch's u32 count (right after the 2-byte header) replaced."""
    head = frames[0]
    return [head[:2] + struct.pack("!I", count) + head[6:], *frames[1:]]


def _with_head(frames: list[bytes], head: bytes) -> list[bytes]:
    return [head, *frames[1:]]


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([bytes([VERSION, Msg.RESULTS])], "without a count"),
        ([bytes([VERSION, Msg.RESULTS]) + b"\0\0\0"], "without a count"),
        (_with_count(_results(), 1), "batch of 1 entries"),  # count says 1, no entry follows
        (_with_count(_results(0, 0), 1), "batch of 1 entries"),  # count says 1, 2 entries follow
        (_with_count(_results(0), 3), "batch of 3 entries"),  # count says 3, 1 entry follows
        (_with_head(_results(0), _results(0)[0] + b"x"), "batch of 1 entries"),  # a trailing byte
        (_results(2)[:-1], "more frames than the message's 2"),  # entry names 2 frames, 1 is there
        (_results(1, 1)[:-1], "more frames than the message's 2"),
        ([*_results(1), b"stray"], "1 frames no entry names"),
        ([*_results(), b"a", b"b"], "2 frames no entry names"),
    ],
)
def test_decode_batch_rejects_count_and_frame_mismatches(frames: list[bytes], match: str) -> None:
    kind, body = protocol.decode(frames)
    with pytest.raises(ProtocolError, match=match):
        protocol.decode_tasks(frames, body)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "without a count"),
        (b"\0\0", "without a count"),
        (struct.pack("!I", 2) + struct.pack("!Q", 1), "cancel of 2 ids"),
        (struct.pack("!I", 1) + struct.pack("!Q", 1) + b"\0", "cancel of 1 ids"),
        (struct.pack("!I", 0) + b"\0", "cancel of 0 ids"),
    ],
)
def test_decode_cancel_rejects_bad_bodies(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.decode_cancel(memoryview(body))


@pytest.mark.parametrize(
    "body", [b"", b"{", b"not json", b'{"a": }', b"\xff\xfe\xfd", b'{"a": 1} trailing', b"\x00\x01"]
)
def test_decode_json_rejects_bad_json(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="bad JSON body"):
        protocol.decode_json(memoryview(body))


@pytest.mark.parametrize(("body", "kind"), [(b"[1, 2]", "list"), (b"3", "int"), (b'"s"', "str"), (b"null", "NoneType")])
def test_decode_json_rejects_json_that_is_not_an_object(body: bytes, kind: str) -> None:
    with pytest.raises(ProtocolError, match=f"JSON body is a {kind}, expected an object"):
        protocol.decode_json(memoryview(body))


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_decode_json_rejects_deeply_nested_json(opener: bytes) -> None:
    # Hostile bytes must not blow the stack of whoever decodes them (a
    # RecursionError would escape the broker's "drop bad messages" handler).
    with pytest.raises(ProtocolError):
        protocol.decode_json(memoryview(opener * 200_000))


# -- property: only ProtocolError comes out ------------------------------------

# Size of one batch entry header, learned from the encoder (its layout is protocol.py's business):
# u64 id and u16 frame count first, as the module docstring documents.
_ENTRY_SIZE = len(protocol.encode_batch(Msg.RESULTS, [ResultEntry(0, 0, 0.0, [])])[0]) - 2 - 4

_header_bytes = st.one_of(
    st.binary(max_size=64),
    # Well-formed prefix for a known message type, random body: reaches the body decoders.
    st.builds(lambda kind, rest: bytes([VERSION, kind]) + rest, st.sampled_from(list(Msg)), st.binary(max_size=64)),
    # A plausible batch header: a small count and random entry bytes.
    st.builds(
        lambda kind, count, rest: bytes([VERSION, kind]) + struct.pack("!I", count) + rest,
        st.sampled_from([Msg.SUBMIT, Msg.TASKS, Msg.RESULTS, Msg.CANCEL]),
        st.integers(0, 4),
        st.binary(max_size=4 * 24),
    ),
    # A batch header of the right length for its count, entries of random bytes
    # but with small frame counts, so the frame bookkeeping is exercised.
    st.integers(0, 4).flatmap(
        lambda count: st.builds(
            lambda kind, entries: b"".join(
                [bytes([VERSION, kind]), struct.pack("!I", count), *entries]
            ),
            st.sampled_from([Msg.SUBMIT, Msg.TASKS, Msg.RESULTS]),
            st.lists(
                st.builds(
                    lambda key, nframes, rest: key + struct.pack("!H", nframes) + rest,
                    st.binary(min_size=8, max_size=8),
                    st.integers(0, 3),
                    st.binary(min_size=_ENTRY_SIZE - 10, max_size=_ENTRY_SIZE - 10),
                ),
                min_size=count,
                max_size=count,
            ),
        )
    ),
)
_messages = st.builds(
    lambda head, rest: [head, *rest], _header_bytes, st.lists(st.binary(max_size=16), max_size=6)
) | st.just([])


@settings(max_examples=400, deadline=None)
@given(_messages)
def test_decoding_random_frames_raises_only_protocol_error(frames: list[bytes]) -> None:
    try:
        kind, body = protocol.decode(frames)
    except ProtocolError:
        return
    assert isinstance(kind, Msg)
    for decoder in (
        lambda: protocol.decode_tasks(frames, body),
        lambda: protocol.decode_cancel(body),
        lambda: protocol.decode_json(body),
    ):
        try:
            decoder()
        except ProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=128))
def test_decode_json_of_random_bytes_raises_only_protocol_error(raw: bytes) -> None:
    try:
        value = protocol.decode_json(memoryview(raw))
    except ProtocolError:
        return
    assert isinstance(value, dict)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 255), st.floats(width=32, allow_nan=False),
                  st.lists(st.binary(max_size=8), max_size=3)),
        max_size=5,
    ),
    st.sampled_from([Msg.SUBMIT, Msg.TASKS, Msg.RESULTS]),
)
def test_batch_round_trip_property(raw: list[tuple[int, int, float, list[bytes]]], kind: Msg) -> None:
    entries = [TaskEntry(i, c, x, f) for i, c, x, f in raw]
    frames = protocol.encode_batch(kind, entries)
    decoded_kind, body = protocol.decode(frames)
    got = _decode(kind, frames, body)
    assert decoded_kind is kind
    assert [(e[0], e[1], e[2], _bytes(list(e.frames))) for e in got] == [
        (i, c, x, f) for i, c, x, f in raw
    ]


@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=50))
def test_dependency_ids_round_trip(ids: list[int]) -> None:
    assert protocol.decode_deps(protocol.encode_deps(ids)) == ids


@given(st.lists(st.lists(st.binary(max_size=8), min_size=1, max_size=4), min_size=1, max_size=5),
       st.lists(st.binary(max_size=8), min_size=1, max_size=4))
def test_a_task_payload_with_dependency_values_splits_back(deps: list[list[bytes]], call: list[bytes]) -> None:
    frames = [protocol.encode_dep_counts([len(d) for d in deps]), *[f for d in deps for f in d], *call]
    got_deps, got_call = protocol.decode_dep_counts(frames)
    assert [list(d) for d in got_deps] == deps and list(got_call) == call


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([], "no payload"),
        ([b"abc"], "multiple of 4"),
        ([struct.pack("!I", 0), b"call"], "dependency of 0 frames"),
        ([struct.pack("!I", 3), b"v", b"call"], "dependency of 3 frames"),
        ([struct.pack("!I", 1), b"v"], "no call"),
    ],
)
def test_a_malformed_dependency_frame_is_a_protocol_error(frames: list[bytes], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.decode_dep_counts(frames)


@pytest.mark.parametrize("frame", [b"", b"1234567"])
def test_a_malformed_dependency_id_frame_is_a_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError, match="multiple of 8"):
        protocol.decode_deps(frame)
