"""BrokerState without sockets: a fake clock (``now`` floats) drives every method."""

from __future__ import annotations

from typing import Any

import pytest
from state_outbox import aborts, discards, dispatch, outbox, reclaimed, recycles

from distfork.broker_state import BrokerState, PeerInfo, Task, TaskState
from distfork.config import Config
from distfork.protocol import (
    DEFAULT_RETRIES,
    Entry,
    Flag,
    Keepalive,
    ResultEntry,
    Status,
    TaskEntry,
    decode_dep_counts,
    encode_deps,
)

D1, D2 = b"D-one", b"D-two"
W1, W2, W3 = b"W-one", b"W-two", b"W-three"

# peer_timeout_s = heartbeat_s * liveness = 3.0
TIMEOUT_S = 3.0


def make_state(**overrides: Any) -> BrokerState:
    config = Config(**{"heartbeat_s": 1.0, "liveness": 3, "max_retries": 2, **overrides})
    assert config.peer_timeout_s == TIMEOUT_S
    return BrokerState(config, now=0.0)


def driver(state: BrokerState, peer: bytes = D1, now: float = 0.0) -> PeerInfo:
    return state.hello(peer, {"role": "driver", "name": f"drv-{peer.decode()}", "host": "dhost", "pid": 7}, now)


def worker(state: BrokerState, peer: bytes = W1, slots: int = 1, now: float = 0.0, n: int = 1) -> PeerInfo:
    info = {"role": "worker", "name": f"wrk-{n}", "host": f"host-{n}", "pid": 1000 + n, "slots": slots}
    return state.hello(peer, info, now)


def submit(state: BrokerState, d: PeerInfo, *ids: int, code: int = DEFAULT_RETRIES, timeout_s: float = 0.0) -> None:
    state.submit(d, [TaskEntry(i, code, timeout_s, [b"call-%d" % i, b"buf-%d" % i]) for i in ids], now=state.last_now)


def done(task: Task, run_s: float = 0.5, status: Status = Status.OK, payload: bytes = b"value") -> Entry:
    """A worker's result entry for ``task``."""
    return ResultEntry(task.key, status, run_s, [payload])


def warm_up(state: BrokerState, d: PeerInfo, w: PeerInfo, run_s: float, task_id: int = 10_000) -> None:
    """Run one task on ``w`` that took ``run_s``, so the broker knows its run time."""
    submit(state, d, task_id)
    (task,) = dispatch(state)[w.id]
    state.results(w, [done(task, run_s)], now=state.last_now)
    outbox(state)


# -- the happy path -------------------------------------------------------------


def test_tasks_go_to_a_worker_and_results_back_to_their_driver_under_its_task_ids() -> None:
    state = make_state()
    d1, d2 = driver(state, D1), driver(state, D2)
    w = worker(state, W1, slots=2)
    submit(state, d1, 1, timeout_s=2.5)
    submit(state, d2, 1)  # the same task id from another driver is another task

    sent = dispatch(state)
    assert list(sent) == [W1]
    t_a, t_b = sent[W1]
    assert t_a.key != t_b.key
    assert (t_a.driver, t_a.task_id, t_a.timeout_s, t_a.max_retries) == (D1, 1, 2.5, DEFAULT_RETRIES)
    assert (t_b.driver, t_b.task_id) == (D2, 1)
    assert list(t_a.frames) == [b"call-1", b"buf-1"]
    assert t_a.state is TaskState.ASSIGNED and t_a.worker == W1

    state.results(w, [done(t_b, 0.25, payload=b"for d2"), done(t_a, 0.5, Status.RAISED, payload=b"exc d1")],
        now=state.last_now)
    results, cancels = outbox(state)

    assert cancels == {}
    assert results == {
        D1: [ResultEntry(1, Status.RAISED, 0.5, [b"exc d1"])],
        D2: [ResultEntry(1, Status.OK, 0.25, [b"for d2"])],
    }
    assert outbox(state) == ({}, {})  # taken once
    assert w.assigned == {} and w.done == 1 and w.failed == 1
    assert d1.tasks == {} and d2.tasks == {}


def test_nothing_is_dispatched_without_workers_and_queued_tasks_wait_for_one() -> None:
    state = make_state()
    d = driver(state)
    submit(state, d, 1, 2)
    assert dispatch(state) == {}
    worker(state, W1, slots=4)
    assert [t.task_id for t in dispatch(state)[W1]] == [1, 2]
    assert dispatch(state) == {}


