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

import collections
import concurrent.futures
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

if TYPE_CHECKING:  # imported where used: every worker process imports this module at start
    import asyncio

__all__ = ["Future", "as_completed", "collect_all", "wait_all"]

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
        try:
            with self._lock:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="distfork-callbacks")
                pool = self._pool
            pool.submit(fn)
        except RuntimeError:  # the interpreter is shutting down: no new threads; run it here
            fn()


callback_runner = _CallbackRunner()


class _Remote:
    """The result of a future whose value is held in the cluster: fetched when asked for."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<value held in the cluster>"


REMOTE: Any = _Remote()


_DONE_STATES = frozenset(("CANCELLED", "CANCELLED_AND_NOTIFIED", "FINISHED"))  # concurrent.futures' names


class _Condition(threading.Condition):
    """What ``threading.Condition()`` is to a ``concurrent.futures.Future``, lighter to make.

    ``Condition.__init__`` binds five methods of its RLock per instance: with
    thousands of futures in flight, that is five objects more each for the
    garbage collector to walk, again and again. Here the same methods are
    looked up on the lock when called; everything else is ``Condition``'s.
    """

    def __init__(self) -> None:  # not Condition.__init__: it binds what the methods below reach
        self._lock = threading.RLock()
        self._waiters: collections.deque[Any] = collections.deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def _release_save(self) -> Any:
        return self._lock._release_save()  # type: ignore[attr-defined]

    def _acquire_restore(self, state: Any) -> None:
        self._lock._acquire_restore(state)  # type: ignore[attr-defined]

    def _is_owned(self) -> bool:
        return self._lock._is_owned()  # type: ignore[attr-defined,no-any-return]


class Future(concurrent.futures.Future, Generic[T]):  # type: ignore[type-arg]
    """The result of a ``fork``, available once the task ends.

    ``result(timeout)`` / ``wait()`` return the value or raise the task's
    exception (its ``__cause__`` holds the remote traceback); a timeout
    raises the builtin ``TimeoutError`` and the task goes on.
    """

    def __init__(
        self,
        canceller: Callable[[Future[Any]], None] | None = None,
        reclaimer: Callable[[Future[Any], bool], None] | None = None,
    ) -> None:
        # concurrent.futures.Future.__init__'s fields, with the lighter condition (see _Condition);
        # test_future_contract checks that no field of it is missing.
        self._condition = _Condition()
        self._state = "PENDING"
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []
        self._canceller = canceller
        # Inside a worker: before blocking, take the task back from the queue
        # and run it here, so a task waiting for its children never deadlocks.
        self._reclaimer = reclaimer
        #: The driver's id of the task, and the driver (None: not a task's future). A value the
        #: broker holds (result REMOTE) is fetched through ``driver._fetch``.
        self.task_id = 0
        self.driver: Any = None
        self.direct = False  # sent straight to a worker slot (distfork/direct.py)
        self._output: list[str] | None = None  # lines the task printed or logged (distfork/output.py)

    @property
    def output(self) -> str:
        """What the task printed and logged so far, one line per line (``""``: nothing, or inline mode)."""
        return "".join(line + "\n" for line in self._output or ())

    def add_output(self, lines: list[str], dropped: int = 0) -> None:
        """The driver's I/O thread: more lines of the task (``dropped``: lines the worker did not send)."""
        if self._output is None:
            self._output = []
        self._output.extend(lines)
        if dropped:
            self._output.append(f"[{dropped} lines dropped: over output_task_bytes]")

    def _reclaim(self, local: bool = True) -> None:
        """Inside a worker: if the task has not started, run it in this thread.

        ``local``: also take it if it was not even sent yet. A waiter that wants
        any one of several futures (``as_completed``) passes False: running
        one here would hold back the others, so it only takes a task that the
        broker says nobody can start now.
        """
        reclaimer = self._reclaimer
        if reclaimer is None or self.done():
            return
        if local:
            self._reclaimer = None  # one try: afterwards it runs elsewhere, or here
        reclaimer(self, local)

    def result(self, timeout: float | None = None) -> T:
        """The task's value; raise its exception, or builtin ``TimeoutError`` after ``timeout`` s."""
        have = False
        if self._state == "FINISHED":  # done: the short way, under the lock (held.py may swap a value in)
            with self._condition._lock:  # type: ignore[attr-defined]
                value, have = self._result, self._exception is None
        if not have:
            if self._reclaimer is not None:
                self._reclaim()
            elif self.direct:  # sent straight to a slot: this thread reads the reply itself
                began = time.monotonic()
                self.driver.direct_wait(self, timeout)
                if timeout is not None:
                    timeout = max(0.0, timeout - (time.monotonic() - began))
            try:
                value = super().result(timeout)
            except concurrent.futures.TimeoutError as exc:
                if isinstance(exc, TimeoutError):  # Python >= 3.11: the same class
                    raise
                raise TimeoutError(f"the task did not finish within {timeout} s; it goes on") from None
        if value is REMOTE:
            # Other tasks took this value as an argument, so the broker kept it; it comes here now.
            return self.driver._fetch(self, timeout)  # type: ignore[no-any-return]
        return value  # type: ignore[no-any-return]

    @property
    def held(self) -> bool:
        """Done, with its value still held in the cluster (it is fetched by ``result()``)."""
        return self._result is REMOTE and self._state == "FINISHED"

    def cancel(self) -> bool:
        """Cancel the task: queued, it never runs; already done, ``False``.

        No executor thread ever picks a distfork future up, so a cancelled
        future is marked notified at once (``concurrent.futures.wait`` sees
        it done); a later ``set_running_or_notify_cancel()`` returns False,
        as for a cancelled ``concurrent.futures.Future``.
        """
        if not super().cancel():
            return False
        with self._condition:  # a second cancel() also returns True: recall the task once
            canceller, self._canceller = self._canceller, None
            if self._state == "CANCELLED":  # no executor will pick it up: tell concurrent.futures.wait now
                self.set_running_or_notify_cancel()
        if canceller is not None:
            canceller(self)
        return True

    def set_running_or_notify_cancel(self) -> bool:
        """As ``concurrent.futures.Future``: False if cancelled (also once notified), else mark it running."""
        with self._condition:
            if self._state == "CANCELLED_AND_NOTIFIED":  # cancel() notified the waiters already
                return False
        return super().set_running_or_notify_cancel()

    def set_result(self, result: T) -> None:
        """As ``concurrent.futures.Future.set_result``, without notifying a condition nobody waits on
        or running callbacks nobody added (the driver's I/O thread sets thousands a second)."""
        cond = self._condition
        with cond._lock:  # type: ignore[attr-defined]  # the RLock of _Condition, taken without its wrapper
            if self._state in _DONE_STATES:
                raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._state = "FINISHED"
            for waiter in self._waiters:
                waiter.add_result(self)
            if cond._waiters:  # type: ignore[attr-defined]
                cond.notify_all()
        if self._done_callbacks:
            self._invoke_callbacks()

    def __reduce__(self) -> Any:
        raise TypeError(
            f"a distfork.Future cannot be pickled ({self!r}): pass it as an argument of fork() (it "
            "stands for its value there), or pickle its value, fut.result()"
        )

    def _invoke_callbacks(self) -> None:
        if self._done_callbacks and callback_runner.on_io_thread():
            callback_runner.submit(super()._invoke_callbacks)  # type: ignore[misc]
        else:
            super()._invoke_callbacks()  # type: ignore[misc]

    # torch.futures -----------------------------------------------------------

    def wait(self) -> T:
        """Block until the task ends; return its value or raise its exception."""
        return self.result()

    def value(self) -> T:
        """The value of a finished future (raises its exception); call ``wait()`` first."""
        if not self.done():
            raise concurrent.futures.InvalidStateError(
                "value() of a future that is not done yet; call wait() or result() to block for it"
            )
        return self.result()

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
        return self._awaited().__await__()

    async def _awaited(self) -> T:
        """The value, awaited: a held value is fetched on a thread of the loop's executor,
        not on the loop (``asyncio.wrap_future`` would call ``result()`` there, and block it)."""
        import asyncio

        done: concurrent.futures.Future[None] = concurrent.futures.Future()  # set once we are, never read

        def relay(_: concurrent.futures.Future[Any]) -> None:
            if self.cancelled():
                done.cancel()
            else:
                settle(done)

        def cancel_back(d: concurrent.futures.Future[None]) -> None:
            if d.cancelled():
                self.cancel()  # the await was cancelled: so is the task, as with asyncio.wrap_future

        done.add_done_callback(cancel_back)
        self.add_done_callback(relay)
        await asyncio.wrap_future(done)
        if self.held:
            return await asyncio.get_running_loop().run_in_executor(None, self.result)
        return self.result()


