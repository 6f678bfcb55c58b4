"""A result entry turned into a future's value or exception (driver side, and a reclaimed task).

Status codes and payloads are described in protocol.py (:class:`~distfork.protocol.Status`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import InvalidStateError
from typing import Any

from . import serialize
from .errors import DistforkError, SerializationError, WorkerLostError
from .future import Future, settle
from .protocol import Status

__all__ = ["complete", "failure", "outcome"]

_OK = int(Status.OK)
_CANCELLED_STATES = frozenset(("CANCELLED", "CANCELLED_AND_NOTIFIED"))  # concurrent.futures' names


def complete(
    fut: Future[Any], code: int, frames: Sequence[Any], on_free: Callable[[str], None] | None = None
) -> None:
    """Set a future from a result entry (status code and payload frames).

    ``on_free``: where a result's shared-memory segment goes once nothing
    maps it (else it is unlinked as soon as it is mapped).
    """
    if code == _OK and len(frames) == 1 and fut._state not in _CANCELLED_STATES:
        # The common case, the short way: a small value, inline (no segment to map or free).
        try:
            value = pickle.loads(frames[0])
        except Exception as err:  # noqa: BLE001
            settle(fut, exception=_unpickling_failed(err))
            return
        try:
            fut.set_result(value)
        except InvalidStateError:
            pass  # a user thread cancelled it just now
        return
    if fut.cancelled():
        serialize.free(frames)
        return
    if code == Status.CANCELLED:  # a future among its arguments was cancelled
        fut.cancel()
        return
    value, error = outcome(code, frames, on_free)
    settle(fut, value, error)  # unless a user thread cancelled it just now


def outcome(
    code: int, frames: Sequence[Any], on_free: Callable[[str], None] | None
) -> tuple[Any, BaseException | None]:
    """A result entry's value, or the exception to raise instead."""
    if code != Status.OK:
        return None, failure(code, frames)
    try:
        return serialize.unpack(frames, private=False, on_free=on_free), None
    except Exception as err:  # noqa: BLE001
        return None, _unpickling_failed(err)


def _unpickling_failed(err: Exception) -> SerializationError:
    return SerializationError(f"the task's result cannot be unpickled in the driver: {type(err).__name__}: {err}")


def failure(code: int, frames: Sequence[Any]) -> BaseException:
    if code == Status.RAISED:
        try:
            exc = serialize.unpack(frames, private=False)
        except Exception as err:  # noqa: BLE001
            return SerializationError(
                f"the task raised an exception that cannot be unpickled in the driver: {type(err).__name__}: {err}"
            )
        if isinstance(exc, BaseException):
            return exc
        return DistforkError(f"the task sent back a non-exception as its error: {exc!r}")
    text = bytes(frames[0]).decode(errors="replace") if frames else ""
    if code == Status.LOST:
        return WorkerLostError(text)
    if code == Status.TIMED_OUT:
        return TimeoutError(text)
    return DistforkError(text or f"the task failed with status {code}")