def test_free_slots_are_filled_before_any_prefetch() -> None:
    state = make_state()
    d = driver(state)
    w1 = worker(state, W1, n=1)
    warm_up(state, d, w1, run_s=1e-5)  # w1 would take many tasks as prefetch
    assert state.prefetch(w1) > 1
    w2 = worker(state, W2, n=2)

    submit(state, d, 1, 2)
    sent = dispatch(state)

    assert {w: [t.task_id for t in ts] for w, ts in sent.items()} == {W1: [1], W2: [2]}
    assert len(w1.assigned) == len(w2.assigned) == 1


def test_a_worker_with_short_tasks_gets_prefetch_beyond_its_slots() -> None:
    state = make_state(prefetch_s=0.002, prefetch_max=128)
    d = driver(state)
    w = worker(state, W1, slots=2)
    assert state.prefetch(w) == 0  # nothing known about its run times yet
    warm_up(state, d, w, run_s=1e-4)  # 0.002 s of work per slot = 20 tasks per slot

    submit(state, d, *range(100))
    sent = dispatch(state)[W1]

    assert state.prefetch(w) == 2 * 20
    assert len(sent) == 2 + 40
    assert [t.task_id for t in sent] == list(range(42))
    assert len(state.queue) == 100 - 42


def test_prefetch_is_capped_by_prefetch_max_per_slot() -> None:
    state = make_state(prefetch_s=0.002, prefetch_max=5)
    d = driver(state)
    w = worker(state, W1, slots=1)
    warm_up(state, d, w, run_s=1e-7)
    submit(state, d, *range(50))
    assert len(dispatch(state)[W1]) == 1 + 5


def test_a_worker_with_long_tasks_gets_nothing_beyond_its_slots() -> None:
    state = make_state(prefetch_s=0.002)
    d = driver(state)
    w = worker(state, W1, slots=2)
    warm_up(state, d, w, run_s=0.5)

    submit(state, d, *range(10))
    assert len(dispatch(state)[W1]) == 2
    assert dispatch(state) == {}  # full: no room until a result comes back
    state.results(w, [done(next(iter(w.assigned.values())), run_s=0.5)], now=state.last_now)
    assert len(dispatch(state)[W1]) == 1


# -- lost workers -----------------------------------------------------------------


def test_a_silent_worker_expires_and_its_tasks_are_requeued_with_a_loss_only_for_the_running_one() -> None:
    state = make_state()
    d = driver(state)
    w = worker(state, W1, slots=1)
    warm_up(state, d, w, run_s=1e-4)
    submit(state, d, 1, 2, 3, 4)
    assert [t.task_id for t in dispatch(state)[W1]] == [1, 2, 3, 4]  # 1 runs, 2..4 prefetched

    state.seen(D1, now=2.5)
    assert state.expire(now=2.9) == []  # not silent for long enough yet
    state.seen(D1, now=3.5)
    gone = state.expire(now=TIMEOUT_S + 0.5)

    assert gone == [w]
    assert W1 not in state.workers and W1 not in state.peers
    tasks = d.tasks
    assert [t.task_id for t in state.queue] == [1, 2, 3, 4]  # at the front, in order
    assert [tasks[i].losses for i in (1, 2, 3, 4)] == [1, 0, 0, 0]
    assert all(tasks[i].state is TaskState.QUEUED and tasks[i].worker is None for i in (1, 2, 3, 4))
    assert state.counters["tasks_retried"] == 1
    assert outbox(state) == ({}, {})  # nothing failed, nothing to recall

    w2 = worker(state, W2, slots=4, now=3.5, n=2)
    assert [t.task_id for t in dispatch(state)[W2]] == [1, 2, 3, 4]
    assert len(w2.assigned) == 4


def test_a_heartbeat_keeps_a_worker_alive() -> None:
    state = make_state()
    worker(state, W1)
    for t in (2.0, 4.0, 6.0):
        assert state.seen(W1, now=t) is not None
        assert state.expire(now=t + 1.0) == []
    assert state.seen(b"never said hello", now=6.0) is None
    assert [p.id for p in state.expire(now=6.0 + TIMEOUT_S + 0.1)] == [W1]