def settle(fut: concurrent.futures.Future[Any], result: Any = None, exception: BaseException | None = None) -> None:
    """Complete ``fut`` unless it was cancelled (or completed) meanwhile."""
    try:
        if exception is not None:
            fut.set_exception(exception)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _check_futures(futures: list[Any], caller: str) -> None:
    """Refuse anything that is not a ``concurrent.futures.Future``, naming the right call for torch's."""
    for f in futures:
        if isinstance(f, concurrent.futures.Future):
            continue
        if type(f).__module__.startswith("torch"):
            raise TypeError(
                f"distfork.{caller}() takes distfork futures (what distfork.fork returns), got a torch future "
                f"{type(f).__module__}.{type(f).__qualname__}; wait for torch futures with torch.jit.wait() / "
                "torch.futures.wait_all(), and for distfork futures with distfork.wait() / distfork.wait_all()"
            )
        raise TypeError(
            f"distfork.{caller}() takes futures (what distfork.fork returns), got {type(f).__module__}."
            f"{type(f).__qualname__}: {f!r:.80}"
        )


def collect_all(futures: Iterable[Future[Any]]) -> Future[list[Future[Any]]]:
    """A future of the list of ``futures``, done once all of them are.

    As ``torch.futures.collect_all``: if any failed (or was cancelled), the
    combined future holds the first failure in list order (a cancelled one
    as ``concurrent.futures.CancelledError``); otherwise its value is the list.
    """
    futures = list(futures)
    _check_futures(futures, "collect_all")
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
        if not last:
            return
        for f in futures:
            if f.cancelled():
                combined.set_exception(concurrent.futures.CancelledError(f"{f!r} was cancelled"))
                return
            failure = f.exception()
            if failure is not None:
                combined.set_exception(failure)
                return
        combined.set_result(futures)

    for fut in futures:
        fut.add_done_callback(one_done)
    return combined


