"""Results the broker holds for a driver, and the fetching of their values (driver side).

A task's result that other tasks took as an argument stays in the broker
(``Flag.HELD``): its future is done with the value ``REMOTE``, and
``result()`` fetches it (FETCH), from a user thread, through
:meth:`HeldValues.fetch`; a held future dropped unfetched is released
(RELEASE). The driver's I/O thread sends what :meth:`take_fetches` and
:meth:`take_releases` return and completes fetches with :meth:`fetched`.

Which thread touches what:

====================  ==========================================================
field                 threads
====================  ==========================================================
``held``              I/O thread writes (hold, fetched, take_releases,
                      resubmit); user threads read single keys
                      (``Driver.reference``, atomic under the GIL); close() clears
``fetching``          under ``lock``: user threads add (fetch, prefetch), the
                      I/O thread pops (fetched), close and failures end them all
``fetches``           deque: user threads append, the I/O thread drains
``releases``          deque: any thread appends (GC of a held future), the I/O
                      thread drains
====================  ==========================================================
"""

from __future__ import annotations

import collections
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import InvalidStateError
from typing import Any, NamedTuple

from . import shm
from .errors import DistforkError
from .future import REMOTE, Future
from .protocol import ResultEntry, TaskEntry

__all__ = ["Held", "HeldValues"]

log = logging.getLogger(__name__)


class Held(NamedTuple):
    """A result the broker holds for us."""

    future: weakref.ref[Future[Any]]
    entry: TaskEntry  # the task, to run it again if the broker restarts and loses the value
    segment: shm.Segment | None  # the task's argument segment, kept for that too
    value_segment: str | None  # the shared-memory segment the value is in, if any


class _Fetch:
    """A user thread waiting for a held value."""

    __slots__ = ("event", "value", "error")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class HeldValues:
    """The held results of one driver; ``wake`` wakes its I/O thread, ``closing`` says it is shutting down."""

    def __init__(self, wake: Callable[[], None], closing: Callable[[], bool]) -> None:
        self._wake = wake
        self._closing = closing
        self.held: dict[int, Held] = {}
        self.fetching: dict[int, _Fetch] = {}
        self.lock = threading.Lock()
        self.fetches: collections.deque[int] = collections.deque()
        self.releases: collections.deque[int] = collections.deque()

    def __contains__(self, task_id: int) -> bool:
        return task_id in self.held

    # -- the I/O thread -------------------------------------------------------------

    def hold(self, fut: Future[Any], entry: TaskEntry, segment: shm.Segment | None, result: ResultEntry) -> None:
        """Tasks took this result as an argument: the broker keeps it; the future is done, its value remote."""
        value_segment = bytes(result.frames[0]).decode(errors="replace") if result.frames else None
        self.held[result.id] = Held(weakref.ref(fut), entry, segment, value_segment)
        try:
            fut.set_result(REMOTE)
        except InvalidStateError:  # cancelled meanwhile
            self.drop(result.id)
            return
        weakref.finalize(fut, self.drop, result.id).atexit = False  # at exit, closing frees everything

    def fetched(self, e: ResultEntry, value: Any, error: BaseException | None) -> Held:
        """A held value we asked for (or a held task run again after a broker restart) arrived
        (``value``/``error``: its outcome); returns what was held, for its segment."""
        held = self.held.pop(e.id)
        fut = held.future()
        with self.lock:
            if fut is not None:
                with fut._condition:  # cf.Future's own lock
                    if error is None:
                        fut._result = value
                    else:
                        fut._result, fut._exception = None, error
            waiter = self.fetching.pop(e.id, None)
        if waiter is not None:
            waiter.value, waiter.error = value, error
            waiter.event.set()
        return held

    def take_fetches(self) -> list[int]:
        return [self.fetches.popleft() for _ in range(len(self.fetches))]

    def take_releases(self, free: Callable[[shm.Segment | None], None]) -> list[int]:
        """Held futures dropped unfetched: forget them (``free`` their argument segments); their ids."""
        ids = []
        while self.releases:
            held = self.held.pop(self.releases.popleft(), None)
            if held is not None:
                free(held.segment)
                ids.append(held.entry.id)
        return ids

    def resubmit(self, pending: set[int]) -> list[TaskEntry]:
        """To a restarted broker, which lost them: the held tasks to run again (those not in ``pending``);
        the fetches asked for are asked again."""
        again = []
        for task_id, held in list(self.held.items()):
            if held.value_segment is not None:  # the old broker's hold: nobody else will free it now
                shm.unlink(held.value_segment)
                self.held[task_id] = held._replace(value_segment=None)
            if held.entry.id not in pending:
                again.append(held.entry)
        with self.lock:
            self.fetches.extend(self.fetching)
        return again

    def close(self, free: Callable[[shm.Segment | None], None]) -> None:
        for held in self.held.values():
            free(held.segment)
        self.held.clear()
        self.end(DistforkError("this distfork driver was shut down before a held value was fetched"))

    # -- user threads ---------------------------------------------------------------

    def fetch(self, fut: Future[Any], timeout: float | None) -> Any:
        """Bring a held value here; the future keeps it afterwards."""
        with self.lock:
            if not fut.held:
                return fut.result(0)  # fetched by another thread meanwhile
            if self._closing():
                raise DistforkError("this distfork driver was shut down; its held values are gone")
            waiter = self._request(fut)
        self._wake()
        if not waiter.event.wait(timeout):
            raise TimeoutError(f"the value held in the cluster did not arrive within {timeout} s")
        if waiter.error is not None:
            raise waiter.error
        return waiter.value

    def _request(self, fut: Future[Any]) -> _Fetch:
        """The fetch of a held value, asked for once (hold ``lock``)."""
        waiter = self.fetching.get(fut.task_id)
        if waiter is None:
            waiter = self.fetching[fut.task_id] = _Fetch()
            self.fetches.append(fut.task_id)
        return waiter

    def prefetch(self, futures: Sequence[Future[Any]], driver: object) -> None:
        """Ask for the held values among ``futures`` (of ``driver``) at once: one round trip for all."""
        with self.lock:
            if self._closing():
                return
            for fut in futures:
                if fut.driver is driver and fut.held:
                    self._request(fut)
        self._wake()

    def end(self, error: BaseException) -> None:
        """Fail every fetch still waiting (shutdown, or the driver failed)."""
        with self.lock:
            waiters = list(self.fetching.values())
            self.fetching.clear()
        for w in waiters:
            w.error = error
            w.event.set()

    # -- any thread -----------------------------------------------------------------

    def drop(self, task_id: int) -> None:
        """A held future was garbage-collected: the broker may free the value."""
        if not self._closing():
            self.releases.append(task_id)
            self._wake()