def test_a_task_lost_more_than_max_retries_times_fails_with_lost_naming_the_worker() -> None:
    state = make_state(max_retries=1)
    d = driver(state)
    submit(state, d, 5)
    now = 0.0
    for n in (1, 2):
        w = worker(state, b"W-%d" % n, now=now, n=n)
        assert [t.task_id for t in dispatch(state)[w.id]] == [5]
        now += TIMEOUT_S + 1
        state.seen(D1, now)
        assert state.expire(now) == [w]
        results, _ = outbox(state)
        if n == 1:
            assert results == {}  # 1 loss: retried
            assert d.tasks[5].losses == 1

    (entry,) = results[D1]
    assert entry.id == 5
    assert entry.status == Status.LOST
    text = bytes(entry.frames[0]).decode()
    assert "wrk-2" in text and "host host-2" in text and "pid 1002" in text
    assert "max_retries=1" in text
    assert 5 not in d.tasks
    assert list(state.queue) == []
    assert state.counters["tasks_lost"] == 1


@pytest.mark.parametrize(
    ("config_max_retries", "code", "losses_until_lost"),
    [
        (2, DEFAULT_RETRIES, 3),  # the cluster default
        (0, DEFAULT_RETRIES, 1),
        (0, 2, 3),  # the task's own max_retries wins over the config
        (5, 0, 1),
    ],
)
def test_max_retries_comes_from_the_task_entry_or_the_config(
    config_max_retries: int, code: int, losses_until_lost: int
) -> None:
    state = make_state(max_retries=config_max_retries)
    d = driver(state)
    submit(state, d, 1, code=code)
    now = 0.0
    for n in range(1, 20):
        worker(state, b"W-%d" % n, now=now, n=n)
        dispatch(state)
        now += TIMEOUT_S + 1
        state.seen(D1, now)
        state.expire(now)
        results, _ = outbox(state)
        if results:
            break
    assert n == losses_until_lost
    assert [(e.id, e.status) for e in results[D1]] == [(1, Status.LOST)]
    assert f"max_retries={code if code != DEFAULT_RETRIES else config_max_retries}" in bytes(
        results[D1][0].frames[0]
    ).decode()


def test_a_worker_saying_bye_requeues_its_tasks_at_once() -> None:
    state = make_state()
    d = driver(state)
    w = worker(state, W1)
    submit(state, d, 1)
    dispatch(state)
    state.bye(W1, now=0.5)
    assert W1 not in state.workers
    assert [t.task_id for t in state.queue] == [1]
    assert d.tasks[1].state is TaskState.QUEUED
    assert w.assigned == {}


# -- cancel ---------------------------------------------------------------------


def test_cancelling_a_queued_task_means_it_never_runs() -> None:
    state = make_state()
    d = driver(state)
    submit(state, d, 1, 2)
    state.cancel(d, [1, 99], now=state.last_now)  # 99: unknown, ignored
    assert state.status(0.0)["queued"] == 1
    assert state.counters["tasks_cancelled"] == 1

    worker(state, W1, slots=4)
    assert [t.task_id for t in dispatch(state)[W1]] == [2]
    assert outbox(state) == ({}, {})  # no cancel sent: no worker ever had it


def test_cancelling_an_assigned_task_recalls_it_and_its_late_result_is_dropped() -> None:
    state = make_state()
    d = driver(state)
    w = worker(state, W1, slots=1)
    submit(state, d, 1)
    (task,) = dispatch(state)[W1]

    state.cancel(d, [1], now=state.last_now)
    results, cancels = outbox(state)
    assert results == {}
    assert cancels == {W1: [task.key]}
    assert task.state is TaskState.CANCELLED
    assert w.assigned == {}

    state.results(w, [done(task, payload=b"too late")], now=state.last_now)
    assert outbox(state) == ({}, {})
    assert state.counters["results_stale"] == 1

    submit(state, d, 2)  # the slot is free again
    assert [t.task_id for t in dispatch(state)[W1]] == [2]


