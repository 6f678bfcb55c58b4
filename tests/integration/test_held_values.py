"""Held values: a future's result that other tasks take stays in the cluster, not in the driver.

These tests start a cluster of their own (the other future-argument tests
share one: tests/integration/test_future_arguments.py).
"""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path
from typing import Any

import pytest

import distfork
import tasks
from conftest import CliCluster, wait_until
from distfork.status import query_status

pytestmark = pytest.mark.timeout(120)


def _driver_row(address: str) -> dict:  # type: ignore[type-arg]
    rows = query_status(address)["drivers"]
    assert len(rows) == 1
    return rows[0]  # type: ignore[no-any-return]


N_BIG = 12_500_000  # float64: 100 MB


@pytest.mark.parametrize("shm", [False, True], ids=["frames", "shm"])
def test_a_100mb_intermediate_goes_from_task_to_task_never_through_the_driver(shm: bool) -> None:
    """The producer's result is held by the broker and handed to its consumers; the driver gets
    only a notice, until its user asks for the value itself."""
    distfork.init(workers=2, shm=shm)
    rt = distfork.api._runtime
    assert rt is not None and rt.address is not None
    try:
        produced = distfork.fork(tasks.ones, N_BIG, 0.2)  # still running when the consumers arrive
        consumers = [distfork.fork(tasks.sum_slowly, produced, 0.0) for _ in range(2)]
        doubled = distfork.fork(tasks.scale, produced, 2.0)  # a large intermediate of its own
        total = distfork.fork(tasks.sum_slowly, doubled, 0.0)
        assert distfork.wait_all(consumers, timeout=60) == [float(N_BIG)] * 2
        assert distfork.wait(total, timeout=60) == 2.0 * N_BIG
        row = _driver_row(rt.address)
        # Four small sums and two notices reached the driver: no array bytes.
        assert row["result_bytes"] < 10_000, row
        assert row["held"] == 2 and produced.held and doubled.held
        # Asked for, the held value comes (and only then counts against the driver).
        assert float(distfork.wait(produced).sum()) == N_BIG
        assert not produced.held
        if not shm:
            assert _driver_row(rt.address)["result_bytes"] >= N_BIG * 8
        # Dropped, fetched or not (a fetched segment: once the driver no longer maps it), holds are freed.
        del doubled, produced
        gc.collect()
        wait_until(lambda: _driver_row(rt.address)["held"] == 0 or None, 10, what="the broker to free the holds")
    finally:
        distfork.shutdown()


def test_a_task_forking_with_its_own_childs_future_never_deadlocks_on_one_slot() -> None:
    distfork.init(workers=1)
    try:
        assert distfork.wait(distfork.fork(tasks.chain_inside, 5), timeout=60) == 16
    finally:
        distfork.shutdown()


def test_held_values_survive_a_broker_restart(cli_cluster: CliCluster, tmp_path: Path) -> None:
    """The new broker has lost the held value: the driver runs its task again, then the task
    that takes it; the old broker's segment is not left behind (no_leaks checks)."""
    distfork.init(cli_cluster.address, heartbeat_s=0.2)
    gate = tmp_path / "gate"
    produced = distfork.fork(tasks.ones, 1_000_000)
    taker = distfork.fork(tasks.sum_after_gate, str(gate), produced)
    wait_until(lambda: produced.held, 30, what="the value to be held for its taker")
    cli_cluster.kill_broker()
    cli_cluster.restart_broker()
    cli_cluster.wait_for_workers(1)  # the other one runs the taker, still waiting for the gate
    wait_until(lambda: query_status(cli_cluster.address)["drivers"], 30, what="the driver to say hello again")
    gate.touch()
    assert distfork.wait(taker, timeout=60) == 1_000_000.0
    assert float(distfork.wait(produced, timeout=30).sum()) == 1_000_000.0
    distfork.shutdown()


def test_awaiting_a_held_future_fetches_its_value_off_the_event_loop() -> None:
    distfork.init(workers=2)
    rt = distfork.api._runtime
    assert rt is not None and rt.driver is not None
    driver = rt.driver
    fetch = driver._fetch
    fetched_on: list[threading.Thread] = []

    def recording_fetch(fut: distfork.Future[Any], timeout: float | None) -> Any:
        fetched_on.append(threading.current_thread())
        return fetch(fut, timeout)

    driver._fetch = recording_fetch  # type: ignore[method-assign]

    async def main() -> tuple[float, float, threading.Thread]:
        produced = distfork.fork(tasks.ones, 1000)
        taken = distfork.fork(tasks.sum_slowly, produced, 0.0)
        total = await taken
        assert produced.held
        value = await produced
        return total, float(value.sum()), threading.current_thread()

    try:
        total, fetched_sum, loop_thread = asyncio.run(main())
        assert total == fetched_sum == 1000.0
        assert fetched_on and loop_thread not in fetched_on
    finally:
        distfork.shutdown()


def test_wait_all_asks_for_every_held_value_in_one_message() -> None:
    distfork.init(workers=2)
    rt = distfork.api._runtime
    assert rt is not None and rt.driver is not None
    try:
        made = [distfork.fork(tasks.ones, 10 + i) for i in range(5)]
        takers = [distfork.fork(tasks.sum_slowly, m, 0.0) for m in made]
        assert distfork.wait_all(takers, timeout=30) == [10.0 + i for i in range(5)]
        assert all(m.held for m in made)
        driver = rt.driver
        sent: list[int] = []
        flush = driver._flush

        def counting_flush(sock: Any) -> None:  # on the I/O thread
            sent.append(len(driver.held.fetches))
            flush(sock)

        driver._flush = counting_flush  # type: ignore[method-assign]
        values = distfork.wait_all(made, timeout=30)
        assert [float(v.sum()) for v in values] == [10.0 + i for i in range(5)]
        assert [n for n in sent if n] == [5]  # one FETCH naming all five
    finally:
        distfork.shutdown()
