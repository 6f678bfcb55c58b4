"""``multipart.send`` / ``recv``: pyzmq's ``send_multipart`` / ``recv_multipart``, cheaper per frame."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from distfork import multipart

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://test-multipart")
    b.connect("inproc://test-multipart")
    try:
        yield a, b
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


def test_frames_of_every_buffer_kind_arrive_as_one_message_in_order(pair: Any) -> None:
    a, b = pair
    big = np.arange(100_000, dtype=np.uint8)  # above pyzmq's copy threshold: sent without a copy
    parts = [b"head", memoryview(b"view"), bytearray(b"array"), zmq.Frame(b"frame"), big, b""]
    multipart.send(a, parts)
    multipart.send(a, [b"alone"])
    got = multipart.recv(b)
    assert [bytes(f) for f in got] == [b"head", b"view", b"array", b"frame", big.tobytes(), b""]
    assert [bytes(f) for f in multipart.recv(b, zmq.NOBLOCK)] == [b"alone"]
    with pytest.raises(zmq.Again):
        multipart.recv(b, zmq.NOBLOCK)


def test_a_part_that_is_no_buffer_sends_nothing(pair: Any) -> None:
    a, b = pair
    with pytest.raises(TypeError):
        multipart.send(a, [b"first", "text is no buffer"])
    multipart.send(a, [b"next"])
    assert [bytes(f) for f in multipart.recv(b)] == [b"next"]  # no half message before it