# -- drivers leaving ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["bye", "expiry"])
def test_a_driver_leaving_drops_its_tasks_and_pending_results(how: str) -> None:
    state = make_state()
    d = driver(state, D1)
    other = driver(state, D2)
    w = worker(state, W1, slots=2)
    submit(state, d, 1, 2, 3, 4)
    submit(state, other, 1)
    t1, t2 = dispatch(state)[W1]
    state.results(w, [done(t1, payload=b"pending for D1")], now=state.last_now)  # in the outbox, not sent yet

    if how == "bye":
        state.bye(D1, now=1.0)
    else:
        later = TIMEOUT_S + 1
        state.seen(W1, later)
        state.seen(D2, later)
        assert state.expire(later) == [d]

    results, cancels = outbox(state)
    assert results == {}  # D1's pending result is gone
    assert cancels == {W1: [t2.key]}  # its running task is recalled
    assert D1 not in state.peers
    assert state.counters["driver_tasks_dropped"] == 3  # tasks 2, 3, 4

    # Its queued tasks never run; the other driver's task does.
    sent = dispatch(state)
    assert [(t.driver, t.task_id) for t in sent[W1]] == [(D2, 1)]
    assert state.status(2.0)["queued"] == 0


def test_a_result_for_a_driver_that_left_is_dropped() -> None:
    state = make_state()
    d = driver(state)
    w = worker(state, W1)
    submit(state, d, 1)
    (task,) = dispatch(state)[W1]
    state.bye(D1, now=0.5)
    outbox(state)
    state.results(w, [done(task)], now=state.last_now)
    assert outbox(state) == ({}, {})


# -- hello ---------------------------------------------------------------------------


def test_a_worker_saying_hello_again_keeps_its_tasks_and_counts() -> None:
    state = make_state()
    d = driver(state)
    w = worker(state, W1, slots=1)
    warm_up(state, d, w, run_s=0.5)
    submit(state, d, 1, 2)
    (task,) = dispatch(state)[W1]

    again = worker(state, W1, slots=1, now=1.0)

    assert state.workers[W1] is again
    assert again.done == 1
    assert list(again.assigned.values()) == [task]
    assert again.last_seen == 1.0
    assert task.state is TaskState.ASSIGNED and task.losses == 0
    assert [t.task_id for t in state.queue] == [2]  # nothing re-queued
    assert dispatch(state) == {}  # its slot is still busy

    state.results(again, [done(task, payload=b"ok")], now=state.last_now)
    results, _ = outbox(state)
    assert results == {D1: [ResultEntry(1, Status.OK, 0.5, [b"ok"])]}


def test_a_driver_saying_hello_again_keeps_its_tasks_and_resubmits_are_ignored() -> None:
    state = make_state()
    d = driver(state)
    submit(state, d, 1, 2)
    again = driver(state, D1, now=1.0)
    submit(state, again, 1, 2)
    assert sorted(again.tasks) == [1, 2]
    assert [t.task_id for t in state.queue] == [1, 2]


def test_a_peer_saying_hello_with_another_role_starts_afresh() -> None:
    state = make_state()
    d = driver(state, D1)
    submit(state, d, 1)
    w = worker(state, D1, slots=2)  # the same routing id, now a worker
    assert state.peers[D1] is w and state.workers[D1] is w
    assert state.counters["driver_tasks_dropped"] == 1
    assert dispatch(state) == {}  # the old driver's task is gone


@pytest.mark.parametrize(
    "info",
    [{}, {"role": "client"}, {"role": None}, {"role": "WORKER"}, {"role": "worker", "slots": 0}],
)
def test_hello_with_a_bad_role_or_slots_raises_value_error(info: dict[str, Any]) -> None:
    state = make_state()
    with pytest.raises(ValueError):
        state.hello(W1, info, now=0.0)
    assert state.peers == {} and state.workers == {}


def test_a_bad_hello_from_a_known_worker_keeps_it() -> None:
    state = make_state()
    d = driver(state)
    worker(state, W1)
    submit(state, d, 1)
    dispatch(state)
    with pytest.raises(ValueError):
        state.hello(W1, {"role": "worker", "slots": 0}, now=1.0)
    assert len(state.workers[W1].assigned) == 1
    assert list(state.queue) == []


# -- status and re-submission ---------------------------------------------------------


