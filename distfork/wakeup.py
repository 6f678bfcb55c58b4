"""One wake-up pipe, the way every I/O thread of distfork is woken.

A thread that owns a socket waits in ``zmq.Poller.poll``; other threads (and
signal handlers) reach it by writing a byte to a pipe the poller also
watches (CPython's ``concurrent.futures.process._ThreadWakeup`` does the
same). Both ends are non-blocking: a full pipe means a wake-up is pending
anyway, and a write after :meth:`Wakeup.close` is ignored, never raised.
"""

from __future__ import annotations

import os
import threading

__all__ = ["Wakeup"]


class Wakeup:
    """A pipe: :meth:`wake` from any thread or a signal handler, :meth:`drain` in the polling thread.

    ``fd`` is what to register with the poller.
    """

    __slots__ = ("fd", "_w", "_closed", "_lock")

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._closed = False
        self._lock = threading.Lock()  # close() against a concurrent wake(): never write to a reused fd

    def wake(self) -> None:
        if self._closed:
            return
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._w, b"\0")
            except OSError:  # BlockingIOError: full, a wake-up is pending anyway
                pass

    def wake_from_signal(self) -> None:
        """:meth:`wake` for a signal handler (which must not take a lock its own thread may hold)."""
        if not self._closed:
            try:
                os.write(self._w, b"\0")
            except OSError:
                pass

    def drain(self) -> None:
        """Read the pending wake-ups (the owner, after its poll)."""
        try:
            while len(os.read(self.fd, 4096)) == 4096:
                pass
        except OSError:  # BlockingIOError: nothing (more) to read
            pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self.fd)
            os.close(self._w)
