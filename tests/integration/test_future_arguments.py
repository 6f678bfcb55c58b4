"""Futures as arguments: the task gets the value; a failed one fails the task unrun."""

from __future__ import annotations

import concurrent.futures
import random
import threading
from typing import Any

import pytest

import distfork
import distfork.direct
import tasks
from conftest import wait_until
from distfork.status import query_status

pytestmark = pytest.mark.timeout(60)


def test_a_future_argument_passes_its_value(shared_cluster: list[int]) -> None:
    first = distfork.fork(tasks.add, 1, 2)
    assert distfork.wait(distfork.fork(tasks.add, first, 10), timeout=30) == 13


def test_futures_inside_containers_pass_their_values(shared_cluster: list[int]) -> None:
    a, b = distfork.fork(tasks.add, 1, 1), distfork.fork(tasks.add, 2, 2)
    out = distfork.fork(tasks.identity, {"xs": [a, (b, 5)]})
    assert distfork.wait(out, timeout=30) == {"xs": [2, (4, 5)]}


def test_a_failed_future_argument_fails_the_task_with_the_same_exception_unrun(
    shared_cluster: list[int], tmp_path
) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "ran"
    failed = distfork.fork(tasks.fail, "upstream")
    dependent = distfork.fork(tasks.touch_and_return, str(marker), failed)
    with pytest.raises(tasks.CustomError, match="upstream"):
        distfork.wait(dependent, timeout=30)
    # A later task on the same cluster has run by now; the dependent never did.
    assert distfork.wait(distfork.fork(tasks.add, 1, 1), timeout=30) == 2
    assert not marker.exists()


def test_cancelling_the_dependency_cancels_the_dependent(shared_cluster: list[int], tmp_path) -> None:  # type: ignore[no-untyped-def]
    gate = tmp_path / "gate"
    # Both slots busy, so the dependency stays queued (cancelling a running task would end
    # a worker of the shared cluster).
    busy = [distfork.fork(tasks.wait_for_path, str(gate)) for _ in shared_cluster]
    slow = distfork.fork(tasks.wait_for_path, str(gate))
    dependent = distfork.fork(tasks.identity, slow)
    try:
        assert slow.cancel()
        concurrent.futures.wait([dependent], timeout=30)
        assert dependent.cancelled()
    finally:
        gate.touch()
    assert distfork.wait_all(busy, timeout=30) == ["released"] * len(busy)


def test_a_chain_of_future_arguments_and_a_fan_out(shared_cluster: list[int]) -> None:
    a = distfork.fork(tasks.add, 1, 1)
    b = distfork.fork(tasks.add, a, 1)
    c = distfork.fork(tasks.add, b, a)
    fan = [distfork.fork(tasks.add, c, i) for i in range(20)]
    assert distfork.wait_all(fan, timeout=30) == [5 + i for i in range(20)]
    assert [a.result(), b.result(), c.result()] == [2, 3, 5]


def test_a_failure_fails_every_task_downstream_unrun(shared_cluster: list[int], tmp_path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "ran"
    failed = distfork.fork(tasks.fail, "root cause")
    child = distfork.fork(tasks.touch_and_return, str(marker), failed)
    grandchild = distfork.fork(tasks.touch_and_return, str(marker), child)
    for fut in (failed, child, grandchild):
        with pytest.raises(tasks.CustomError, match="root cause"):
            distfork.wait(fut, timeout=30)
    assert not marker.exists()


def test_a_result_that_reached_the_driver_first_is_sent_again_with_its_value(
    shared_cluster: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race: the dependency finished and its result is on its way to the driver when the
    dependent task reaches the broker. The broker answers RESUBMIT; the driver pickles the call
    again with the value it has by then. (A race of the broker path: a lone fork on the direct
    path is never named by reference, so `first` takes the broker path here.)"""
    monkeypatch.setattr(distfork.direct, "eligible", lambda *args: False)
    rt = distfork.api._runtime
    assert rt is not None and rt.driver is not None and rt.address is not None
    driver = rt.driver
    deliver = driver._results
    stash: list[Any] = []
    held_back = threading.Event()

    def slow_results(entries: list[Any]) -> None:  # runs on the driver's I/O thread
        # The first result of a task still in flight is `first`'s: the only task in flight here. (Not
        # matched by its id, which the test learns after fork() returns: the I/O thread may send the
        # task and receive its result before this thread runs again, within one GIL switch interval.)
        mine = [e for e in entries if e.id in driver._inflight] if not held_back.is_set() else []
        if mine:
            stash.extend(mine)
            held_back.set()
            entries = [e for e in entries if e.id != mine[0].id]
        deliver(entries)

    # In place before the fork: on a busy machine the result could come back before a later patch.
    driver._results = slow_results  # type: ignore[method-assign]
    try:
        first = distfork.fork(tasks.add, 1, 2)
        assert held_back.wait(30)
        assert [e.id for e in stash] == [first.task_id]
        assert not first.done()  # the broker is done with it; the driver does not know yet
        resubmitted = query_status(rt.address)["counters"].get("tasks_resubmitted", 0)
        dependent = distfork.fork(tasks.add, first, 10)
        wait_until(lambda: query_status(rt.address)["counters"].get("tasks_resubmitted", 0) > resubmitted or None,
                   10, what="the broker to ask for the task again")
        assert not dependent.done()
        deliver(stash)  # the delayed result arrives (on this thread: the I/O thread only sends meanwhile)
        assert distfork.wait(dependent, timeout=30) == 13
    finally:
        driver._results = deliver  # type: ignore[method-assign]



def test_a_random_graph_of_future_arguments_matches_local_evaluation(shared_cluster: list[int]) -> None:
    """300 tasks, each adding two earlier results (or constants); a sum divisible by 29 fails, and so does
    everything downstream of it, with that same error. Some results are held, some reach the driver first."""
    rng = random.Random(6)
    local: list[int | BaseException] = []
    futures: list[distfork.Future[int]] = []
    for i in range(300):
        picks = [rng.randrange(i) if i and rng.random() < 0.8 else None for _ in range(2)]
        consts = [rng.randrange(1, 50) for _ in range(2)]
        args = [futures[p] if p is not None else c for p, c in zip(picks, consts, strict=True)]
        values = [local[p] if p is not None else c for p, c in zip(picks, consts, strict=True)]
        failed = next((v for v in values if isinstance(v, BaseException)), None)
        if failed is None:
            a, b = values
            assert isinstance(a, int) and isinstance(b, int)
            local.append(tasks.CustomError("x") if (a + b) % 29 == 0 else a + b)
        else:
            local.append(failed)
        futures.append(distfork.fork(tasks.add_or_fail, *args))
        if rng.random() < 0.1:
            concurrent.futures.wait(futures[-3:], timeout=30)  # some producers finish before their takers come
    concurrent.futures.wait(futures, timeout=60)
    for i, (fut, want) in enumerate(zip(futures, local, strict=True)):
        if isinstance(want, BaseException):
            with pytest.raises(tasks.CustomError, match="multiple of 29"):
                fut.result(timeout=0)
        else:
            assert fut.result(timeout=30) == want, i
    assert any(isinstance(v, BaseException) for v in local) and sum(isinstance(v, int) for v in local) > 100
