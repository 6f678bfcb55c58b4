"""Composing futures in the driver, on a real cluster: asyncio, ``distfork.as_completed``, ``then`` chains.

(The simplest cases — ``await fut``, ``gather`` of values — are in
test_futures_api.py; these are the orders, failures, cancellation and
timeouts around them.) Tasks that must still be running at some point wait
on a gate: a path the test creates.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import distfork
import tasks
from conftest import wait_until
from distfork.status import query_status

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("shared_cluster")]

T = 30.0  # the longest any single wait in this module may take


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Callable[[], distfork.Future[str]]]:
    """``gate()`` forks a task that runs until ``gate.release()`` creates its path."""
    path = tmp_path / "gate"
    futures: list[distfork.Future[str]] = []

    def fork_gated() -> distfork.Future[str]:
        fut = distfork.fork(tasks.wait_for_path, str(path), T)
        futures.append(fut)
        return fut

    fork_gated.release = path.touch  # type: ignore[attr-defined]
    yield fork_gated
    path.touch()
    for fut in futures:
        fut.exception(T)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, T))


# -- await and gather -----------------------------------------------------------------


def test_gather_gives_values_in_the_order_of_its_arguments_not_of_completion(gate) -> None:  # type: ignore[no-untyped-def]
    async def main() -> list[Any]:
        slow, quick = gate(), distfork.fork(tasks.add, 1, 1)
        together = asyncio.gather(slow, quick)
        assert await quick == 2  # the second is done while the first still waits
        assert not slow.done()
        gate.release()
        return await together

    assert run(main()) == ["released", 2]


def test_gather_with_return_exceptions_puts_each_failure_in_its_place() -> None:
    async def main() -> list[Any]:
        futs = [distfork.fork(tasks.add, 1, 1), distfork.fork(tasks.fail, "boom"), distfork.fork(tasks.add, 2, 2)]
        return await asyncio.gather(*futs, return_exceptions=True)

    first, failure, last = run(main())
    assert (first, last) == (2, 4)
    assert isinstance(failure, tasks.CustomError) and str(failure) == "boom"
    assert isinstance(failure.__cause__, distfork.RemoteTraceback)


def test_gather_raises_a_tasks_exception_with_its_remote_traceback() -> None:
    async def main() -> None:
        await asyncio.gather(distfork.fork(tasks.add, 1, 1), distfork.fork(tasks.raise_value_error, "bad"))

    with pytest.raises(ValueError, match="bad") as excinfo:
        run(main())
    assert isinstance(excinfo.value.__cause__, distfork.RemoteTraceback)


def test_cancelling_the_await_cancels_the_queued_task(tmp_path: Path) -> None:
    # Both workers run a gated task of their own, so the awaited task waits in
    # the queue; asyncio.wait_for cancels the await on its timeout, and with it
    # (asyncio.wrap_future) the distfork future: the task must never run.
    release, started = tmp_path / "gate", [tmp_path / f"started-{i}" for i in range(2)]
    busy = [distfork.fork(tasks.announce_and_wait, str(s), str(release), T) for s in started]
    never = tmp_path / "never"
    try:
        wait_until(lambda: all(s.exists() for s in started), T, what="both workers to start a gated task")
        address = distfork.api._runtime.address  # type: ignore[union-attr]
        cancels_before = query_status(address)["counters"].get("tasks_cancelled", 0)
        queued = distfork.fork(tasks.touch, str(never))

        async def main() -> None:
            await asyncio.wait_for(queued, 0.05)

        with pytest.raises(TimeoutError):
            asyncio.run(main())
        assert queued.cancelled()
        # The cancel travels on after cancel() returns: let the broker have it before a worker is free.
        wait_until(lambda: query_status(address)["counters"].get("tasks_cancelled", 0) > cancels_before, T,
                   what="the broker to take the cancel")
    finally:
        release.touch()
    assert all(isinstance(f.result(T), int) for f in busy)
    assert distfork.wait_all([distfork.fork(tasks.identity, i) for i in range(4)], timeout=T) == [0, 1, 2, 3]
    assert not never.exists()


# -- as_completed ---------------------------------------------------------------------


def test_async_as_completed_yields_in_completion_order_while_the_loop_runs(gate) -> None:  # type: ignore[no-untyped-def]
    async def main() -> list[Any]:
        slow, quick = gate(), distfork.fork(tasks.add, 1, 0)
        quick_out = asyncio.Event()

        async def release_later() -> None:
            # Another coroutine opens the gate: if waiting for the slow one
            # blocked the loop, this would never run and the slow one never end.
            await quick_out.wait()
            await asyncio.sleep(0)
            gate.release()

        releasing = asyncio.create_task(release_later())
        order = []
        async for fut in distfork.as_completed([slow, quick], timeout=T):
            order.append(fut.result())
            quick_out.set()
        await releasing
        return order

    assert run(main()) == [1, "released"]


def test_async_as_completed_timeout_raises_builtin_timeout_error_and_the_task_goes_on(gate) -> None:  # type: ignore[no-untyped-def]
    slow = gate()

    async def main() -> None:
        async for _ in distfork.as_completed([slow], timeout=0.1):
            raise AssertionError("a gated task finished")

    with pytest.raises(TimeoutError) as excinfo:
        run(main())
    assert excinfo.type is TimeoutError
    assert not slow.done() and not slow.cancelled()
    gate.release()
    assert slow.result(T) == "released"


def test_as_completed_yields_every_future_once_failed_ones_too() -> None:
    futs = [distfork.fork(tasks.add, i, 0) for i in range(20)] + [distfork.fork(tasks.fail, "boom")]
    seen = list(distfork.as_completed(futs + futs[:5], timeout=T))
    assert len(seen) == 21 and set(seen) == set(futs)
    assert sorted(f.result() for f in seen if f.exception() is None) == list(range(20))
    [failed] = [f for f in seen if f.exception() is not None]
    assert isinstance(failed.exception(), tasks.CustomError)


def test_as_completed_waits_without_a_thread_per_future(gate) -> None:  # type: ignore[no-untyped-def]
    quick = distfork.fork(tasks.add, 0, 0)
    quick.result(T)
    gated = [gate(), gate()]  # both workers busy: the rest stay queued
    queued = [distfork.fork(tasks.add, i, 0) for i in range(1, 31)]
    before = threading.active_count()
    it = distfork.as_completed([quick, *gated, *queued], timeout=T)
    assert next(it) is quick
    assert threading.active_count() <= before + 1  # + the callback thread, if not started yet
    gate.release()
    assert len(list(it)) == 32


def test_as_completed_inside_a_task_runs_a_queued_child_itself(tmp_path: Path) -> None:
    # In the task, child ``a`` takes the other worker until the test opens its
    # gate, and child ``b`` is queued behind it. ``b`` must come out of
    # as_completed first (the waiting task takes it back and runs it), and
    # only then does the test open the gate: waiting for a worker would hang.
    gate, first_out = str(tmp_path / "gate"), str(tmp_path / "first-out")

    def parent() -> list[Any]:
        a = distfork.fork(tasks.wait_for_path, gate, T)
        b = distfork.fork(tasks.add, 20, 22)
        order = []
        for fut in distfork.as_completed([a, b], timeout=T):
            order.append(fut.result())
            open(first_out, "w").close()
        return order

    fut = distfork.fork(parent)
    try:
        wait_until(lambda: os.path.exists(first_out), T, what="the first child to come out of as_completed")
    finally:
        Path(gate).touch()
    assert fut.result(T) == [42, "released"]


# -- then chains ----------------------------------------------------------------------


def test_then_runs_in_the_driver_on_the_value_computed_in_a_worker(shared_cluster: list[int]) -> None:
    worker_pid, driver_pid = distfork.fork(tasks.getpid).then(lambda f: (f.value(), os.getpid())).result(T)
    assert worker_pid in shared_cluster
    assert driver_pid == os.getpid()


def test_then_chains_compose_with_forks_made_inside_the_callbacks() -> None:
    chained = (
        distfork.fork(tasks.add, 1, 2)
        .then(lambda f: f.value() * 10)
        .then(lambda f: distfork.wait(distfork.fork(tasks.add, f.value(), 5), T))
        .then(lambda f: f"total {f.value()}")
    )
    assert isinstance(chained, distfork.Future)
    assert chained.result(T) == "total 35"


def test_an_exception_propagates_through_every_then_unchanged() -> None:
    base = distfork.fork(tasks.fail, "boom")
    reached: list[str] = []

    def step(name: str) -> Callable[[distfork.Future[Any]], Any]:
        def cb(f: distfork.Future[Any]) -> Any:
            reached.append(name)
            return f.value()  # raises what the previous step holds

        return cb

    last = base.then(step("one")).then(step("two")).then(step("three"))
    with pytest.raises(tasks.CustomError, match="boom") as excinfo:
        last.result(T)
    assert excinfo.value is base.exception()  # the task's own exception, not a wrapper
    assert isinstance(excinfo.value.__cause__, distfork.RemoteTraceback)
    assert reached == ["one", "two", "three"]


def test_a_then_can_recover_from_a_failure_and_the_chain_goes_on() -> None:
    recovered = (
        distfork.fork(tasks.fail, "boom")
        .then(lambda f: "fallback" if f.exception() is not None else f.value())
        .then(lambda f: f.value().upper())
    )
    assert recovered.result(T) == "FALLBACK"


def test_then_chains_can_be_awaited_and_gathered() -> None:
    async def main() -> list[int]:
        chains = [distfork.fork(tasks.add, i, i).then(lambda f: f.value() + 1) for i in range(5)]
        return await asyncio.gather(*chains)

    assert run(main()) == [2 * i + 1 for i in range(5)]
