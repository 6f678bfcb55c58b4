"""The Future API on a real cluster: torch.futures dialect, concurrent.futures, asyncio, timeouts.

Tasks that must still be running at some point wait on a *gate*: a path the
test creates to release them (tasks.wait_for_path), so no test depends on a
task being slow enough.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import distfork
import tasks

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("shared_cluster")]

T = 30.0  # the longest any single wait in this module may take


@pytest.fixture
def gate(tmp_path: Path) -> Callable[[], distfork.Future[str]]:
    """``gate()`` forks a task that runs until the test releases it by creating ``tmp_path / "open"``."""
    path = tmp_path / "open"
    futures: list[distfork.Future[str]] = []

    def fork_gated() -> distfork.Future[str]:
        fut = distfork.fork(tasks.wait_for_path, str(path))
        futures.append(fut)
        return fut

    fork_gated.release = path.touch  # type: ignore[attr-defined]
    yield fork_gated
    path.touch()  # never leave a worker blocked for the next test
    for fut in futures:
        fut.exception(T)


def test_fork_returns_before_the_task_ends(gate) -> None:  # type: ignore[no-untyped-def]
    fut = gate()
    assert isinstance(fut, distfork.Future)
    assert not fut.done()
    gate.release()
    assert distfork.wait(fut, timeout=T) == "released"
    assert fut.done()


def test_value_before_done_raises_then_returns(gate) -> None:  # type: ignore[no-untyped-def]
    fut = gate()
    with pytest.raises(concurrent.futures.InvalidStateError):
        fut.value()
    gate.release()
    assert fut.wait() == "released"
    assert fut.value() == "released"


def test_then_chain() -> None:
    fut = distfork.fork(tasks.add, 20, 1)
    chained = fut.then(lambda f: f.value() * 2).then(lambda f: f.value() + 0.5)
    assert isinstance(chained, distfork.Future)
    assert chained.wait() == 42.5
    assert fut.value() == 21


def test_then_callback_that_raises_fails_the_chained_future() -> None:
    fut = distfork.fork(tasks.add, 1, 1)

    def bad(f: distfork.Future[int]) -> int:
        raise ValueError(f"got {f.value()}")

    chained = fut.then(bad)
    with pytest.raises(ValueError, match="got 2"):
        chained.result(T)
    assert fut.result(T) == 2  # the original is untouched


def test_then_on_a_failed_future_sees_its_exception() -> None:
    fut = distfork.fork(tasks.fail, "boom")
    chained = fut.then(lambda f: type(f.exception()).__name__)
    assert chained.result(T) == "CustomError"


def test_add_done_callback_runs_with_the_future() -> None:
    fut = distfork.fork(tasks.add, 2, 3)
    seen: list[int] = []
    called = threading.Event()

    def cb(f: distfork.Future[int]) -> None:
        seen.append(f.result())
        called.set()

    fut.add_done_callback(cb)
    assert called.wait(T)
    assert seen == [5]


def test_add_done_callback_on_a_done_future_runs_at_once() -> None:
    fut = distfork.fork(tasks.add, 2, 3)
    fut.result(T)
    seen: list[tuple[int, threading.Thread]] = []
    fut.add_done_callback(lambda f: seen.append((f.result(), threading.current_thread())))
    assert seen == [(5, threading.current_thread())]


def test_callback_that_waits_for_another_future_does_not_deadlock(tmp_path: Path) -> None:
    # Both tasks are gated, so ``first`` completes (on the driver's I/O side)
    # while ``second`` is certainly still running: the callback must block
    # somewhere that does not stop ``second``'s result from arriving.
    first_gate, second_gate = tmp_path / "first", tmp_path / "second"
    first = distfork.fork(tasks.wait_for_path, str(first_gate))
    second = distfork.fork(tasks.wait_for_path, str(second_gate))
    started, finished = threading.Event(), threading.Event()
    got: list[object] = []

    def cb(f: distfork.Future[str]) -> None:
        started.set()
        try:
            got.append((f.result(), distfork.wait(second, timeout=T)))
        except BaseException as exc:  # noqa: BLE001 - reported through got
            got.append(exc)
        finished.set()

    first.add_done_callback(cb)
    try:
        first_gate.touch()
        assert started.wait(T), "the callback never ran"
        assert not second.done()
        second_gate.touch()
        assert finished.wait(T), "the callback waiting for another future never returned"
    finally:
        first_gate.touch()
        second_gate.touch()
        second.exception(T)
    assert got == [("released", "released")]


def test_collect_all() -> None:
    futs = [distfork.fork(tasks.add, i, i) for i in range(10)]
    everything = distfork.collect_all(futs)
    assert isinstance(everything, distfork.Future)
    done = everything.wait()
    assert done == futs
    assert all(f.done() for f in done)
    assert [f.value() for f in done] == [2 * i for i in range(10)]


def test_collect_all_with_a_failure_completes_once_all_are_done_with_that_failure() -> None:
    """As torch.futures.collect_all: the combined future raises the first failure (issue 14)."""
    futs = [distfork.fork(tasks.add, 1, 1), distfork.fork(tasks.fail, "boom"), distfork.fork(tasks.add, 2, 2)]
    with pytest.raises(tasks.CustomError, match="boom"):
        distfork.collect_all(futs).result(T)
    assert all(f.done() for f in futs)
    assert futs[0].value() == 2 and futs[2].value() == 4


def test_collect_all_of_nothing() -> None:
    assert distfork.collect_all([]).result(T) == []


def test_wait_all() -> None:
    futs = [distfork.fork(tasks.add, i, 1) for i in range(50)]
    assert distfork.wait_all(futs, timeout=T) == list(range(1, 51))


def test_wait_all_raises_the_failure() -> None:
    futs = [distfork.fork(tasks.add, 1, 1), distfork.fork(tasks.fail, "boom")]
    with pytest.raises(tasks.CustomError, match="boom"):
        distfork.wait_all(futs, timeout=T)


def test_concurrent_futures_wait_all_completed() -> None:
    futs = [distfork.fork(tasks.add, i, 1) for i in range(20)]
    done, not_done = concurrent.futures.wait(futs, timeout=T)
    assert not not_done
    assert done == set(futs)
    assert sorted(f.result() for f in done) == list(range(1, 21))


def test_concurrent_futures_wait_first_completed(gate) -> None:  # type: ignore[no-untyped-def]
    slow = gate()
    quick = distfork.fork(tasks.add, 1, 1)
    done, not_done = concurrent.futures.wait([slow, quick], timeout=T, return_when=concurrent.futures.FIRST_COMPLETED)
    assert done == {quick}
    assert not_done == {slow}
    gate.release()
    assert slow.result(T) == "released"


def test_as_completed_yields_in_completion_order(gate) -> None:  # type: ignore[no-untyped-def]
    slow = gate()
    quick = distfork.fork(tasks.add, 1, 0)
    order: list[distfork.Future[object]] = []
    for fut in concurrent.futures.as_completed([slow, quick], timeout=T):
        order.append(fut)
        gate.release()  # only once the quick one came out
    assert order == [quick, slow]
    assert quick.result() == 1 and slow.result() == "released"


def test_as_completed_yields_every_future_once() -> None:
    futs = [distfork.fork(tasks.add, i, 0) for i in range(30)]
    seen = list(concurrent.futures.as_completed(futs, timeout=T))
    assert len(seen) == 30 and set(seen) == set(futs)
    assert sorted(f.result() for f in seen) == list(range(30))


def test_asyncio_await() -> None:
    async def main() -> int:
        return await distfork.fork(tasks.add, 40, 2)

    assert asyncio.run(main()) == 42


def test_asyncio_await_raises_the_task_error() -> None:
    async def main() -> None:
        await distfork.fork(tasks.fail, "boom")

    with pytest.raises(tasks.CustomError, match="boom") as excinfo:
        asyncio.run(main())
    assert isinstance(excinfo.value.__cause__, distfork.RemoteTraceback)


def test_asyncio_gather() -> None:
    async def main() -> list[int]:
        return await asyncio.gather(*(distfork.fork(tasks.add, i, i) for i in range(10)))

    assert asyncio.run(main()) == [2 * i for i in range(10)]


def test_asyncio_loop_keeps_running_while_awaiting(gate) -> None:  # type: ignore[no-untyped-def]
    async def main() -> tuple[str, int]:
        fut = gate()
        ticks = 0
        waiter = asyncio.ensure_future(fut)  # a distfork Future is awaitable
        while not waiter.done():
            ticks += 1
            if ticks == 3:
                gate.release()
            await asyncio.sleep(0.01)
        return await waiter, ticks

    value, ticks = asyncio.run(asyncio.wait_for(main(), T))
    assert value == "released"
    assert ticks >= 3  # the loop ran while the task was going on


def test_wait_timeout_raises_builtin_timeout_error_and_the_task_goes_on(gate) -> None:  # type: ignore[no-untyped-def]
    fut = gate()
    with pytest.raises(TimeoutError) as excinfo:
        distfork.wait(fut, timeout=0.05)
    assert excinfo.type is TimeoutError  # the builtin, not a subclass of our own
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.01)
    assert not fut.done() and not fut.cancelled()
    gate.release()
    assert distfork.wait(fut, timeout=T) == "released"


def test_wait_timeout_on_a_sleeping_task(shared_cluster: list[int]) -> None:
    fut = distfork.fork(tasks.timed_sleep, 0.5)
    with pytest.raises(TimeoutError):
        distfork.wait(fut, timeout=0.01)
    pid, start, end = distfork.wait(fut, timeout=T)  # it ran to its end after all
    assert pid in shared_cluster
    assert end > start