def wait_all(futures: Iterable[Future[Any]], timeout: float | None = None) -> list[Any]:
    """Wait for every future; return their values in order.

    The first failure is raised as soon as it happens, without waiting for
    the rest (``torch.futures.wait_all`` waits for all, then raises: a
    cluster's tasks may run for long, and a failure should not wait for
    them); builtin ``TimeoutError`` if not all are done after ``timeout``
    seconds.
    """
    futures = list(futures)
    _check_futures(futures, "wait_all")
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
    held = [f for f in futures if isinstance(f, Future) and f.held]
    for driver in {f.driver for f in held}:
        driver.prefetch(held)  # values kept in the cluster: ask for them together, not one by one
    return [f.result() for f in futures]


F = TypeVar("F", bound=concurrent.futures.Future)  # type: ignore[type-arg]


def as_completed(futures: Iterable[F], timeout: float | None = None) -> _AsCompleted[F]:
    """The futures as they finish, for ``for`` and for ``async for``.

    As ``concurrent.futures.as_completed``: futures already done come first,
    each future comes once (duplicates are dropped), and the builtin
    ``TimeoutError`` is raised when the next one is not done ``timeout``
    seconds after this call. ``async for fut in as_completed(futs)`` waits
    without blocking the event loop. No thread is started: each future's
    done callback hands it to the iterator. Inside a task, ``for`` takes
    children still queued back and runs them, as ``wait`` does.
    """
    return _AsCompleted(futures, timeout)


