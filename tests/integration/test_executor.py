"""``distfork.Executor`` against the behaviours ``concurrent.futures`` documents for executors.

submit; map (order, laziness, several iterables, timeout from the call,
chunksize, failed items); shutdown (wait, wait=False, cancel_futures, only
the executor's own futures); submit after shutdown; the context manager;
``loop.run_in_executor``; and the runtime: the current one, one the executor
starts (and stops), one at an address.

Tasks that must still be running at some point wait on a gate (a path the
test creates). A cancelled task the test says "never ran" would have created
a file; the test drains the cluster with later tasks before looking.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

import distfork
import tasks
from conftest import wait_until
from distfork.cluster import LocalCluster
from distfork.status import query_status

from .support import all_gone, wait_for_workers

pytestmark = pytest.mark.timeout(60)

T = 30.0  # the longest any single wait in this module may take


def drain() -> None:
    """Run a few tasks through every worker: what was queued before them has been dispatched."""
    assert distfork.wait_all([distfork.fork(tasks.identity, i) for i in range(4)], timeout=T) == [0, 1, 2, 3]


def broker_cancelled() -> int:
    runtime = distfork.api._runtime
    assert runtime is not None and runtime.address is not None
    return int(query_status(runtime.address)["counters"].get("tasks_cancelled", 0))


def wait_for_broker_cancels(before: int, n: int) -> None:
    """Wait until the broker has taken ``n`` cancels since it counted ``before``.

    ``fut.cancel()`` returns at once and the cancel travels on: a test that
    frees a worker must first let it arrive, or the task may start before.
    """
    wait_until(lambda: broker_cancelled() - before >= n, T, what=f"the broker to take {n} cancels")
    broker_cancelled()  # one more round trip: its CANCEL to the worker has gone out


def disjoint(intervals: list[tuple[int, float, float]]) -> bool:
    spans = sorted((start, end) for _, start, end in intervals)
    return all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))  # noqa: B905


@dataclass
class Occupied:
    """Both workers of the shared cluster run a gated task that is not the executor's."""

    futures: list[distfork.Future[int]]
    release: Callable[[], None]


@pytest.fixture
def occupied(tmp_path: Path) -> Iterator[Occupied]:
    gate = tmp_path / "occupied-gate"
    started = [tmp_path / f"occupied-{i}" for i in range(2)]
    futures = [distfork.fork(tasks.announce_and_wait, str(s), str(gate), T) for s in started]
    try:
        wait_until(lambda: all(s.exists() for s in started), T, what="both workers to start a gated task")
        yield Occupied(futures, gate.touch)
    finally:
        gate.touch()
        for fut in futures:
            fut.exception(T)


@pytest.fixture
def ex() -> Iterator[distfork.Executor]:
    executor = distfork.Executor()
    yield executor
    executor.shutdown(wait=True)


