"""distfork.Future without a cluster: futures completed by hand."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

import pytest

import distfork
from distfork import Future, collect_all, wait_all
from distfork.future import callback_runner


class Boom(Exception):
    pass


def done_with(value: Any) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_result(value)
    return fut


def failed_with(exc: BaseException) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_exception(exc)
    return fut


# -- concurrent.futures and torch.futures dialects ------------------------------------


def test_is_a_concurrent_futures_future() -> None:
    futs = [Future(), done_with(1)]
    assert isinstance(futs[0], concurrent.futures.Future)
    done, not_done = concurrent.futures.wait(futs, timeout=0)
    assert done == {futs[1]} and not_done == {futs[0]}
    futs[0].set_result(2)
    assert {f.result() for f in concurrent.futures.as_completed(futs, timeout=5)} == {1, 2}


def test_wait_returns_the_value_or_raises_the_exception() -> None:
    assert done_with(3).wait() == 3
    with pytest.raises(Boom, match="bad"):
        failed_with(Boom("bad")).wait()


def test_wait_blocks_until_another_thread_completes_the_future() -> None:
    fut: Future[int] = Future()
    t = threading.Thread(target=fut.set_result, args=(9,))
    t.start()
    assert fut.wait() == 9
    t.join()


def test_value_before_done_raises_invalid_state_error() -> None:
    fut: Future[int] = Future()
    with pytest.raises(concurrent.futures.InvalidStateError, match="not done"):
        fut.value()
    fut.set_result(5)
    assert fut.done()
    assert fut.value() == 5


def test_value_of_a_failed_future_raises_its_exception() -> None:
    with pytest.raises(Boom):
        failed_with(Boom()).value()


def test_result_with_a_timeout_raises_builtin_timeout_error_and_the_future_goes_on() -> None:
    fut: Future[int] = Future()
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.01)
    assert not fut.done()
    fut.set_result(1)
    assert fut.result(timeout=0.01) == 1


# -- then and callbacks ----------------------------------------------------------------


def test_then_chains_on_the_value() -> None:
    fut: Future[int] = Future()
    seen: list[Future[int]] = []

    def plus_one(f: Future[int]) -> int:
        seen.append(f)
        return f.value() + 1

    chained = fut.then(plus_one).then(lambda f: f.value() * 10)
    assert not chained.done()
    fut.set_result(1)
    assert chained.wait() == 20
    assert seen == [fut]  # the callback gets the original future


def test_then_on_a_done_future_runs_at_once() -> None:
    assert done_with("a").then(lambda f: f.value() + "b").value() == "ab"


def test_then_propagates_the_exception_of_the_original_future() -> None:
    fut: Future[int] = Future()
    chained = fut.then(lambda f: f.value() + 1)
    err = Boom("original")
    fut.set_exception(err)
    with pytest.raises(Boom) as info:
        chained.wait()
    assert info.value is err


def test_a_then_callback_that_raises_fails_the_chained_future() -> None:
    def bad(_: Future[int]) -> int:
        raise ValueError("in callback")

    fut: Future[int] = Future()
    chained = fut.then(bad)
    fut.set_result(1)
    with pytest.raises(ValueError, match="in callback"):
        chained.wait()
    assert fut.value() == 1  # the original is unaffected


def test_add_done_callback_runs_once_with_the_future() -> None:
    fut: Future[int] = Future()
    calls: list[Future[int]] = []
    fut.add_done_callback(calls.append)
    assert calls == []
    fut.set_result(1)
    assert calls == [fut]
    fut.add_done_callback(calls.append)  # added after done: runs at once
    assert calls == [fut, fut]


def test_callbacks_of_a_future_completed_on_an_io_thread_run_on_another_thread() -> None:
    fut: Future[int] = Future()
    ran_on: list[threading.Thread] = []
    ran = threading.Event()

    def callback(_: Future[int]) -> None:
        ran_on.append(threading.current_thread())
        ran.set()

    fut.add_done_callback(callback)
    io_thread = threading.Thread(target=fut.set_result, args=(1,), name="fake-io")
    callback_runner.io_threads.add(io_thread)
    try:
        io_thread.start()
        io_thread.join()
        assert ran.wait(10)
    finally:
        callback_runner.io_threads.discard(io_thread)
    assert ran_on and ran_on[0] is not io_thread
    assert ran_on[0].name.startswith("distfork-callbacks")


# -- collect_all / wait_all ------------------------------------------------------------


def test_collect_all_completes_with_the_futures_once_all_are_done() -> None:
    futs: list[Future[Any]] = [Future(), Future(), Future()]
    combined = collect_all(futs)
    futs[2].set_result("c")
    futs[0].set_result("a")
    assert not combined.done()
    futs[1].set_result("b")
    got = combined.wait()
    assert got == futs and all(a is b for a, b in zip(got, futs, strict=True))
    assert got[2].value() == "c"
    # One failed: as torch's, the combined future raises it once all are done (issue 14).
    failing: list[Future[Any]] = [Future(), Future()]
    combined = collect_all(failing)
    failing[0].set_exception(Boom())
    assert not combined.done()
    failing[1].set_result("b")
    with pytest.raises(Boom):
        combined.wait()


def test_collect_all_of_nothing_is_done() -> None:
    assert collect_all([]).value() == []


def test_wait_all_returns_values_in_order() -> None:
    futs: list[Future[int]] = [Future() for _ in range(3)]
    for f, v in reversed(list(zip(futs, [1, 2, 3], strict=True))):
        f.set_result(v)
    assert wait_all(futs) == [1, 2, 3]
    assert wait_all([]) == []


def test_wait_all_raises_the_first_failure() -> None:
    first, second = Boom("first"), Boom("second")
    futs = [done_with(1), failed_with(first), failed_with(second)]
    with pytest.raises(Boom) as info:
        wait_all(futs)
    assert info.value is first


def test_wait_all_raises_a_failure_without_waiting_for_the_rest() -> None:
    # As torch.futures.wait_all: an error is reported at once.
    never: Future[int] = Future()
    with pytest.raises(Boom, match="early"):
        wait_all([never, failed_with(Boom("early"))], timeout=10)
    assert not never.done()


def test_wait_all_times_out_with_builtin_timeout_error() -> None:
    futs = [done_with(1), Future()]
    with pytest.raises(TimeoutError, match="1 of 2 futures not done"):
        wait_all(futs, timeout=0.01)


# -- asyncio -------------------------------------------------------------------------


def test_a_future_is_awaitable() -> None:
    async def main() -> int:
        fut: Future[int] = Future()
        t = threading.Thread(target=fut.set_result, args=(42,))  # completed from another thread
        t.start()
        try:
            return await fut
        finally:
            t.join()

    assert asyncio.run(main()) == 42


def test_awaiting_a_failed_future_raises_its_exception() -> None:
    async def main() -> None:
        fut: Future[int] = Future()
        asyncio.get_running_loop().call_soon(fut.set_exception, Boom("async"))
        await fut

    with pytest.raises(Boom, match="async"):
        asyncio.run(main())


def test_asyncio_gather_of_several_futures() -> None:
    async def main() -> list[int]:
        futs: list[Future[int]] = [Future() for _ in range(4)]
        loop = asyncio.get_running_loop()
        for i, f in reversed(list(enumerate(futs))):
            loop.call_soon(f.set_result, i * i)
        return await asyncio.gather(*futs)

    assert asyncio.run(main()) == [0, 1, 4, 9]


# -- cancel ------------------------------------------------------------------------


def test_cancel_calls_the_canceller_once() -> None:
    calls: list[Future[Any]] = []
    fut: Future[int] = Future(canceller=calls.append)
    assert fut.cancel() is True
    assert fut.cancel() is True  # already cancelled
    assert calls == [fut]
    assert fut.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        fut.wait()


def test_cancel_of_a_done_future_is_false_and_does_not_call_the_canceller() -> None:
    calls: list[Future[Any]] = []
    fut: Future[int] = Future(canceller=calls.append)
    fut.set_result(1)
    assert fut.cancel() is False
    assert calls == []
    assert fut.value() == 1


def test_cancel_runs_done_callbacks_and_then() -> None:
    fut: Future[int] = Future()
    chained = fut.then(lambda f: f.value())
    fut.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        chained.wait()


def test_future_is_exported() -> None:
    assert distfork.Future is Future
