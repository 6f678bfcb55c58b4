"""Nested forks: a task that forks and waits never deadlocks, on one slot or many."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

import distfork
import tasks
from distfork.status import query_status

pytestmark = pytest.mark.timeout(120)


def fib_local(n: int) -> int:
    return n if n < 2 else fib_local(n - 1) + fib_local(n - 2)


@pytest.fixture(params=[1, 2], ids=["one-slot", "two-workers"])
def cluster(request: pytest.FixtureRequest) -> Iterator[str]:
    distfork.init(workers=request.param)
    try:
        rt = distfork.api._runtime
        assert rt is not None and rt.address is not None
        yield rt.address
    finally:
        distfork.shutdown()


def test_recursive_fibonacci_to_depth_12(cluster: str) -> None:
    assert distfork.wait(distfork.fork(tasks.fib, 12), timeout=100) == fib_local(12)
    counters = query_status(cluster)["counters"]
    # The waiting parents took their queued children back instead of blocking a slot.
    assert counters.get("tasks_reclaimed", 0) > 0


def test_recursive_merge_sort_of_a_million_numbers(cluster: str) -> None:
    xs = np.random.default_rng(1).integers(0, 1_000_000, size=1_000_000)
    out = distfork.wait(distfork.fork(tasks.merge_sort, xs, 100_000), timeout=100)
    assert np.array_equal(out, np.sort(xs))


def test_a_child_that_fails_fails_its_parent_with_the_same_type(cluster: str) -> None:
    def parent() -> None:
        distfork.wait(distfork.fork(tasks.fail, "deep"))

    with pytest.raises(tasks.CustomError, match="deep"):
        distfork.wait(distfork.fork(parent), timeout=60)


def test_a_sibling_that_a_free_worker_can_start_runs_there() -> None:
    """The waiting parent runs the child it waits for; the other child goes to the free worker."""
    distfork.init(workers=2)
    try:
        def parent() -> tuple[int, list[int]]:
            import os

            children = [distfork.fork(tasks.timed_sleep, 0.2) for _ in range(2)]
            return os.getpid(), [pid for pid, _, _ in distfork.wait_all(children)]

        runs = [distfork.wait(distfork.fork(parent), timeout=60) for _ in range(5)]
        assert any(any(c != p for c in children) for p, children in runs), f"no child ever ran elsewhere: {runs}"
        assert all(p in children for p, children in runs), f"the waiting parent ran none of its children: {runs}"
    finally:
        distfork.shutdown()
