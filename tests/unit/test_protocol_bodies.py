"""JSON bodies are decoded and validated in protocol.py: hostile or malformed ones are a ProtocolError,
never a KeyError/ValueError deep in a handler; roles are an enum that is a plain string on the wire."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import pytest

from distfork import protocol
from distfork.errors import ProtocolError
from distfork.protocol import Keepalive, Msg, Role
from distfork.wakeup import Wakeup


def body(kind: Msg, value: Any) -> memoryview:
    frames = [bytes([protocol.VERSION, kind]) + json.dumps(value).encode()]
    return protocol.decode(frames)[1]


def test_a_role_travels_as_its_plain_string_and_compares_equal_to_it() -> None:
    (frame,) = protocol.encode_json(Msg.HELLO, {"role": Role.DRIVER})
    assert frame[2:] == b'{"role":"driver"}'
    assert Role.WORKER == "worker" and Role("driver") is Role.DRIVER
    assert protocol.decode_hello(body(Msg.HELLO, {"role": "worker", "slots": 3})) == (
        Role.WORKER, {"role": "worker", "slots": 3})


@pytest.mark.parametrize("hello", [
    {}, {"role": "admin"}, {"role": ["driver"]}, {"role": "worker", "slots": 0}, {"role": "worker", "slots": "2"},
    {"role": "worker", "slots": True}, {"role": "worker", "slots": 1e400},
])
def test_a_hello_without_a_known_role_or_with_bad_slots_is_a_protocol_error(hello: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_hello(body(Msg.HELLO, hello))


def test_a_keepalive_is_decoded_to_peer_ids_and_its_facts() -> None:
    raw = {"peers": [b"W1".hex(), b"W2".hex()], "bye": True, "timed_out": [5, 7], "rss": 123, "cancelled": False}
    assert protocol.decode_keepalive(body(Msg.KEEPALIVE, raw)) == Keepalive(
        [b"W1", b"W2"], True, 123, frozenset({5, 7}), False)
    plain = protocol.decode_keepalive(body(Msg.KEEPALIVE, {"peers": [], "rss": -1}))
    assert plain == Keepalive([]) and plain.rss_bytes is None  # a negative RSS is not a fact


@pytest.mark.parametrize("raw", [
    {}, {"peers": "W1"}, {"peers": [1]}, {"peers": ["zz"]}, {"peers": [], "timed_out": ["5"]},
    {"peers": [], "timed_out": 5},
])
def test_a_malformed_keepalive_is_a_protocol_error(raw: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_keepalive(body(Msg.KEEPALIVE, raw))


@pytest.mark.parametrize("raw", [{}, {"host": "h", "pid": "1", "code": 0}, {"host": 1, "pid": 1, "code": 0},
                                 {"host": "h", "pid": 1, "code": 1.5}, {"host": "h", "pid": True, "code": 0}])
def test_a_malformed_exited_is_a_protocol_error(raw: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_exited(body(Msg.EXITED, raw))


def test_exited_recycle_output_code_get_and_reclaimed_decode_to_typed_values() -> None:
    assert protocol.decode_exited(body(Msg.EXITED, {"host": "h", "pid": 4, "code": -9, "oom": True})) == (
        "h", 4, -9, True)
    assert protocol.decode_recycle(body(Msg.RECYCLE, {"names": ["a", "b"]})) == ["a", "b"]
    with pytest.raises(ProtocolError):
        protocol.decode_recycle(body(Msg.RECYCLE, {"names": ["a", 5]}))
    assert protocol.decode_recycle(body(Msg.RECYCLE, {"names": ["a", 5]}), strict=False) == ["a"]
    out = protocol.decode_output(body(Msg.OUTPUT, {"peer": b"W".hex(), "key": 3, "lines": []}))
    assert (out.peer, out.key) == (b"W", 3)
    with pytest.raises(ProtocolError):
        protocol.decode_output(body(Msg.OUTPUT, {"peer": "not hex", "key": 3, "lines": []}))
    assert protocol.decode_code_get(body(Msg.CODE_GET, {"hash": "a" * 64})) == "a" * 64
    with pytest.raises(ProtocolError):
        protocol.decode_code_get(body(Msg.CODE_GET, {"hash": "a" * 63}))
    assert protocol.decode_reclaimed(body(Msg.RECLAIMED, {"granted": [2], "asked": [1, 2]})) == ({2}, [1, 2])
    with pytest.raises(ProtocolError):
        protocol.decode_reclaimed(body(Msg.RECLAIMED, {"granted": "all", "asked": [1]}))


def test_the_payload_manifest_is_parsed_in_one_place_and_a_malformed_one_is_refused() -> None:
    m = protocol.decode_manifest(b'{"shm": "df-x", "size": 64, "bufs": [[0, 8]]}')
    assert (m.shm, m.size, m.bufs, m.stream, m.chunks) == ("df-x", 64, [[0, 8]], None, None)
    for bad in (b"[]", b'{"bufs": 3}', b'{"shm": 5, "bufs": []}', b'{"bufs": [], "chunks": ["2"]}', b"\xff"):
        with pytest.raises(ProtocolError):
            protocol.decode_manifest(bad)


def test_a_wakeup_wakes_a_poller_drains_and_ignores_wakes_after_close() -> None:
    import zmq

    w = Wakeup()
    poller = zmq.Poller()
    poller.register(w.fd, zmq.POLLIN)
    assert dict(poller.poll(0)) == {}
    threads = [threading.Thread(target=w.wake) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert w.fd in dict(poller.poll(1000))
    w.drain()
    assert dict(poller.poll(0)) == {}
    for _ in range(100_000 // 4096 + 20):  # more than a pipe holds: never blocks, never raises
        w.wake()
    w.drain()
    assert dict(poller.poll(0)) == {}
    fd = w.fd
    w.close()
    w.close()
    w.wake()  # after close: ignored (the fd number may belong to another file by now)
    w.wake_from_signal()
    with pytest.raises(OSError):
        os.fstat(fd)