def _remove_callback(futures: list[Any], callback: Callable[[Any], None]) -> None:
    """Take ``callback`` off each future's done callbacks (CPython's private list: no public remover)."""
    for fut in futures:
        with fut._condition:
            try:
                fut._done_callbacks.remove(callback)
            except ValueError:
                pass  # a future listed twice, or removed already


class _AsCompleted(Generic[F]):
    """What :func:`as_completed` returns: an iterator, or an async iterator, of finished futures.

    Done callbacks append to a deque under a condition (``for``); once
    ``async for`` has started, they hand the futures to an ``asyncio.Queue``
    through ``loop.call_soon_threadsafe`` instead.
    """

    def __init__(self, futures: Iterable[F], timeout: float | None) -> None:
        unique = list(dict.fromkeys(futures))
        self._timeout = timeout
        self._end = None if timeout is None else time.monotonic() + timeout
        self._cond = threading.Condition()
        self._finished: collections.deque[F] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[F] | None = None
        self._total = self._left = len(unique)
        # Inside a worker, a child still queued is taken back and run by the waiter (see Future._reclaim).
        self._reclaimable: collections.deque[Future[Any]] = collections.deque(
            f for f in unique if isinstance(f, Future) and f._reclaimer is not None
        )
        # The futures hold only a weak reference to this iterator, and lose their callback when it
        # ends (done, timed out) or is dropped: a caller that stops iterating leaves nothing behind.
        ref = weakref.ref(self)

        def on_done(done: concurrent.futures.Future[Any]) -> None:
            it = ref()
            if it is not None:
                it._on_done(done)

        self._detach = weakref.finalize(self, _remove_callback, unique, on_done)
        for fut in unique:
            fut.add_done_callback(on_done)

    def _on_done(self, done: concurrent.futures.Future[Any]) -> None:
        fut = cast(F, done)
        with self._cond:
            loop, queue = self._loop, self._queue
            if loop is None or queue is None:
                self._finished.append(fut)
                self._cond.notify()
                return
        try:
            loop.call_soon_threadsafe(queue.put_nowait, fut)
        except RuntimeError:
            pass  # the loop is closed: nobody is iterating any more

    def _remaining_s(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - time.monotonic())

    def _timed_out(self) -> TimeoutError:
        self._detach()
        return TimeoutError(f"{self._left} (of {self._total}) futures unfinished after {self._timeout} s")

    def __iter__(self) -> _AsCompleted[F]:
        return self

    def __next__(self) -> F:
        while True:
            with self._cond:
                if self._loop is not None:
                    raise RuntimeError("this as_completed() is being iterated with `async for`; use one or the other")
                if self._left == 0:
                    self._detach()
                    raise StopIteration
                if self._finished or not self._reclaimable:
                    if not self._cond.wait_for(lambda: self._finished, self._remaining_s()):
                        raise self._timed_out()
                    self._left -= 1
                    return self._finished.popleft()
                child = self._reclaimable.popleft()
            child._reclaim(local=False)  # outside the lock: it may run the task in this thread

    def __aiter__(self) -> _AsCompleted[F]:
        import asyncio

        loop = asyncio.get_running_loop()
        with self._cond:
            if self._loop is None:
                self._queue = asyncio.Queue()
                for fut in self._finished:
                    self._queue.put_nowait(fut)
                self._finished.clear()
                self._loop = loop
            elif self._loop is not loop:
                raise RuntimeError("this as_completed() is being iterated in another event loop")
        return self

    async def __anext__(self) -> F:
        import asyncio

        queue = self._queue if self._queue is not None else self.__aiter__()._queue
        assert queue is not None
        if self._left == 0:
            self._detach()
            raise StopAsyncIteration
        try:
            fut = queue.get_nowait()
        except asyncio.QueueEmpty:
            remaining_s = self._remaining_s()
            try:
                fut = await (queue.get() if remaining_s is None else asyncio.wait_for(queue.get(), remaining_s))
            except asyncio.TimeoutError:  # not the builtin one before Python 3.11
                raise self._timed_out() from None
        self._left -= 1
        return fut
