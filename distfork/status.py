"""Ask a broker for its status (``distfork status``, readiness checks in tests)."""

from __future__ import annotations

import os
from typing import Any

import zmq

from . import protocol
from .errors import ProtocolError
from .protocol import Msg

__all__ = ["query_status"]


def query_status(address: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """The broker's status snapshot; builtin ``TimeoutError`` if it does not answer in time."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"S" + os.urandom(8))
    try:
        sock.connect(address)
        sock.send_multipart(protocol.encode_signal(Msg.STATUS))
        if not sock.poll(timeout_s * 1000):
            raise TimeoutError(f"no distfork broker answered at {address} within {timeout_s:g} s")
        while True:
            frames = sock.recv_multipart()
            kind, body = protocol.decode(frames)
            if kind is Msg.STATUS_REPLY:
                return protocol.decode_json(body)
            if kind is Msg.REJECT:
                raise ProtocolError(f"the broker at {address} refused the status query")
            if not sock.poll(timeout_s * 1000):
                raise TimeoutError(f"no status reply from {address} within {timeout_s:g} s")
    finally:
        sock.close(linger=0)
