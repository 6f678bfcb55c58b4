"""Multipart messages in and out of a ZeroMQ socket, at a fraction of pyzmq's per-frame cost.

pyzmq's ``send_multipart`` computes ``zmq.SNDMORE | flags`` for every
frame, and ``recv_multipart`` asks ``getsockopt(zmq.RCVMORE)`` after every
frame: both go through ``enum`` classes written in Python, about a
microsecond a frame. A batch of tasks or results is one frame per task, so
that was most of what a no-op task cost the driver's I/O thread in pyzmq.
:func:`send` and :func:`recv` do the same with plain ints and the received
frame's own ``more``. Same semantics: all frames or, if one is not a
buffer, none (``TypeError`` before anything is sent); ``copy=False`` as
``send_multipart(copy=False)`` (pyzmq still copies frames smaller than the
socket's ``copy_threshold``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq

__all__ = ["recv", "send"]

_MORE = int(zmq.SNDMORE)


def send(sock: zmq.Socket[Any], frames: Sequence[Any], flags: int = 0) -> None:
    """``sock.send_multipart(frames, flags, copy=False)``, without its per-frame enum arithmetic."""
    for f in frames:
        if type(f) is not bytes and not isinstance(f, (zmq.Frame, memoryview)):
            memoryview(f)  # TypeError now, before a part of the message is queued
    more = int(flags) | _MORE
    put = sock.send
    for f in frames[:-1]:
        put(f, more, copy=False)
    put(frames[-1], flags, copy=False)


def recv(sock: zmq.Socket[Any], flags: int = 0) -> list[zmq.Frame]:
    """``sock.recv_multipart(flags, copy=False)``: the frames of one message (``zmq.Again`` if none)."""
    get = sock.recv
    frame = get(flags, copy=False)
    frames = [frame]
    while frame.more:
        frame = get(flags, copy=False)
        frames.append(frame)
    return frames
