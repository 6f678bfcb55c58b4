"""HeldValues without sockets: a user thread fetches a held value, the "I/O thread" (the test) answers."""

from __future__ import annotations

import gc
import threading
from typing import Any

import pytest

from conftest import wait_until
from distfork.errors import DistforkError
from distfork.future import Future
from distfork.held import HeldValues
from distfork.protocol import Flag, ResultEntry, Status, TaskEntry


class FakeDriver:
    """What a held future needs of its driver: ``_fetch`` (Future.result calls it)."""

    def __init__(self) -> None:
        self.wakes = 0
        self.closing = False
        self.held = HeldValues(self.wake, lambda: self.closing)

    def wake(self) -> None:
        self.wakes += 1

    def _fetch(self, fut: Future[Any], timeout: float | None) -> Any:
        return self.held.fetch(fut, timeout)


def held_future(d: FakeDriver, task_id: int) -> Future[Any]:
    fut: Future[Any] = Future(lambda f: None)
    fut.driver, fut.task_id = d, task_id
    task = TaskEntry(task_id, 255, 0.0, [b"call"])
    d.held.hold(fut, task, None, ResultEntry(task_id, Status.OK, 0.1, [], Flag.HELD))
    return fut


def test_a_held_future_is_done_and_its_result_is_fetched_once_for_all_waiting_threads() -> None:
    d = FakeDriver()
    fut = held_future(d, 7)
    assert fut.done() and fut.held and 7 in d.held
    got: list[Any] = []
    waiters = [threading.Thread(target=lambda: got.append(fut.result(10))) for _ in range(3)]
    for t in waiters:
        t.start()
    wait_until(lambda: 7 in d.held.fetching, what="a fetch to be asked for")
    assert d.held.take_fetches() == [7]  # one FETCH, however many threads wait
    held = d.held.fetched(ResultEntry(7, Status.OK, 0.0, [b"frames"]), "the value", None)
    for t in waiters:
        t.join(10)
    assert got == ["the value"] * 3 and held.entry.id == 7
    assert not fut.held and fut.result(0) == "the value" and 7 not in d.held
    assert d.held.take_fetches() == []


def test_a_held_future_dropped_unfetched_is_released_and_close_fails_waiting_fetches() -> None:
    d = FakeDriver()
    fut = held_future(d, 1)
    del fut
    gc.collect()
    freed: list[Any] = []
    assert d.held.take_releases(freed.append) == [1] and freed == [None] and 1 not in d.held

    kept = held_future(d, 2)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            kept.result(10)
        except DistforkError as exc:
            errors.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    wait_until(lambda: 2 in d.held.fetching, what="a fetch to be asked for")
    d.closing = True
    d.held.close(freed.append)
    t.join(10)
    assert len(errors) == 1 and "shut down" in str(errors[0])
    with pytest.raises(DistforkError):
        d.held.fetch(kept, 1)