def run_in_thread(fn: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


class FakeClock:
    """Stands in for the ``time`` module of distfork.executor: real monotonic time plus ``offset_s``."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset_s


@pytest.mark.usefixtures("class_cluster")
class TestOnTheCurrentRuntime:
    """``Executor()`` in a process that already runs the embedded cluster (two workers)."""

    # -- submit ---------------------------------------------------------------

    def test_submit_returns_a_distfork_future_of_the_value_computed_in_a_worker(
        self, ex: distfork.Executor, class_cluster: list[int]
    ) -> None:
        fut = ex.submit(tasks.add, 40, 2)
        assert isinstance(fut, distfork.Future)
        assert fut.result(T) == 42
        assert ex.submit(tasks.getpid).result(T) in class_cluster

    def test_submit_passes_keyword_arguments_even_ones_named_fn_or_self(self, ex: distfork.Executor) -> None:
        assert ex.submit(tasks.echo_kwargs, fn=1, self=2).result(T) == {"fn": 1, "self": 2}

    def test_an_exception_in_the_task_is_raised_as_its_own_type_with_the_remote_traceback(
        self, ex: distfork.Executor
    ) -> None:
        fut = ex.submit(tasks.fail, "boom")
        with pytest.raises(tasks.CustomError, match="boom") as excinfo:
            fut.result(T)
        assert isinstance(excinfo.value.__cause__, distfork.RemoteTraceback)
        assert isinstance(fut.exception(), tasks.CustomError)

    def test_max_workers_bounds_the_executors_unfinished_tasks(self) -> None:
        # Two workers are free, but with max_workers=1 the next task goes out
        # only once the previous result is back: the run times cannot overlap.
        ex = distfork.Executor(max_workers=1)
        try:
            intervals = list(ex.map(tasks.timed_sleep, [0.1] * 3, timeout=T))
        finally:
            ex.shutdown()
        assert disjoint(intervals), intervals

    # -- map ------------------------------------------------------------------

    def test_map_yields_in_the_order_of_the_items_not_of_completion(
        self, ex: distfork.Executor, tmp_path: Path
    ) -> None:
        gate = str(tmp_path / "gate")
        marks = str(tmp_path)

        def item(x: int) -> Any:
            if x == 0:
                return tasks.wait_for_path(gate, T)
            open(os.path.join(marks, f"done-{x}"), "w").close()
            return x

        results = ex.map(item, range(6), timeout=T)
        wait_until(lambda: all((tmp_path / f"done-{x}").exists() for x in range(1, 6)), T,
                   what="items 1 to 5 to finish while item 0 waits")
        Path(gate).touch()
        assert list(results) == ["released", 1, 2, 3, 4, 5]

    def test_map_yields_a_result_before_later_items_are_done(self, ex: distfork.Executor, tmp_path: Path) -> None:
        gate = tmp_path / "gate"
        results = ex.map(tasks.wait_for_path_holding, [str(tmp_path), str(gate)], ["first", "second"], timeout=T)
        assert next(results) == "first"  # the second item is still waiting for its gate
        gate.touch()
        assert next(results) == "second"
        with pytest.raises(StopIteration):
            next(results)

    def test_map_over_several_iterables_stops_at_the_shortest(self, ex: distfork.Executor) -> None:
        assert list(ex.map(tasks.add, range(5), [10, 20, 30], timeout=T)) == [10, 21, 32]

    def test_map_timeout_raises_builtin_timeout_error_measured_from_the_call_and_cancels_the_rest(
        self, ex: distfork.Executor, occupied: Occupied, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        clock = FakeClock()
        monkeypatch.setattr(distfork.executor, "time", clock)
        paths = [tmp_path / f"item-{i}" for i in range(3)]
        cancels_before = broker_cancelled()
        results = ex.map(tasks.touch, [str(p) for p in paths], timeout=10.0)  # queued: both workers are busy
        clock.offset_s = 11.0  # the deadline passed between the call and the first next()
        began = time.monotonic()
        with pytest.raises(TimeoutError) as excinfo:
            next(results)
        assert excinfo.type is TimeoutError
        assert time.monotonic() - began < 5.0  # it did not wait another 10 s
        wait_for_broker_cancels(cancels_before, len(paths))
        occupied.release()
        drain()
        assert [p.name for p in paths if p.exists()] == []  # the items not yielded were cancelled

    @pytest.mark.parametrize("n, chunksize, tasks_expected", [(10, 1, 10), (10, 3, 4), (10, 10, 1), (10, 50, 1)])
    def test_map_chunksize_sends_one_task_per_chunk_and_keeps_the_order(
        self, ex: distfork.Executor, n: int, chunksize: int, tasks_expected: int
    ) -> None:
        before = tasks_done_by_this_driver()
        assert list(ex.map(tasks.add, range(n), range(n), timeout=T, chunksize=chunksize)) == [2 * i for i in range(n)]
        # The broker hears of a lone (direct) task within a few milliseconds of its result.
        wait_until(lambda: tasks_done_by_this_driver() - before >= tasks_expected, T, what="the broker to count them")
        assert tasks_done_by_this_driver() - before == tasks_expected

    def test_map_chunksize_below_one_is_refused(self, ex: distfork.Executor) -> None:
        with pytest.raises(ValueError, match="chunksize"):
            ex.map(tasks.add, [1], [2], chunksize=0)

    @pytest.mark.parametrize("chunksize", [1, 2])
    def test_map_raises_a_failed_items_exception_when_the_iteration_reaches_it(
        self, ex: distfork.Executor, chunksize: int
    ) -> None:
        results = ex.map(lambda x: 10 // x, [1, 2, 0], timeout=T, chunksize=chunksize)
        assert next(results) == 10
        assert next(results) == 5
        with pytest.raises(ZeroDivisionError) as excinfo:
            next(results)
        assert isinstance(excinfo.value.__cause__, distfork.RemoteTraceback)

    def test_map_with_an_unpicklable_item_raises_at_the_call(self, ex: distfork.Executor) -> None:
        with pytest.raises(distfork.SerializationError):
            ex.map(tasks.identity, [1, threading.Lock()])

    # -- shutdown ---------------------------------------------------------------

    def test_submit_and_map_after_shutdown_raise_runtime_error(self) -> None:
        ex = distfork.Executor()
        ex.shutdown()
        with pytest.raises(RuntimeError, match="after shutdown"):
            ex.submit(tasks.add, 1, 2)
        with pytest.raises(RuntimeError, match="after shutdown"):
            ex.map(tasks.add, [1], [2])
        ex.shutdown()  # a second shutdown is harmless

    def test_shutdown_waits_for_the_executors_futures(self, tmp_path: Path) -> None:
        gate = tmp_path / "gate"
        ex = distfork.Executor()
        fut = ex.submit(tasks.wait_for_path, str(gate), T)
        returned = run_in_thread(lambda: ex.shutdown(wait=True))
        returned.join(0.5)
        assert returned.is_alive(), "shutdown(wait=True) returned while the executor's task still ran"
        gate.touch()
        returned.join(T)
        assert not returned.is_alive()
        assert fut.result(0) == "released"

    def test_shutdown_waits_for_its_own_futures_only_and_leaves_the_runtime_running(self, tmp_path: Path) -> None:
        gate = tmp_path / "gate"
        runtime = distfork.api._runtime
        foreign = distfork.fork(tasks.wait_for_path, str(gate), T)
        try:
            ex = distfork.Executor()
            mine = ex.submit(tasks.add, 1, 2)
            ex.shutdown(wait=True)
            assert mine.result(0) == 3
            assert not foreign.done()  # another's task neither waited for nor cancelled
            assert distfork.api._runtime is runtime
            assert distfork.wait(distfork.fork(tasks.add, 2, 2), T) == 4
        finally:
            gate.touch()
        assert foreign.result(T) == "released"

    def test_shutdown_without_wait_returns_at_once_and_the_tasks_go_on(self, tmp_path: Path) -> None:
        gate = tmp_path / "gate"
        ex = distfork.Executor()
        fut = ex.submit(tasks.wait_for_path, str(gate), T)
        try:
            ex.shutdown(wait=False)
            assert not fut.done()
            with pytest.raises(RuntimeError):
                ex.submit(tasks.add, 1, 2)
        finally:
            gate.touch()
        assert fut.result(T) == "released"

    def test_shutdown_cancel_futures_cancels_the_executors_queued_tasks_and_no_others(
        self, occupied: Occupied, tmp_path: Path
    ) -> None:
        paths = [tmp_path / f"mine-{i}" for i in range(5)]
        cancels_before = broker_cancelled()
        ex = distfork.Executor()
        mine = [ex.submit(tasks.touch, str(p)) for p in paths]  # queued: both workers are busy
        ex.shutdown(wait=True, cancel_futures=True)
        assert all(f.cancelled() for f in mine)
        assert not any(f.done() for f in occupied.futures)
        wait_for_broker_cancels(cancels_before, len(paths))
        occupied.release()
        assert all(isinstance(f.result(T), int) for f in occupied.futures)
        drain()
        assert [p.name for p in paths if p.exists()] == []

    # -- context manager ------------------------------------------------------------

    def test_the_with_block_waits_for_the_tasks_on_exit_and_then_refuses_more(self) -> None:
        with distfork.Executor() as ex:
            futs = [ex.submit(tasks.timed_sleep, 0.2) for _ in range(3)]
        assert all(f.done() for f in futs)
        assert len({f.result() for f in futs}) == 3
        with pytest.raises(RuntimeError):
            ex.submit(tasks.add, 1, 2)

    def test_an_exception_in_the_with_block_propagates_after_the_shutdown(self) -> None:
        with pytest.raises(KeyError):
            with distfork.Executor() as ex:
                fut = ex.submit(tasks.timed_sleep, 0.2)
                raise KeyError("from the block")
        assert fut.done()
        with pytest.raises(RuntimeError):
            ex.submit(tasks.add, 1, 2)

    # -- asyncio ----------------------------------------------------------------------

    def test_run_in_executor_returns_values_and_raises_task_errors(
        self, ex: distfork.Executor, class_cluster: list[int]
    ) -> None:
        async def main() -> tuple[list[int], int]:
            loop = asyncio.get_running_loop()
            values = await asyncio.gather(*(loop.run_in_executor(ex, tasks.add, i, 1) for i in range(10)))
            with pytest.raises(tasks.CustomError, match="boom"):
                await loop.run_in_executor(ex, tasks.fail, "boom")
            return values, await loop.run_in_executor(ex, tasks.getpid)

        values, pid = asyncio.run(asyncio.wait_for(main(), T))
        assert values == list(range(1, 11))
        assert pid in class_cluster  # it ran in a worker, not in a thread of the loop

    # -- which runtime ---------------------------------------------------------------

    def test_an_executor_for_the_current_address_uses_the_runtime_and_leaves_it(self) -> None:
        runtime = distfork.api._runtime
        assert runtime is not None
        with distfork.Executor(address=runtime.address) as ex:
            assert ex.submit(tasks.add, 1, 1).result(T) == 2
        assert distfork.api._runtime is runtime

    def test_an_executor_for_another_address_is_refused_while_a_runtime_runs(self) -> None:
        runtime = distfork.api._runtime
        with pytest.raises(distfork.DistforkError, match="tcp://127.0.0.1:9.*distfork.shutdown"):
            distfork.Executor(address="tcp://127.0.0.1:9")
        with pytest.raises(distfork.DistforkError, match="heartbeat_s"):
            distfork.Executor(heartbeat_s=0.5)
        assert distfork.api._runtime is runtime

    def test_max_workers_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="max_workers"):
            distfork.Executor(max_workers=0)


def tasks_done_by_this_driver() -> int:
    runtime = distfork.api._runtime
    assert runtime is not None and runtime.address is not None
    [driver] = [d for d in query_status(runtime.address)["drivers"] if d["pid"] == os.getpid()]
    return int(driver["done"])


# -- an executor that starts the runtime ------------------------------------------------


def test_an_executor_starts_the_embedded_cluster_with_max_workers_workers_and_stops_it() -> None:
    assert distfork.api._runtime is None
    with distfork.Executor(max_workers=1) as ex:
        runtime = distfork.api._runtime
        assert runtime is not None and runtime.cluster is not None
        status = wait_for_workers(runtime.cluster.address, 1)
        assert len(status["workers"]) == 1
        procs = [psutil.Process(p) for p in runtime.cluster.pids]
        pids = {f.result(T) for f in [ex.submit(tasks.getpid) for _ in range(4)]}
        assert pids == {status["workers"][0]["pid"]}
    assert distfork.api._runtime is None
    wait_until(lambda: all_gone(procs), T, what="the executor's cluster to stop")


def test_shutdown_without_wait_stops_the_runtime_it_started_once_its_tasks_are_done(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    ex = distfork.Executor(max_workers=1)
    runtime = distfork.api._runtime
    fut = ex.submit(tasks.wait_for_path, str(gate), T)
    try:
        ex.shutdown(wait=False)
        assert not fut.done()
        assert distfork.api._runtime is runtime  # its task still runs there
    finally:
        gate.touch()
    assert fut.result(T) == "released"
    wait_until(lambda: distfork.api._runtime is None, T, what="the executor to shut down the runtime it started")


def test_cancel_futures_stops_the_executors_running_tasks_too(tmp_path: Path) -> None:
    started, gate, never = tmp_path / "started", tmp_path / "gate", tmp_path / "never"
    ex = distfork.Executor(max_workers=1)
    running = ex.submit(tasks.announce_and_wait, str(started), str(gate), 20.0)
    queued = ex.submit(tasks.touch, str(never))
    wait_until(started.exists, T, what="the gated task to start")
    ex.shutdown(wait=True, cancel_futures=True)  # the gate stays shut: it must not wait for the running task
    assert running.cancelled() and queued.cancelled()
    assert distfork.api._runtime is None
    assert not never.exists()


def test_an_executor_at_an_address_connects_this_process_and_leaves_that_cluster_running() -> None:
    cluster = LocalCluster(distfork.config.load(), workers=2)
    cluster.start()
    try:
        wait_for_workers(cluster.address, 2)
        with distfork.Executor(1, address=cluster.address) as ex:
            runtime = distfork.api._runtime
            assert runtime is not None and runtime.cluster is None and runtime.address == cluster.address
            # The cluster has two free workers; max_workers=1 bounds our tasks in flight.
            intervals = list(ex.map(tasks.timed_sleep, [0.1] * 3, timeout=T))
        assert disjoint(intervals), intervals
        assert distfork.api._runtime is None
        assert len(query_status(cluster.address)["workers"]) == 2  # not ours to stop
    finally:
        cluster.stop()


def test_submit_after_the_runtime_was_shut_down_raises_runtime_error() -> None:
    ex = distfork.Executor(mode="inline")  # the executor starts the runtime: inline mode is enough here
    assert ex.submit(tasks.add, 1, 2).result(T) == 3
    distfork.shutdown()
    with pytest.raises(RuntimeError, match="runtime this executor used was shut down"):
        ex.submit(tasks.add, 1, 2)
    ex.shutdown()
    assert distfork.api._runtime is None  # no runtime started again behind the user's back
