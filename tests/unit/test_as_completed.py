"""``distfork.as_completed`` without a cluster: futures completed by hand, for ``for`` and ``async for``.

The cases follow ``concurrent.futures.as_completed``'s documentation: futures
come as they finish, those already done first, each once; the builtin
``TimeoutError`` when the next is not done ``timeout`` seconds after the call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any

import pytest

import distfork
from distfork import Future

pytestmark = pytest.mark.timeout(30)

T = 10.0  # the longest any wait in this module may take


def done_with(value: Any) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_result(value)
    return fut


class FakeClock:
    """Stands in for the ``time`` module of distfork.future: ``monotonic`` moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


# -- for ------------------------------------------------------------------------------


def test_done_futures_come_first_then_the_others_in_the_order_they_finish() -> None:
    a, b, c, d = done_with("a"), Future(), Future(), done_with("d")
    it = distfork.as_completed([a, b, c, d], timeout=T)
    assert {next(it), next(it)} == {a, d}
    c.set_result("c")
    assert next(it) is c
    b.set_result("b")
    assert next(it) is b
    with pytest.raises(StopIteration):
        next(it)


def test_a_future_completed_by_another_thread_wakes_the_iterator() -> None:
    fut: Future[int] = Future()
    it = distfork.as_completed([fut], timeout=T)
    threading.Thread(target=fut.set_result, args=(7,)).start()
    assert next(it) is fut
    assert fut.result() == 7


def test_failed_and_cancelled_futures_come_out_too() -> None:
    failed, cancelled = Future(), Future()
    failed.set_exception(ValueError("bad"))
    cancelled.cancel()
    assert set(distfork.as_completed([failed, cancelled], timeout=T)) == {failed, cancelled}


def test_each_future_comes_once_even_if_given_twice() -> None:
    a, b = done_with(1), done_with(2)
    assert sorted(f.result() for f in distfork.as_completed([a, b, a, a])) == [1, 2]


def test_nothing_in_nothing_out() -> None:
    assert list(distfork.as_completed([])) == []


def test_timeout_raises_builtin_timeout_error_after_yielding_what_is_done() -> None:
    done, pending = done_with(1), Future()
    it = distfork.as_completed([done, pending], timeout=0.05)
    assert next(it) is done
    with pytest.raises(TimeoutError, match="1 \\(of 2\\) futures unfinished") as excinfo:
        next(it)
    assert excinfo.type is TimeoutError
    assert not pending.done()


def test_timeout_is_measured_from_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(distfork.future, "time", clock)
    pending: Future[int] = Future()
    it = distfork.as_completed([pending], timeout=T)
    clock.now += T + 1  # the deadline passed before the first next(): it must not wait T more
    with pytest.raises(TimeoutError):
        next(it)


def test_plain_concurrent_futures_work_too() -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(pow, 2, i) for i in range(8)]
        assert sorted(f.result() for f in distfork.as_completed(futs, timeout=T)) == [2**i for i in range(8)]


def test_no_thread_is_started_per_future() -> None:
    futs: list[Future[int]] = [Future() for _ in range(100)]
    before = threading.active_count()
    it = distfork.as_completed(futs, timeout=T)
    futs[0].set_result(0)
    assert next(it) is futs[0]
    assert threading.active_count() == before  # 99 futures still pending, no thread waiting for each
    for i, f in enumerate(futs[1:], 1):
        f.set_result(i)
    assert len(list(it)) == 99


# -- async for ------------------------------------------------------------------------


def test_async_for_yields_done_futures_then_the_others_as_they_finish() -> None:
    a, b, c = done_with("a"), Future(), Future()

    async def main() -> list[Future[Any]]:
        loop = asyncio.get_running_loop()
        out = []
        async for fut in distfork.as_completed([a, b, c], timeout=T):
            out.append(fut)
            if fut is a:
                loop.call_soon(c.set_result, "c")  # completed on the loop's own thread
            elif fut is c:
                threading.Thread(target=b.set_result, args=("b",)).start()  # and from another thread
        return out

    assert asyncio.run(main()) == [a, c, b]


def test_async_for_does_not_block_the_event_loop() -> None:
    pending: Future[str] = Future()

    async def ticker(ticks: list[int]) -> None:
        while True:
            ticks.append(1)
            if len(ticks) == 5:
                threading.Thread(target=pending.set_result, args=("done",)).start()
            await asyncio.sleep(0)

    async def main() -> tuple[str, int]:
        ticks: list[int] = []
        task = asyncio.create_task(ticker(ticks))
        try:
            async for fut in distfork.as_completed([pending], timeout=T):
                return fut.result(), len(ticks)
        finally:
            task.cancel()
        raise AssertionError("as_completed yielded nothing")

    value, ticks = asyncio.run(main())
    assert value == "done"
    assert ticks >= 5  # the loop kept running other tasks while as_completed waited


def test_async_timeout_raises_builtin_timeout_error() -> None:
    done, pending = done_with(1), Future()

    async def main(seen: list[Future[Any]]) -> None:
        async for fut in distfork.as_completed([done, pending], timeout=0.05):
            seen.append(fut)

    seen: list[Future[Any]] = []
    with pytest.raises(TimeoutError) as excinfo:
        asyncio.run(main(seen))
    assert excinfo.type is TimeoutError
    assert seen == [done]


def test_a_future_finishing_after_its_loop_closed_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    a, b = done_with(1), Future()

    async def first_only() -> Future[Any]:
        async for fut in distfork.as_completed([a, b]):
            return fut
        raise AssertionError("as_completed yielded nothing")

    assert asyncio.run(first_only()) is a  # the loop is closed now; b is still pending
    with caplog.at_level(logging.DEBUG):
        b.set_result(2)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_for_after_async_for_is_refused() -> None:
    fut = done_with(1)
    it = distfork.as_completed([fut, Future()])

    async def start() -> None:
        async for _ in it:
            return

    asyncio.run(start())
    with pytest.raises(RuntimeError, match="async for"):
        next(it)


def test_a_cancelled_future_is_done_for_concurrent_futures_wait_and_as_completed() -> None:
    # No executor picks a cancelled distfork future up later, so cancel()
    # itself must tell the stdlib's waiters (set_running_or_notify_cancel).
    cancelled, pending = Future(), Future()
    assert cancelled.cancel() and cancelled.cancel()
    first = concurrent.futures.FIRST_COMPLETED
    done, not_done = concurrent.futures.wait([cancelled, pending], timeout=T, return_when=first)
    assert done == {cancelled} and not_done == {pending}
    assert list(concurrent.futures.as_completed([cancelled], timeout=T)) == [cancelled]
    assert list(distfork.as_completed([cancelled], timeout=T)) == [cancelled]
