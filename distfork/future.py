"""``Future``: a ``concurrent.futures.Future`` that also speaks ``torch.futures``.

It works with ``concurrent.futures.wait`` / ``as_completed`` and
``asyncio`` (``await fut``), and has ``wait()``, ``value()``, ``done()`` and
``then(cb)`` as ``torch.futures.Future`` has.

Callbacks added with ``add_done_callback`` or ``then`` never run on the
driver's I/O thread: if they did, a callback that waits for another future
would wait for the very thread that has to deliver it. The driver sets
:data:`callback_runner` to move them to its callback thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Generator, Iterable
from typing import Any, Generic, TypeVar

__all__ = ["Future", "collect_all", "wait_all"]

T = TypeVar("T")
S = TypeVar("S")


class _CallbackRunner:
    """Runs callbacks of futures completed on a given thread on a thread of its own."""

    def __init__(self) -> None:
        self.io_threads: set[threading.Thread] = set()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def on_io_thread(self) -> bool:
        return threading.current_thread() in self.io_threads

    def submit(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="distfork-callbacks")
            pool = self._pool
        pool.submit(fn)


callback_runner = _CallbackRunner()


class Future(concurrent.futures.Future, Generic[T]):  # type: ignore[type-arg]
    """The result of a ``fork``, available once the task ends.

    ``result(timeout)`` / ``wait()`` return the value or raise the task's
    exception (its ``__cause__`` holds the remote traceback); a timeout
    raises the builtin ``TimeoutError`` and the task goes on.
    """

    def __init__(
        self,
        canceller: Callable[[Future[Any]], None] | None = None,
        reclaimer: Callable[[Future[Any]], None] | None = None,
    ) -> None:
        super().__init__()
        self._canceller = canceller
        # Inside a worker: before blocking, take the task back from the queue
        # and run it here, so a task waiting for its children never deadlocks.
        self._reclaimer = reclaimer

    def _reclaim(self) -> None:
        reclaimer, self._reclaimer = self._reclaimer, None
        if reclaimer is not None and not self.done():
            reclaimer(self)

    # concurrent.futures ------------------------------------------------------

    def result(self, timeout: float | None = None) -> T:
        """The task's value; raise its exception, or builtin ``TimeoutError`` after ``timeout`` s."""
        if self._reclaimer is not None:
            self._reclaim()
        try:
            return super().result(timeout)  # type: ignore[no-any-return]
        except concurrent.futures.TimeoutError as exc:
            if isinstance(exc, TimeoutError):  # Python >= 3.11: the same class
                raise
            raise TimeoutError(f"the task did not finish within {timeout} s; it goes on") from None

    def cancel(self) -> bool:
        """Cancel the task: queued, it never runs; already done, ``False``."""
        if not super().cancel():
            return False
        with self._condition:  # a second cancel() also returns True: recall the task once
            canceller, self._canceller = self._canceller, None
        if canceller is not None:
            canceller(self)
        return True

    def _invoke_callbacks(self) -> None:
        if self._done_callbacks and callback_runner.on_io_thread():
            callback_runner.submit(super()._invoke_callbacks)  # type: ignore[misc]
        else:
            super()._invoke_callbacks()  # type: ignore[misc]

    # torch.futures -----------------------------------------------------------

    def wait(self) -> T:
        """Block until the task ends; return its value or raise its exception."""
        return self.result()  # type: ignore[no-any-return]

    def value(self) -> T:
        """The value of a finished future (raises its exception); call ``wait()`` first."""
        if not self.done():
            raise concurrent.futures.InvalidStateError(
                "value() of a future that is not done yet; call wait() or result() to block for it"
            )
        return self.result()  # type: ignore[no-any-return]

    def then(self, callback: Callable[[Future[T]], S]) -> Future[S]:
        """A future of ``callback(self)``, run once this one is done.

        As in ``torch.futures``, the callback gets this future (call
        ``value()`` on it); if it raises, the returned future holds that
        exception.
        """
        chained: Future[S] = Future()

        def run(done: concurrent.futures.Future[Any]) -> None:
            try:
                result = callback(self)
            except BaseException as exc:  # noqa: BLE001 - handed to the chained future
                chained.set_exception(exc)
            else:
                chained.set_result(result)

        self.add_done_callback(run)
        return chained

    # asyncio -----------------------------------------------------------------

    def __await__(self) -> Generator[Any, None, T]:
        return asyncio.wrap_future(self).__await__()  # type: ignore[no-any-return]


def collect_all(futures: Iterable[Future[Any]]) -> Future[list[Future[Any]]]:
    """A future that completes with the list of ``futures`` once all are done."""
    futures = list(futures)
    combined: Future[list[Future[Any]]] = Future()
    remaining = len(futures)
    lock = threading.Lock()
    if not futures:
        combined.set_result([])
        return combined

    def one_done(_: concurrent.futures.Future[Any]) -> None:
        nonlocal remaining
        with lock:
            remaining -= 1
            last = remaining == 0
        if last:
            combined.set_result(futures)

    for fut in futures:
        fut.add_done_callback(one_done)
    return combined


def wait_all(futures: Iterable[Future[Any]], timeout: float | None = None) -> list[Any]:
    """Wait for every future; return their values in order.

    As ``torch.futures.wait_all``: the first failure is raised as soon as it
    happens, without waiting for the rest; builtin ``TimeoutError`` if not
    all are done after ``timeout`` seconds.
    """
    futures = list(futures)
    for f in futures:  # inside a worker: run the children still queued here, in order
        if isinstance(f, Future) and f._reclaimer is not None:
            f._reclaim()
    done, not_done = concurrent.futures.wait(
        futures, timeout=timeout, return_when=concurrent.futures.FIRST_EXCEPTION
    )
    if not_done:
        for f in futures:
            if f in done:
                f.result()  # a failure is raised at once, as torch.futures.wait_all does
        raise TimeoutError(f"{len(not_done)} of {len(futures)} futures not done after {timeout} s")
    return [f.result() for f in futures]
