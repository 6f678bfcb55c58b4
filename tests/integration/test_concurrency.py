"""Concurrency is real: tasks on different workers overlap in time; many tasks all complete.

Overlap is judged from what the tasks report (worker pid, start and end
timestamps), never from how long the test took.
"""

from __future__ import annotations

import threading

import pytest

import distfork
import tasks
from conftest import wait_until
from distfork.status import query_status

from .support import embedded_cluster

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("shared_cluster")]

T = 60.0


def test_two_tasks_on_two_workers_overlap(shared_cluster: list[int]) -> None:
    futs = [distfork.fork(tasks.timed_sleep, 0.5) for _ in range(2)]
    (pid_a, start_a, end_a), (pid_b, start_b, end_b) = distfork.wait_all(futs, timeout=T)
    assert {pid_a, pid_b} == set(shared_cluster)  # one task on each worker
    assert max(start_a, start_b) < min(end_a, end_b), "the two tasks did not run at the same time"


def test_four_tasks_on_two_workers_use_both(shared_cluster: list[int]) -> None:
    runs = distfork.wait_all([distfork.fork(tasks.timed_sleep, 0.2) for _ in range(4)], timeout=T)
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for pid, start, end in runs:
        by_pid.setdefault(pid, []).append((start, end))
    assert set(by_pid) == set(shared_cluster)
    for intervals in by_pid.values():  # a worker runs one task at a time (1 slot)
        intervals.sort()
        assert all(prev[1] <= nxt[0] for prev, nxt in zip(intervals, intervals[1:], strict=False))  # pairs


def test_many_tasks_all_complete_with_their_values() -> None:
    n = 2000
    futs = [distfork.fork(tasks.add, i, 1) for i in range(n)]
    assert distfork.wait_all(futs, timeout=T) == [i + 1 for i in range(n)]
    assert all(f.done() and not f.cancelled() for f in futs)


def test_many_tasks_from_several_threads() -> None:
    n_threads, per_thread = 4, 250
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def submit(t: int) -> None:
        try:
            futs = [distfork.fork(tasks.add, t * per_thread + i, 0) for i in range(per_thread)]
            results[t] = distfork.wait_all(futs, timeout=T)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(T)
    assert not errors
    assert not any(th.is_alive() for th in threads)
    for t in range(n_threads):
        assert results[t] == list(range(t * per_thread, (t + 1) * per_thread))


def test_results_arrive_as_tasks_finish_not_in_submission_order(tmp_path) -> None:  # type: ignore[no-untyped-def]
    gate = tmp_path / "open"
    slow = distfork.fork(tasks.wait_for_path, str(gate))
    quick = distfork.fork(tasks.add, 1, 1)
    try:
        assert distfork.wait(quick, timeout=T) == 2  # not held back by the earlier, unfinished task
        assert not slow.done()
    finally:
        gate.touch()
    assert distfork.wait(slow, timeout=T) == "released"


def test_short_tasks_do_not_wait_behind_a_long_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    address = embedded_cluster().address
    # Both workers learn that tasks are short, so the broker prefetches to them.
    distfork.wait_all([distfork.fork(tasks.getpid) for _ in range(200)], timeout=T)
    gate = tmp_path / "open"
    long = distfork.fork(tasks.wait_for_path, str(gate))
    try:
        wait_until(lambda: query_status(address)["running"] == 1, 10, what="the long task to be handed out")
        quick = [distfork.fork(tasks.getpid) for _ in range(20)]
        # A free worker exists the whole time: every short task can finish while the long one runs.
        distfork.wait_all(quick, timeout=5)
    finally:
        gate.touch()
        long.exception(T)
