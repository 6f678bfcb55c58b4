"""``distfork.Future`` and its helpers against the contracts of ``concurrent.futures`` and ``torch.futures``.

No cluster: futures completed by hand. Where distfork differs from torch on
purpose, the test pins our documented behaviour (README, "Differences from
torch.futures").
"""

from __future__ import annotations

import concurrent.futures
import gc
import pickle
import threading
import weakref
from typing import Any

import pytest

import distfork
from distfork import Future

pytestmark = pytest.mark.timeout(30)


class Payload:
    """A value whose lifetime a weak reference can watch."""


# -- cancel and the executor's hand-off -------------------------------------------


def test_cancel_of_a_pending_future_then_set_running_or_notify_cancel_returns_false() -> None:
    fut: Future[int] = Future()
    assert fut.cancel()
    assert fut.cancelled() and fut.done()
    # The step every executor's worker takes before running a work item:
    assert fut.set_running_or_notify_cancel() is False
    assert fut.set_running_or_notify_cancel() is False  # and again: still no RuntimeError
    assert fut.cancel()  # cancelling a cancelled future: True, as concurrent.futures says


def test_a_running_future_cannot_be_cancelled_and_completes() -> None:
    fut: Future[int] = Future()
    assert fut.set_running_or_notify_cancel() is True
    assert fut.running()
    assert not fut.cancel()
    fut.set_result(5)
    assert fut.result() == 5 and not fut.cancel()


def test_a_cancelled_future_is_done_for_concurrent_futures_wait_at_once() -> None:
    fut: Future[int] = Future()
    other: Future[int] = Future()
    fut.cancel()
    done, not_done = concurrent.futures.wait([fut, other], timeout=5, return_when=concurrent.futures.FIRST_COMPLETED)
    assert done == {fut} and not_done == {other}


def test_cancel_runs_each_done_callback_once() -> None:
    fut: Future[int] = Future()
    calls: list[Any] = []
    fut.add_done_callback(calls.append)
    fut.cancel()
    fut.cancel()
    fut.set_running_or_notify_cancel()
    assert calls == [fut]


# -- the fields concurrent.futures relies on ------------------------------------------


def test_a_future_has_every_field_of_a_concurrent_futures_future() -> None:
    # Future.__init__ sets concurrent.futures.Future's fields itself (with a lighter condition).
    assert set(vars(concurrent.futures.Future())) <= set(vars(Future()))


def test_waiting_on_a_future_in_several_threads_with_and_without_timeouts() -> None:
    fut: Future[int] = Future()
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.01)
    other: Future[int] = Future()
    got: list[Any] = []
    waiters = [threading.Thread(target=lambda: got.append(fut.result())) for _ in range(3)]
    waiters.append(threading.Thread(target=lambda: got.append(
        concurrent.futures.wait([fut, other], return_when=concurrent.futures.FIRST_COMPLETED).done)))
    for t in waiters:
        t.start()
    with fut._condition:  # re-entrant, as concurrent.futures needs (cancel() takes it twice)
        with fut._condition:
            pass
    fut.set_result(7)
    for t in waiters:
        t.join(10)
    assert sorted(map(str, got)) == sorted(["7", "7", "7", str({fut})])
    assert other.cancel() and concurrent.futures.wait([other], timeout=0).done == {other}


# -- as_completed leaves nothing behind ------------------------------------------


def callbacks_of(fut: concurrent.futures.Future[Any]) -> list[Any]:
    return list(fut._done_callbacks)  # type: ignore[attr-defined]


def test_as_completed_removes_its_callbacks_after_a_timeout() -> None:
    done: Future[int] = Future()
    done.set_result(1)
    pending: Future[int] = Future()
    it = distfork.as_completed([done, pending], timeout=0.05)
    assert next(it) is done
    with pytest.raises(TimeoutError):
        next(it)
    assert callbacks_of(done) == [] and callbacks_of(pending) == []


def test_as_completed_removes_its_callbacks_when_the_caller_stops_iterating() -> None:
    futs: list[Future[Payload]] = [Future() for _ in range(3)]
    futs[0].set_result(Payload())
    value = weakref.ref(futs[0].result())
    for fut in distfork.as_completed(futs):
        assert fut is futs[0]
        break
    gc.collect()
    assert all(callbacks_of(f) == [] for f in futs)
    # The finished future is no longer kept alive by the others' callbacks (nor is its value).
    first = weakref.ref(futs[0])
    del futs[0], fut
    gc.collect()
    assert first() is None and value() is None


