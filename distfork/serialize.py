"""The one serialization path: cloudpickle, pickle protocol 5, out-of-band buffers.

``dumps(obj)`` gives a list of frames ``[stream, *buffers]``: the pickle
stream, then every buffer of at least ``oob_threshold_bytes`` that the
pickler handed out of band (numpy arrays, ``bytes``-like objects wrapped in
``pickle.PickleBuffer``). ``loads(frames)`` is its inverse. Where the
buffers travel (their own ZeroMQ frame, or a shared-memory segment) is the
business of the caller; this module only splits and joins.

Functions and classes defined in ``__main__`` or interactively are pickled by
value (cloudpickle), everything importable by reference.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

from .errors import SerializationError

__all__ = ["describe", "dumps", "dumps_call", "loads"]

PROTOCOL = 5


def dumps(obj: Any, oob_threshold_bytes: int) -> list[Any]:
    """Pickle ``obj``; large buffers become frames of their own."""
    buffers: list[Any] = []

    def keep_out_of_band(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < oob_threshold_bytes:
            return True  # small: serialize in band
        buffers.append(raw)
        return False

    stream = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=keep_out_of_band)
    return [stream, *buffers]


def loads(frames: Sequence[Any]) -> Any:
    """Unpickle ``[stream, *buffers]`` as made by :func:`dumps`."""
    return pickle.loads(frames[0], buffers=frames[1:])


def describe(obj: Any) -> str:
    """A short, safe description of an object for an error message."""
    try:
        text = repr(obj)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = object.__repr__(obj)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} (type {type(obj).__module__}.{type(obj).__qualname__})"


def dumps_call(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], oob_threshold_bytes: int
) -> list[Any]:
    """Pickle a call ``(func, args, kwargs)``; name the culprit if it cannot be pickled."""
    try:
        return dumps((func, args, kwargs), oob_threshold_bytes)
    except Exception as exc:  # noqa: BLE001 - any pickling failure is the user's object
        culprit = _find_unpicklable(func, args, kwargs)
        raise SerializationError(
            f"cannot pickle {culprit}: {type(exc).__name__}: {exc}. "
            "Everything passed to fork must be picklable by cloudpickle: pass plain data, "
            "or create the object inside the task instead"
        ) from exc


def _find_unpicklable(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    candidates: list[tuple[str, Any]] = [("the function " + describe(func), func)]
    candidates += [(f"argument {i} {describe(a)}", a) for i, a in enumerate(args)]
    candidates += [(f"keyword argument {k}={describe(v)}", v) for k, v in kwargs.items()]
    for label, value in candidates:
        try:
            cloudpickle.dumps(value, protocol=PROTOCOL, buffer_callback=lambda b: False)
        except Exception:  # noqa: BLE001
            return label
    return "the call"


class _RemoteException:
    """An exception with its remote traceback text, rebuilt with it as ``__cause__``."""

    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exc = exc
        self.tb = tb

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _rebuild_remote_exception, (self.exc, self.tb)


def _rebuild_remote_exception(exc: BaseException, tb: str) -> BaseException:
    from .errors import RemoteTraceback

    exc.__cause__ = RemoteTraceback(tb)
    return exc


def dumps_exception(exc: BaseException, where: str, oob_threshold_bytes: int) -> list[Any]:
    """Pickle an exception raised in a task, with its traceback text as its future cause.

    If the exception itself cannot be pickled, a :class:`RemoteError` with its
    type, text and traceback is sent instead.
    """
    import traceback

    from .errors import RemoteError

    tb = "".join(traceback.format_exception(exc))
    text = f'\n"""\nTraceback in {where}:\n{tb}"""'
    try:
        frames = dumps(_RemoteException(exc, text), oob_threshold_bytes)
        loads(frames)  # an exception that pickles but cannot be rebuilt fails here, not in the driver
        return frames
    except Exception:  # noqa: BLE001
        substitute = RemoteError(
            f"the task raised {type(exc).__module__}.{type(exc).__qualname__}: {exc}, "
            "which could not be pickled to send it back; the remote traceback is the cause"
        )
        return dumps(_RemoteException(substitute, text), oob_threshold_bytes)
