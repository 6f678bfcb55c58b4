"""``Window``: a counting semaphore for the driver's in-flight window, cheap when it is not full.

``threading.Semaphore`` is written in Python: each acquire and release
takes its condition and notifies, about a microsecond per task on the
driver's two busiest threads. Here a slot is a token: the ``n`` never taken
are a counter under a plain lock, and the ones given back wait in a
``queue.SimpleQueue`` (C code), where a blocked :meth:`Window.acquire`
picks them up. At most ``n`` slots are ever taken at once, as with
``Semaphore(n)``.
"""

from __future__ import annotations

import queue
import threading

__all__ = ["Window"]


class Window:
    """``n`` slots: :meth:`acquire` blocks while all are taken, :meth:`release` gives one back."""

    __slots__ = ("_fresh", "_lock", "_returned")

    def __init__(self, n: int) -> None:
        self._fresh = n  # slots never taken yet
        self._lock = threading.Lock()
        self._returned: queue.SimpleQueue[None] = queue.SimpleQueue()  # slots given back

    def acquire(self) -> None:
        if self._fresh:
            with self._lock:
                if self._fresh:
                    self._fresh -= 1
                    return
        self._returned.get()

    def release(self) -> None:
        self._returned.put(None)
