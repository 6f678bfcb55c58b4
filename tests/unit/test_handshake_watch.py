"""HandshakeWatch: a refusal is final at once; handshakes cut short count only when they repeat."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
import zmq

from distfork import security

ADDRESS = "tcp://broker:7340"


@pytest.fixture
def monitor() -> Iterator[tuple[zmq.Socket, security.HandshakeWatch]]:  # type: ignore[type-arg]
    """A fake monitor: events written to one end of an inproc PAIR, read by the watch at the other."""
    ctx = zmq.Context()
    feed, read = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    feed.bind("inproc://monitor")
    read.connect("inproc://monitor")
    try:
        yield feed, security.HandshakeWatch(read, ADDRESS)
    finally:
        feed.close(0)
        read.close(0)
        ctx.term()


def events(feed: zmq.Socket, watch: security.HandshakeWatch, *kinds: int) -> list[str | None]:  # type: ignore[type-arg]
    out = []
    for kind in kinds:
        feed.send_multipart([struct.pack("=hi", kind, 0), ADDRESS.encode()])  # libzmq's monitor frame layout
        out.append(watch.check())
    return out


def test_a_refused_key_is_final_at_once(monitor) -> None:  # type: ignore[no-untyped-def]
    (text,) = events(*monitor, zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    assert text is not None and "refused our key" in text and ADDRESS in text


def test_mismatched_security_is_final_at_once(monitor) -> None:  # type: ignore[no-untyped-def]
    (text,) = events(*monitor, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    assert text is not None and "one side uses keys" in text


def test_handshakes_cut_short_are_a_refusal_only_when_they_repeat(monitor) -> None:  # type: ignore[no-untyped-def]
    dropped = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    # A broker restarting mid-handshake: one or two cut short, then a success; the count starts again.
    assert events(*monitor, dropped, dropped, zmq.EVENT_HANDSHAKE_SUCCEEDED) == [None, None, None]
    outcomes = events(*monitor, *[dropped] * security.DROPPED_HANDSHAKES)
    assert outcomes[:-1] == [None] * (security.DROPPED_HANDSHAKES - 1)
    assert outcomes[-1] is not None and "broker's public key we were given is wrong" in outcomes[-1]
