"""Payloads larger than serialize.FRAME_BYTES travel as several frames and come back whole (issue 11)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import zmq

from distfork import serialize

SMALL = 1000  # FRAME_BYTES for these tests


@pytest.fixture(autouse=True)
def small_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serialize, "FRAME_BYTES", SMALL)


def _over_the_wire(frames: list[Any]) -> list[zmq.Frame]:
    """What a receiver gets: one ZeroMQ frame per frame sent (copied, as through a socket)."""
    return [zmq.Frame(bytes(memoryview(f).cast("B"))) for f in frames]


@pytest.mark.parametrize("n", [0, 1, 999, 1000, 1001, 2000, 5555])
def test_buffers_of_any_size_cross_as_bounded_frames(n: int) -> None:
    value = {"a": np.arange(n, dtype=np.uint8), "b": np.arange(n * 3, dtype=np.float64), "c": b"x" * n}
    frames, seg = serialize.route(serialize.dumps(value, oob_threshold_bytes=64), None)
    assert seg is None
    assert all(memoryview(f).nbytes <= SMALL for f in frames), [memoryview(f).nbytes for f in frames]
    back = serialize.unpack(_over_the_wire(frames), private=False)
    np.testing.assert_array_equal(back["a"], value["a"])
    np.testing.assert_array_equal(back["b"], value["b"])
    assert back["c"] == value["c"]
    back["b"][:1] = 7  # received arrays are writable


def test_a_large_pickle_stream_is_split_too() -> None:
    value = list(range(5000))  # in band: no out-of-band buffer at all
    frames, _ = serialize.route(serialize.dumps(value, oob_threshold_bytes=64), None)
    assert len(frames) > 2 and all(memoryview(f).nbytes <= SMALL for f in frames)
    assert serialize.unpack(_over_the_wire(frames), private=False) == value


def test_a_split_stream_and_split_buffers_together() -> None:
    value = (list(range(3000)), np.arange(4000, dtype=np.int32), [np.ones(10), np.zeros(700)])
    frames, _ = serialize.route(serialize.dumps(value, oob_threshold_bytes=64), None)
    assert all(memoryview(f).nbytes <= SMALL for f in frames)
    back = serialize.unpack(_over_the_wire(frames), private=False)
    assert back[0] == value[0]
    np.testing.assert_array_equal(back[1], value[1])
    np.testing.assert_array_equal(back[2][1], value[2][1])


def test_payloads_within_one_frame_keep_the_old_layout() -> None:
    value = np.arange(100, dtype=np.uint8)
    frames, _ = serialize.route(serialize.dumps(value, oob_threshold_bytes=64), None)
    assert len(frames) == 3 and b"chunks" not in bytes(frames[1])