def test_status_is_a_snapshot_of_workers_drivers_queue_and_counters() -> None:
    state = make_state()
    d = driver(state, D1, now=1.0)
    w = worker(state, W1, slots=2, now=1.0, n=1)
    submit(state, d, 1, 2, 3, 4)
    t1, t2 = dispatch(state)[W1]
    state.results(w, [done(t1), done(t2, status=Status.RAISED)], now=state.last_now)
    dispatch(state)  # tasks 3 and 4
    state.seen(W1, now=4.0)

    status = state.status(now=5.0)

    assert status["uptime_s"] == 5.0
    assert status["queued"] == 0
    assert status["running"] == 2
    (w_status,) = status["workers"]
    expected_worker = {
        "id": W1.hex(),
        "name": "wrk-1",
        "host": "host-1",
        "pid": 1001,
        "slots": 2,
        "busy": 2,
        "assigned": 2,
        "done": 1,
        "failed": 1,
        "last_seen_s": 1.0,
    }
    assert {k: w_status.get(k) for k in expected_worker} == expected_worker
    (d_status,) = status["drivers"]
    expected_driver = {"id": D1.hex(), "name": "drv-D-one", "host": "dhost", "pid": 7, "unfinished": 2, "done": 2}
    assert {k: d_status.get(k) for k in expected_driver} == expected_driver
    assert status["counters"]["tasks_submitted"] == 4
    assert status["counters"]["tasks_succeeded"] == 1
    assert status["counters"]["tasks_failed"] == 1


def test_status_counts_queued_tasks_but_not_cancelled_ones() -> None:
    state = make_state()
    d = driver(state)
    submit(state, d, 1, 2, 3)
    state.cancel(d, [2], now=state.last_now)
    status = state.status(now=0.0)
    assert status["queued"] == 2
    assert status["running"] == 0
    assert status["workers"] == []


def test_resubmitting_a_task_id_the_broker_holds_adds_no_duplicate() -> None:
    state = make_state()
    d = driver(state)
    w = worker(state, W1, slots=8)
    submit(state, d, 1, 2)
    (first, second) = dispatch(state)[W1]

    submit(state, d, 1, 2, 3)  # 1 and 2 are running; 3 is new
    submit(state, d, 3)  # 3 is queued

    assert sorted(d.tasks) == [1, 2, 3]
    assert [t.task_id for t in state.queue] == [3]
    assert [t.task_id for t in dispatch(state)[W1]] == [3]
    assert len(w.assigned) == 3
    assert d.tasks[1] is first and d.tasks[2] is second


def test_a_peer_with_a_slower_heartbeat_than_the_broker_is_given_its_own_timeout() -> None:
    state = BrokerState(Config(heartbeat_s=0.2, liveness=5), 0.0)
    slow = state.hello(b"D-slow", {"role": "driver", "heartbeat_s": 1.0}, 0.0)
    fast = state.hello(b"D-fast", {"role": "driver"}, 0.0)
    gone = state.expire(2.0)  # 2 s: past 5 x 0.2 s, within 5 x 1.0 s
    assert fast in gone and slow not in gone
    assert state.expire(5.5) == [slow]


# -- futures as arguments: dependencies and held values --------------------------


def submit_dependent(state: BrokerState, d: PeerInfo, task_id: int, *deps: int, pinned: bool = False) -> None:
    flags = Flag.DEPS | (Flag.PINNED if pinned else 0)
    state.submit(d, [TaskEntry(task_id, DEFAULT_RETRIES, 0.0, [encode_deps(deps), b"call-%d" % task_id], flags)],
        now=state.last_now)


SHM_RESULT = [b"stream", b'{"shm": "df-ab-1001-1-7", "size": 64, "bufs": [[0, 8]]}']


def held_value(payload: list[bytes]) -> tuple[BrokerState, PeerInfo, PeerInfo]:
    """Task 1 of driver D1 done on W1 with ``payload``, held for task 2 (queued) that takes it."""
    state = make_state()
    d, w = driver(state), worker(state, W1)
    submit(state, d, 1)
    submit_dependent(state, d, 2, 1)
    (producer,) = dispatch(state)[W1]
    state.results(w, [ResultEntry(producer.key, Status.OK, 0.5, payload)], now=state.last_now)
    return state, d, w


