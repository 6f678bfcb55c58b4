"""Futures as arguments: the task gets the value; a failed one fails the task unrun."""

from __future__ import annotations

import concurrent.futures

import pytest

import distfork
import tasks

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
    slow = distfork.fork(tasks.wait_for_path, str(gate))
    dependent = distfork.fork(tasks.identity, slow)
    try:
        assert slow.cancel()
        concurrent.futures.wait([dependent], timeout=30)
        assert dependent.cancelled()
    finally:
        gate.touch()
