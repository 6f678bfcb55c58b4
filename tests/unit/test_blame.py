"""Who is blamed when a worker is lost, with a fake clock (BrokerState without sockets).

A worker holds finished results back to send a burst together, so when it
had tasks prefetched, the broker cannot tell the task that crashed it from
one that finished just before: such a loss fails no task; every task of that
worker comes back as a *suspect*, which runs alone (never prefetched, nothing
prefetched behind it), so the next loss is blamed exactly.
"""

from __future__ import annotations

from typing import Any

from state_outbox import dispatch, outbox

from distfork.broker_state import BrokerState, PeerInfo, Task
from distfork.config import Config
from distfork.protocol import DEFAULT_RETRIES, Entry, ResultEntry, Status, TaskEntry

D1 = b"D-one"
W1, W2 = b"W-one", b"W-two"
TIMEOUT_S = 3.0  # heartbeat_s * liveness


def make_state(**overrides: Any) -> BrokerState:
    return BrokerState(Config(**{"heartbeat_s": 1.0, "liveness": 3, "max_retries": 2, **overrides}), now=0.0)


def driver(state: BrokerState) -> PeerInfo:
    return state.hello(D1, {"role": "driver", "name": "drv", "host": "dhost", "pid": 7}, 0.0)


def worker(state: BrokerState, peer: bytes, n: int, now: float = 0.0) -> PeerInfo:
    info = {"role": "worker", "name": f"wrk-{n}", "host": f"host-{n}", "pid": 1000 + n, "slots": 1}
    return state.hello(peer, info, now)


def submit(state: BrokerState, d: PeerInfo, *ids: int, code: int = DEFAULT_RETRIES) -> None:
    state.submit(d, [TaskEntry(i, code, 0.0, [b"call-%d" % i]) for i in ids], now=state.last_now)


def done(task: Task, run_s: float = 1e-4) -> Entry:
    return ResultEntry(task.key, Status.OK, run_s, [b"value"])


def warm_up(state: BrokerState, d: PeerInfo, w: PeerInfo) -> None:
    """One short task done on ``w``: from now on it is handed tasks beyond its slot."""
    submit(state, d, 10_000)
    (task,) = dispatch(state)[w.id]
    state.results(w, [done(task)], now=state.last_now)
    outbox(state)


def lose(state: BrokerState, w: PeerInfo, now: float) -> None:
    state.seen(D1, now)
    assert state.expire(now) == [w]


def test_a_loss_with_prefetched_tasks_fails_nothing_even_with_max_retries_0() -> None:
    state = make_state()
    d = driver(state)
    w = worker(state, W1, 1)
    warm_up(state, d, w)
    submit(state, d, 1, 2, 3, code=0)  # max_retries=0
    assert [t.task_id for t in dispatch(state)[W1]] == [1, 2, 3]  # 1 runs, 2 and 3 prefetched

    lose(state, w, TIMEOUT_S + 1)  # did 1 crash it, or 2 after 1 finished unreported?

    assert outbox(state) == ({}, {})  # no task failed
    assert [t.task_id for t in state.queue] == [1, 2, 3]
    assert all(t.suspect for t in state.queue)
    assert d.tasks[1].losses == 1 and d.tasks[2].losses == 0  # the loss is still counted


def test_suspects_run_alone_and_a_loss_while_one_runs_is_blamed_on_it() -> None:
    state = make_state()
    d = driver(state)
    w1 = worker(state, W1, 1)
    warm_up(state, d, w1)
    submit(state, d, 1, 2, code=0)
    dispatch(state)
    lose(state, w1, TIMEOUT_S + 1)
    submit(state, d, 3, 4, 5)  # ordinary tasks, behind the suspects

    now = TIMEOUT_S + 1
    w2 = worker(state, W2, 2, now)
    # it ran short tasks (for an older driver)
    state.results(w2, [ResultEntry(12345, Status.OK, 1e-4, [b"x"])], now=state.last_now)
    assert state.prefetch(w2) > 1
    assert [t.task_id for t in dispatch(state)[W2]] == [1]  # a suspect, alone: nothing prefetched behind it
    assert dispatch(state) == {}

    lose(state, w2, now + TIMEOUT_S + 1)  # 1 was alone: it crashed the worker
    results, _ = outbox(state)
    (entry,) = results[D1]
    assert (entry.id, entry.status) == (1, Status.LOST)
    assert "lost 2 times, more than max_retries=0" in bytes(entry.frames[0]).decode()
    assert [t.task_id for t in state.queue] == [2, 3, 4, 5]


def test_a_loss_with_one_task_handed_over_is_blamed_on_it() -> None:
    state = make_state()
    d = driver(state)
    w = worker(state, W1, 1)
    submit(state, d, 1, code=0)
    assert [t.task_id for t in dispatch(state)[W1]] == [1]
    lose(state, w, TIMEOUT_S + 1)
    results, _ = outbox(state)
    assert [(e.id, e.status) for e in results[D1]] == [(1, Status.LOST)]


def test_a_run_time_that_is_not_a_number_does_not_break_dispatch() -> None:
    state = make_state()
    d = driver(state)
    w = worker(state, W1, 1)
    # from a broken or hostile peer
    state.results(w, [ResultEntry(999, Status.OK, float("nan"), [b"x"])], now=state.last_now)
    state.results(w, [ResultEntry(998, Status.OK, float("inf"), [b"x"])], now=state.last_now)
    submit(state, d, 1, 2)
    assert [t.task_id for t in dispatch(state)[W1]] == [1]
    assert w.avg_run_s is None