def test_a_dependent_waits_then_gets_the_held_value_and_the_driver_only_a_notice() -> None:
    state = make_state()
    d, w = driver(state), worker(state, W1, slots=2)
    submit(state, d, 1)
    submit_dependent(state, d, 2, 1)
    (producer,) = dispatch(state)[W1]  # the dependent waits: not dispatched
    assert d.tasks[2].state is TaskState.WAITING
    assert state.status(0.0)["drivers"][0]["waiting"] == 1

    state.results(w, [done(producer, payload=b"big value")], now=state.last_now)
    results, _ = outbox(state)
    assert results == {D1: [ResultEntry(1, Status.OK, 0.5, [], Flag.HELD)]}  # no payload for the driver
    (dependent,) = dispatch(state)[W1]
    assert dependent.task_id == 2
    frames, flags = dependent.wire()
    assert flags == Flag.DEPS
    assert decode_dep_counts(frames) == ([[b"big value"]], [b"call-2"])
    assert d.holds[1].refs == 1

    state.results(w, [done(dependent, payload=b"sum")], now=state.last_now)
    assert outbox(state)[0] == {D1: [ResultEntry(2, Status.OK, 0.5, [b"sum"])]}
    assert d.holds[1].refs == 0 and d.holds[1].driver_has  # the driver may still fetch it
    state.fetch(d, [1], now=state.last_now)
    assert outbox(state)[0] == {D1: [ResultEntry(1, Status.OK, 0.0, [b"big value"])]}
    assert d.holds == {}  # frames: the driver has its own copy now
    status = state.status(0.0)["drivers"][0]
    assert status["result_bytes"] == len(b"sum") + len(b"big value") and status["held"] == 0


def test_a_value_fetched_while_its_task_runs_is_sent_whole_and_still_held_for_dependents() -> None:
    state = make_state()
    d, w = driver(state), worker(state, W1)
    submit(state, d, 1)
    submit_dependent(state, d, 2, 1)
    (producer,) = dispatch(state)[W1]
    state.fetch(d, [1], now=state.last_now)
    state.results(w, [done(producer, payload=b"v")], now=state.last_now)
    assert outbox(state)[0] == {D1: [ResultEntry(1, Status.OK, 0.5, [b"v"])]}
    (dependent,) = dispatch(state)[W1]
    state.results(w, [done(dependent)], now=state.last_now)
    assert d.holds == {}  # nobody needs it any more


def test_a_failed_dependency_fails_its_dependents_and_theirs_unrun_with_its_own_payload() -> None:
    state = make_state()
    d, w = driver(state), worker(state, W1)
    submit(state, d, 1)
    submit_dependent(state, d, 2, 1)
    submit_dependent(state, d, 3, 2)
    (producer,) = dispatch(state)[W1]
    state.results(w, [done(producer, status=Status.RAISED, payload=b"the exception")], now=state.last_now)
    results, _ = outbox(state)
    assert sorted(results[D1]) == [ResultEntry(i, Status.RAISED, 0.5, [b"the exception"]) for i in (1, 2, 3)]
    assert dispatch(state) == {} and d.tasks == {} and d.holds == {}


def test_cancelling_a_dependency_cancels_its_waiting_dependents() -> None:
    state = make_state()
    d = driver(state)
    submit(state, d, 1)
    submit_dependent(state, d, 2, 1)
    state.cancel(d, [1], now=state.last_now)
    assert outbox(state)[0] == {D1: [ResultEntry(2, Status.CANCELLED, 0.0, [])]}
    assert d.tasks == {}


def test_a_dependency_the_broker_no_longer_has_asks_the_driver_to_resubmit() -> None:
    state = make_state()
    d, w = driver(state), worker(state, W1)
    submit(state, d, 1)
    (producer,) = dispatch(state)[W1]
    state.results(w, [done(producer)], now=state.last_now)  # no dependent yet: the result goes to the driver
    outbox(state)
    submit_dependent(state, d, 2, 1)
    assert outbox(state)[0] == {D1: [ResultEntry(2, Status.RESUBMIT, 0.0, [])]}
    assert d.tasks == {} and state.counters["tasks_resubmitted"] == 1
    assert state.counters["tasks_failed"] == 0  # not an outcome: the driver sends it again


def test_a_malformed_dependency_frame_fails_only_its_task() -> None:
    state = make_state()
    d = driver(state)
    state.submit(d, [TaskEntry(1, DEFAULT_RETRIES, 0.0, [b"odd", b"call"], Flag.DEPS),
                     TaskEntry(2, DEFAULT_RETRIES, 0.0, [b"call-2"])], now=state.last_now)
    (failed,) = outbox(state)[0][D1]
    assert failed.id == 1 and failed.status == Status.FAILED and b"malformed" in failed.frames[0]
    assert list(d.tasks) == [2]


