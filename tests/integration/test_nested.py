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


def test_children_that_a_free_worker_can_start_run_there() -> None:
    """With a free slot, a queued child is dispatched rather than given back to its waiting parent."""
    distfork.init(workers=2)
    try:
        def parent() -> tuple[int, int]:
            import os

            child = distfork.fork(tasks.getpid)
            return os.getpid(), distfork.wait(child)

        pairs = [distfork.wait(distfork.fork(parent), timeout=60) for _ in range(10)]
        assert any(p != c for p, c in pairs), f"no child ever ran on the other worker: {pairs}"
    finally:
        distfork.shutdown()
