"""``distfork.Executor``: the cluster behind the ``concurrent.futures.Executor`` interface.

::

     user threads              Executor                          the process's runtime
     ┌──────────────────┐ submit ┌──────────────────────────────┐ fork   ┌──────────────────┐
     │ submit, map,     │──────▶ │ after shutdown: RuntimeError │──────▶ │ driver ─▶ broker │
     │ run_in_executor, │        │ max_workers slots (a cluster │        │ (api._runtime)   │
     │ shutdown(wait,   │        │   it did not start)          │        │                  │
     │  cancel_futures) │ ◀──────│ its own unfinished futures,  │◀────── │                  │
     └──────────────────┘ Future │ dropped by done callbacks    │ result └──────────────────┘
                                 └──────────────────────────────┘

An executor is a thin view on the process's one distfork runtime (see
:mod:`distfork.api`): ``submit`` is ``distfork.fork``, so the futures are
ordinary distfork futures. It keeps the set of its own unfinished futures,
so ``shutdown`` waits for or cancels those and no others, and it shuts the
runtime down only if it started it.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from . import api
from .errors import DistforkError
from .future import Future

__all__ = ["Executor"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Executor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` whose tasks run on a distfork cluster.

    - ``Executor()``: the process's current runtime; if there is none yet,
      start it as the first ``fork`` would (``DISTFORK_ADDRESS`` /
      ``DISTFORK_MODE``, else the embedded local cluster);
    - ``Executor(address="tcp://host:7340")``: connect this process to the
      cluster at that address (keyword only: the first positional argument
      is ``max_workers``, as for ``ThreadPoolExecutor(5)``). A process has one runtime: if it is already connected
      elsewhere (or in inline mode), this raises ``DistforkError``.

    ``max_workers``: when this executor starts the embedded cluster, the
    number of worker processes it starts. Otherwise (a cluster at an address,
    or a runtime that was already there) the cluster's size is not ours to
    choose, and ``max_workers`` bounds this executor's unfinished tasks
    instead: ``submit`` blocks while that many are unfinished. ``None``: no
    bound beyond the driver's in-flight window.

    ``config``: keyword arguments of ``distfork.init`` (``mode="inline"``,
    ``heartbeat_s=...``), used when this executor starts the runtime; given
    with a runtime already running, they raise ``DistforkError``.

    ``shutdown`` waits for (or cancels) this executor's futures only, and
    shuts the runtime down only if this executor started it.
    """

    def __init__(self, max_workers: int | None = None, *, address: str | None = None, **config: Any) -> None:
        if isinstance(max_workers, str):
            raise TypeError(
                f"Executor({max_workers!r}): the first argument is max_workers, a number; "
                f"give a cluster's address by name: Executor(address={max_workers!r})"
            )
        if max_workers is not None and (isinstance(max_workers, bool) or not isinstance(max_workers, int)):
            raise TypeError(f"max_workers must be an int or None, got {type(max_workers).__name__}: {max_workers!r}")
        api.check_address(address, "Executor(address=...)")
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        self._cond = threading.Condition()
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._submitting = 0  # submits between their shut-down check and their future's registration
        self._shutdown = False
        self._close_when_idle = False
        with api._lock:
            self._rt, self._owns_runtime = self._runtime(address, max_workers, config)
        started_workers = self._owns_runtime and self._rt.cluster is not None
        bounded = max_workers is not None and not started_workers
        self._slots = threading.BoundedSemaphore(max_workers) if bounded and max_workers else None

    @staticmethod
    def _runtime(address: str | None, max_workers: int | None, config: dict[str, Any]) -> tuple[api._Runtime, bool]:
        """The runtime to use (caller holds ``api._lock``), and whether we started it."""
        rt = api._runtime if api._runtime is not None and api._runtime.pid == os.getpid() else None
        if rt is not None:
            if address is not None and address != rt.address:
                raise DistforkError(
                    f"this process already runs distfork ({api._describe(rt)}), so an Executor cannot connect "
                    f"to {address}; use Executor() for the current runtime, or call distfork.shutdown() first"
                )
            if config:
                raise DistforkError(
                    f"distfork is already initialized ({api._describe(rt)}), so the settings "
                    f"{', '.join(sorted(config))} given to Executor cannot apply; give them to the "
                    "Executor (or distfork.init) that starts the runtime, or call distfork.shutdown() first"
                )
            return rt, False
        if address is None:
            address = os.environ.get("DISTFORK_ADDRESS") or None
            config.setdefault("mode", os.environ.get("DISTFORK_MODE", "cluster"))
        api.init(address, workers=max_workers, **config)
        assert api._runtime is not None
        return api._runtime, True

    # -- concurrent.futures.Executor ----------------------------------------

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """``distfork.fork(fn, *args, **kwargs)`` as this executor's task.

        Raises ``RuntimeError`` after ``shutdown`` (or once the runtime this
        executor uses was shut down). With a ``max_workers`` bound, blocks
        while that many of this executor's tasks are unfinished.
        """
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self._slots is not None:
            self._slots.acquire()  # outside the lock: a shutdown that cancels frees slots
        try:
            with self._cond:
                if self._shutdown:
                    raise RuntimeError("cannot schedule new futures after shutdown")
                if api._runtime is not self._rt or self._rt.pid != os.getpid():
                    raise RuntimeError(
                        "cannot schedule new futures: the distfork runtime this executor used was shut down "
                        "(or this is a forked child process); make a new Executor"
                    )
                self._submitting += 1
            fut: Future[T] | None = None
            try:
                fut = api.fork(fn, *args, **kwargs)
            finally:
                with self._cond:
                    self._submitting -= 1
                    if fut is not None:
                        self._futures.add(fut)
                    self._cond.notify_all()
        except BaseException:
            if self._slots is not None:
                self._slots.release()
            raise
        fut.add_done_callback(self._task_done)
        return fut

    def map(
        self, fn: Callable[..., T], *iterables: Iterable[Any], timeout: float | None = None, chunksize: int = 1,
        progress: bool = False,
    ) -> Iterator[T]:
        """``fn`` over the items of ``iterables``, as ``concurrent.futures.Executor.map``.

        Every item is submitted now (the iterables are read at once); the
        results are yielded in order as they are asked for. ``timeout``
        (seconds from this call): the builtin ``TimeoutError`` from the
        iterator if a result is not ready by then. A failed item raises its
        exception when the iterator reaches it. Either way, or when the
        iterator is dropped, the items not yet yielded are cancelled.
        ``chunksize`` > 1 sends that many items per task (as
        ``ProcessPoolExecutor`` does): fewer round trips for small items.
        ``progress=True`` shows a bar of the tasks as they finish (on a terminal).
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end = None if timeout is None else time.monotonic() + timeout
        if chunksize == 1:
            futures = self._submit_all(fn, zip(*iterables))  # noqa: B905 - shortest wins
        else:
            futures = self._submit_all(_run_chunk, ((fn, c) for c in _chunks(zip(*iterables), chunksize)))  # noqa: B905
        if progress:
            from .progressbar import ProgressBar

            ProgressBar(futures, getattr(fn, "__name__", "map"))
        if chunksize == 1:
            return _in_order(futures, end, timeout)
        return _flatten(_in_order(futures, end, timeout))

    def _submit_all(self, fn: Callable[..., Any], calls: Iterable[tuple[Any, ...]]) -> list[Future[Any]]:
        futures: list[Future[Any]] = []
        try:
            for args in calls:
                futures.append(self.submit(fn, *args))
        except BaseException:
            for fut in futures:  # nobody could ever ask for their results
                fut.cancel()
            raise
        return futures

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submits; wait for (or cancel) this executor's unfinished futures.

        ``cancel_futures=True`` cancels every unfinished task of this
        executor: a driver cannot tell a queued task from a running one, and
        cancelling a running distfork task stops it (its worker process is
        replaced). ``wait=False`` returns at once; the tasks go on, and at
        interpreter exit they are waited for before the runtime stops (as
        ``concurrent.futures`` executors do; Ctrl-C cancels them). A runtime
        this executor started is shut down once its tasks are done.
        """
        with self._cond:
            self._shutdown = True
            self._cond.wait_for(lambda: self._submitting == 0)
            pending = list(self._futures)
        if cancel_futures:
            for fut in pending:
                fut.cancel()
        if wait:
            for fut in pending:  # inside a worker: run children still queued here (see Future._reclaim)
                if isinstance(fut, Future) and fut._reclaimer is not None:
                    fut._reclaim()
            concurrent.futures.wait(pending)
        if not self._owns_runtime:
            return
        with self._cond:  # done futures may still be in the set: their callbacks run a moment later
            idle = all(f.done() for f in self._futures)
            self._close_when_idle = not idle
        if idle:
            self._close_runtime()

    # -- bookkeeping --------------------------------------------------------

    def _task_done(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._cond:
            self._futures.discard(fut)
            close = self._close_when_idle and not self._futures
            if close:
                self._close_when_idle = False
        if self._slots is not None:
            self._slots.release()
        if close:  # shutdown(wait=False) of the executor that started the runtime; not on the callback thread
            threading.Thread(target=self._close_runtime, name="distfork-executor-shutdown").start()

    def _close_runtime(self) -> None:
        with api._lock:
            if api._runtime is self._rt and self._rt.pid == os.getpid():
                log.info("shutting down the distfork runtime this Executor started")
                api.shutdown()


def _run_chunk(fn: Callable[..., T], chunk: tuple[tuple[Any, ...], ...]) -> list[T]:
    """One task of ``map`` with ``chunksize`` > 1 (runs in the worker)."""
    return [fn(*args) for args in chunk]


def _chunks(items: Iterator[tuple[Any, ...]], size: int) -> Iterator[tuple[tuple[Any, ...], ...]]:
    while chunk := tuple(itertools.islice(items, size)):
        yield chunk


def _in_order(futures: list[Future[Any]], end: float | None, timeout: float | None) -> Iterator[Any]:
    """The futures' results in order; on failure, timeout or close, cancel those not yet reached.

    Neither a future nor a value stays in this generator's frame once handed
    out: the caller's dropping a result frees it (CPython's test_free_reference).
    """
    futures.reverse()
    try:
        while futures:
            yield _result_or_cancel(futures.pop(), end, timeout)
    finally:
        for fut in futures:
            fut.cancel()


def _result_or_cancel(fut: Future[Any], end: float | None, timeout: float | None) -> Any:
    try:
        return fut.result(None if end is None else end - time.monotonic())
    except TimeoutError as exc:
        if fut.done() and fut.exception() is exc:
            raise  # the task itself failed with TimeoutError
        fut.cancel()
        raise TimeoutError(f"Executor.map: a result was not ready {timeout} s after the call") from None


def _flatten(chunks: Iterator[list[T]]) -> Iterator[T]:
    for chunk in chunks:
        chunk.reverse()
        while chunk:
            yield chunk.pop()