def test_a_held_shared_memory_value_pins_dependents_and_goes_back_to_its_maker_when_nobody_needs_it() -> None:
    state, d, w = held_value(SHM_RESULT)
    outbox(state)
    assert d.tasks[2].pinned  # only workers of the driver's /dev/shm can map the value
    hold = d.holds[1]
    assert hold.segment == "df-ab-1001-1-7" and state.hold_segments == {"df-ab-1001-1-7": hold}
    (dependent,) = dispatch(state)[W1]
    state.results(w, [done(dependent)], now=state.last_now)
    state.fetch(d, [1], now=state.last_now)  # the driver maps the segment: still held until it gives it back
    assert outbox(state)[0][D1][-1] == ResultEntry(1, Status.OK, 0.0, SHM_RESULT)
    assert recycles(state) == ({}, [])
    state.recycle(d, ["df-ab-1001-1-7"], now=state.last_now)
    assert recycles(state) == ({W1: ["df-ab-1001-1-7"]}, [])
    assert d.holds == {} and state.hold_segments == {}


def test_a_held_segment_a_task_kept_mapped_is_unlinked_not_reused() -> None:
    state, d, w = held_value(SHM_RESULT)
    (dependent,) = dispatch(state)[W1]
    state.results(w, [ResultEntry(dependent.key, Status.OK, 0.5, [b"v"], Flag.RETAINED)], now=state.last_now)
    state.release(d, [1], now=state.last_now)
    assert recycles(state) == ({}, [])
    assert discards(state) == {W1: [ResultEntry(0, Status.OK, 0.0, SHM_RESULT)]}


def test_a_held_segment_whose_maker_is_gone_is_left_to_the_broker() -> None:
    state, d, w = held_value(SHM_RESULT)
    state.bye(W1, 1.0)
    state.cancel(d, [2], now=state.last_now)
    state.release(d, [1], now=state.last_now)
    assert recycles(state) == ({}, [])  # the driver uses no /dev/shm the broker sees: not its to unlink


def test_a_held_segment_whose_maker_is_gone_is_unlinked_by_the_broker_in_its_own_shm() -> None:
    state = BrokerState(Config(heartbeat_s=1.0, liveness=3, max_retries=2), now=0.0, domain="dom-a")
    d = state.hello(D1, {"role": "driver", "name": "drv", "host": "dhost", "pid": 7, "shm_domain": "dom-a"}, 0.0)
    w = worker(state, W1)  # no shared memory: it cannot unlink what is in dom-a
    submit(state, d, 1)
    submit_dependent(state, d, 2, 1)
    (producer,) = dispatch(state)[W1]
    state.results(w, [ResultEntry(producer.key, Status.OK, 0.5, SHM_RESULT)], now=0.1)
    state.bye(W1, 1.0)
    state.cancel(d, [2], now=1.0)
    state.release(d, [1], now=1.0)
    assert recycles(state) == ({}, ["df-ab-1001-1-7"])


def test_a_recycled_segment_goes_to_the_worker_of_its_creator_pid_in_the_drivers_shm_only() -> None:
    state = make_state()
    info = {"role": "driver", "name": "drv", "host": "dhost", "pid": 7, "shm_domain": "dom-a"}
    d = state.hello(D1, info, 0.0)
    state.hello(W1, {"role": "worker", "name": "w1", "host": "h", "pid": 1001, "shm_domain": "dom-a"}, 0.0)
    # The same pid in another container (another /dev/shm) is another process.
    state.hello(W2, {"role": "worker", "name": "w2", "host": "h", "pid": 1002, "shm_domain": "dom-b"}, 0.0)
    r = "0123456789abcdef"
    mine, other, gone = f"df-ab-1001-5-{r}", f"df-ab-1002-5-{r}", f"df-ab-1003-5-{r}-7-9"
    state.recycle(d, [other, mine, gone, "not-ours"], now=0.5)
    # 1002 is not in dom-a, 1003 is gone: orphans, which W1 (of dom-a) unlinks after reusing its own.
    assert recycles(state) == ({W1: [mine, other, gone]}, [])


def test_a_driver_leaving_frees_its_held_values() -> None:
    state, d, w = held_value(SHM_RESULT)
    dispatch(state)
    state.bye(D1, 1.0)
    # The dependent may still run on W1: the segment is unlinked, never handed out again.
    assert discards(state) == {W1: [ResultEntry(0, Status.OK, 0.0, SHM_RESULT)]}
    assert state.hold_segments == {}