def test_as_completed_removes_its_callbacks_once_all_came() -> None:
    futs: list[Future[int]] = [Future() for _ in range(2)]
    for i, f in enumerate(futs):
        f.set_result(i)
    it = distfork.as_completed(futs)
    assert sorted(f.result() for f in it) == [0, 1]
    assert all(callbacks_of(f) == [] for f in futs)


# -- torch.futures differences ---------------------------------------------------


def test_collect_all_with_a_failed_future_holds_the_first_failure_as_torch_does() -> None:
    a: Future[int] = Future()
    b: Future[int] = Future()
    c: Future[int] = Future()
    combined = distfork.collect_all([a, b, c])
    b.set_exception(KeyError("b"))
    c.set_exception(ValueError("c"))
    assert not combined.done()
    a.set_result(1)
    with pytest.raises(KeyError, match="b"):
        combined.result(timeout=5)


def test_collect_all_of_successes_is_the_list_and_of_a_cancelled_one_a_cancelled_error() -> None:
    a: Future[int] = Future()
    a.set_result(1)
    assert distfork.collect_all([a]).result(timeout=5) == [a]
    b: Future[int] = Future()
    b.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        distfork.collect_all([a, b]).result(timeout=5)


def test_an_error_raised_in_then_keeps_its_type() -> None:
    """torch wraps it in RuntimeError; we keep the callback's own exception (documented)."""
    fut: Future[int] = Future()
    chained = fut.then(lambda f: f.value() // 0)
    fut.set_result(1)
    with pytest.raises(ZeroDivisionError):
        chained.wait()


def test_a_second_set_result_raises_invalid_state_error() -> None:
    fut: Future[int] = Future()
    fut.set_result(1)
    with pytest.raises(concurrent.futures.InvalidStateError):
        fut.set_result(2)
    assert fut.result() == 1


def test_wait_all_raises_a_failure_without_waiting_for_the_pending_ones() -> None:
    failed: Future[int] = Future()
    pending: Future[int] = Future()
    failed.set_exception(ValueError("first"))
    with pytest.raises(ValueError, match="first"):
        distfork.wait_all([pending, failed], timeout=10)
    assert not pending.done()


def test_pickling_a_future_says_it_is_a_distfork_future_and_what_to_do() -> None:
    fut: Future[int] = Future()
    fut.set_result(1)
    with pytest.raises(TypeError, match=r"distfork\.Future cannot be pickled.*fut\.result\(\)"):
        pickle.dumps(fut)


# -- futures of the wrong kind ---------------------------------------------------------


def test_wait_all_with_a_torch_future_names_the_wait_to_use() -> None:
    torch = pytest.importorskip("torch")
    tf = torch.futures.Future()
    tf.set_result(1)
    with pytest.raises(TypeError, match=r"torch future.*torch\.futures\.wait_all"):
        distfork.wait_all([tf])
    with pytest.raises(TypeError, match=r"torch future.*torch\.jit\.wait"):
        distfork.wait(tf)
    with pytest.raises(TypeError, match="torch future"):
        distfork.collect_all([tf])


def test_wait_all_with_something_that_is_no_future_says_what_it_got() -> None:
    with pytest.raises(TypeError, match="got builtins.int"):
        distfork.wait_all([3])


def test_torch_jit_wait_cannot_take_a_distfork_future() -> None:
    """A documented limit: torch.jit.wait is torch's own C++ call; its error is torch's."""
    torch = pytest.importorskip("torch")
    fut: Future[int] = Future()
    fut.set_result(1)
    with pytest.raises(TypeError):
        torch.jit.wait(fut)


# -- Executor's arguments ------------------------------------------------------------


def test_executor_first_positional_argument_is_max_workers() -> None:
    import inspect

    params = list(inspect.signature(distfork.Executor).parameters.values())
    assert params[0].name == "max_workers"
    assert inspect.signature(distfork.Executor).parameters["address"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"address": 5}, TypeError, r"address is a string such as 'tcp://host:7340', got int"),
        ({"address": "localhost"}, ValueError, r"'localhost' is not an address"),
        ({"max_workers": "tcp://h:1"}, TypeError, r"Executor\(address='tcp://h:1'\)"),
        ({"max_workers": 2.5}, TypeError, "max_workers must be an int"),
    ],
)
def test_executor_bad_arguments_get_a_clear_error_before_anything_starts(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    threads = threading.active_count()
    with pytest.raises(error, match=match):
        distfork.Executor(**kwargs)
    assert distfork.api._runtime is None and threading.active_count() == threads


def test_init_with_an_address_that_is_not_a_string_says_so() -> None:
    with pytest.raises(TypeError, match=r"distfork.init\(address\).*got int"):
        distfork.init(5)  # type: ignore[arg-type]
    assert distfork.api._runtime is None