def test_a_dependent_whose_worker_is_lost_runs_again_with_the_held_value() -> None:
    state, d, w1 = held_value([b"v"])
    dispatch(state)
    state.bye(W1, 1.0)
    worker(state, W2, n=2)
    (again,) = dispatch(state)[W2]
    assert again.task_id == 2 and again.wire()[0][1] == b"v"


def test_tasks_with_dependencies_or_dependents_are_never_reclaimed() -> None:
    state = make_state()
    d = driver(state)
    submit(state, d, 1)
    submit_dependent(state, d, 2, 1)
    submit(state, d, 3)
    state.reclaim(d, [1, 2, 3], now=state.last_now)
    assert reclaimed(state) == [3]


def test_the_stale_count_follows_cancelled_and_reclaimed_tasks_left_in_the_queue() -> None:
    state = make_state()
    d = driver(state)
    submit(state, d, 1, 2, 3, 4)
    state.cancel(d, [1], now=state.last_now)
    state.reclaim(d, [2], now=state.last_now)
    assert reclaimed(state) == [2]
    queued = len(state.queue) - state.stale_queued
    assert state.stale_queued == 2 and queued == 2 == state.status(0.0)["queued"]
    worker(state, W1, slots=2)
    assert [t.task_id for t in dispatch(state)[W1]] == [3, 4]  # the stale ones were skipped ...
    assert state.stale_queued == 0 and not state.queue  # ... and no longer counted


def test_a_dependent_that_becomes_ready_runs_before_tasks_queued_earlier() -> None:
    """A burst of fork(g, fork(f, x)): each g runs right after its f, so few values are held at once."""
    state = make_state()
    d, w = driver(state), worker(state, W1)
    for i in range(3):
        submit(state, d, 10 + i)
        submit_dependent(state, d, 20 + i, 10 + i)
    order = []
    held_at_most = 0
    while d.tasks:
        (task,) = dispatch(state)[W1]
        order.append(task.task_id)
        state.results(w, [done(task)], now=state.last_now)
        held_at_most = max(held_at_most, sum(1 for h in d.holds.values() if h.refs))
    assert order == [10, 20, 11, 21, 12, 22]
    assert held_at_most == 1


def test_ready_dependents_of_one_value_keep_their_order() -> None:
    state = make_state()
    d, w = driver(state), worker(state, W1)
    submit(state, d, 1)
    for i in (2, 3, 4):
        submit_dependent(state, d, i, 1)
    (producer,) = dispatch(state)[W1]
    state.results(w, [done(producer)], now=state.last_now)
    assert [t.task_id for t in state.queue] == [2, 3, 4]


def test_a_running_task_cancelled_before_its_worker_vouched_for_it_is_stopped_with_the_first_keepalive() -> None:
    """A worker's control socket first reaches us with a KEEPALIVE; one sent before its slots said
    hello names nobody. A cancel in that gap must not be forgotten."""
    state = make_state()
    d, w = driver(state), worker(state, W1)
    submit(state, d, 1)
    (task,) = dispatch(state)[W1]
    state.cancel(d, [1], now=state.last_now)
    assert aborts(state) == {}  # no control socket known yet
    state.keepalive(b"C-one", Keepalive([W1]), 0.5)
    assert aborts(state) == {b"C-one": [task.key]}
    state.keepalive(b"C-one", Keepalive([W1]), 1.0)
    assert aborts(state) == {}  # once
    assert w.control == b"C-one"


def test_a_future_named_twice_makes_its_dependent_wait_once_and_take_the_value_twice() -> None:
    state = make_state()
    d, w = driver(state), worker(state, W1)
    submit(state, d, 1)
    submit_dependent(state, d, 2, 1, 1)
    (producer,) = dispatch(state)[W1]
    state.results(w, [done(producer, payload=b"v")], now=state.last_now)
    assert [t.task_id for t in state.queue] == [2]  # queued once
    (dependent,) = dispatch(state)[W1]
    assert decode_dep_counts(dependent.wire()[0]) == ([[b"v"], [b"v"]], [b"call-2"])
    assert d.holds[1].refs == 2
    state.results(w, [done(dependent)], now=state.last_now)
    assert d.holds[1].refs == 0
