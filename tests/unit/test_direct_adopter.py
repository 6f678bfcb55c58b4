"""The broker's side of the direct path (distfork/direct.py ``Adopter``), on the state machine alone."""

from __future__ import annotations

from state_outbox import dispatch, outbox
from test_broker_state import W1, W2, driver, make_state, submit, worker

from distfork.direct_broker import Adopter
from distfork.protocol import (
    DEFAULT_RETRIES,
    DIRECT_KEY_BASE,
    Flag,
    ResultEntry,
    Status,
    TaskEntry,
    encode_deps,
    encode_origin,
)

KEY = DIRECT_KEY_BASE + 12345


def notice(slot: bytes, task_id: int, key: int = KEY) -> TaskEntry:
    return TaskEntry(key, DEFAULT_RETRIES, 0.0, [encode_origin(slot, task_id), b"call"], 0)


def header(key: int = KEY, status: Status = Status.OK) -> ResultEntry:
    return ResultEntry(key, status, 0.001, [], Flag.DIRECT)


def test_a_noticed_task_is_assigned_to_its_slot_and_its_header_completes_it_without_routing() -> None:
    state, adopter = make_state(), Adopter()
    d, w = driver(state), worker(state)
    adopter.adopt(state, d, [notice(W1, 1)], now=0.1)
    assert list(w.assigned) == [KEY] and 1 in d.tasks
    assert dispatch(state) == {}  # nothing sent to the slot: it has the task already
    state.results(w, adopter.results(state, w, [header()]), now=0.2)
    results, _ = outbox(state)
    assert results == {}  # the driver has its result already
    assert d.done == 1 and not d.tasks and state.counters["tasks_direct"] == 1
    assert state.counters["tasks_succeeded"] == 1 and "results_stale" not in state.counters


def test_a_header_before_its_notice_is_kept_and_completes_the_task_when_the_notice_comes() -> None:
    state, adopter = make_state(), Adopter()
    d, w = driver(state), worker(state)
    assert adopter.results(state, w, [header()]) == []
    adopter.adopt(state, d, [notice(W1, 1)], now=0.1)
    assert not w.assigned and not d.tasks and d.done == 1
    assert state.counters["tasks_succeeded"] == 1 and outbox(state)[0] == {}


def test_a_notice_after_its_slot_was_lost_queues_the_task_again() -> None:
    state, adopter = make_state(), Adopter()
    d, _ = driver(state), worker(state)
    w2 = worker(state, W2, n=2)
    state.exited("host-1", 1001, -9, now=0.05)
    adopter.adopt(state, d, [notice(W1, 1)], now=0.1)
    sent = dispatch(state)
    assert [t.task_id for t in sent[w2.id]] == [1]  # run again elsewhere, results by the broker path


def test_tasks_handed_to_a_slot_before_its_notice_are_taken_back() -> None:
    """Children a direct task forked reached the broker first and were queued behind it on its slot."""
    state, adopter = make_state(), Adopter()
    d, w = driver(state), worker(state)
    submit(state, d, 7)
    assert [t.task_id for t in dispatch(state)[W1]] == [7]
    adopter.adopt(state, d, [notice(W1, 1)], now=0.1)
    assert list(w.assigned) == [KEY]
    _, cancels = outbox(state)
    assert len(cancels[W1]) == 1  # the slot drops the child ...
    w2 = worker(state, W2, n=2)
    assert [t.task_id for t in dispatch(state)[w2.id]] == [7]  # ... which runs elsewhere


def test_a_call_naming_a_direct_task_whose_value_went_to_the_driver_is_sent_again() -> None:
    """The driver asked the slot for the value by the broker (a call names the task), but the slot
    had answered the driver already: the broker, with only a header, asks for the call again."""
    state, adopter = make_state(), Adopter()
    d, w = driver(state), worker(state)
    adopter.adopt(state, d, [notice(W1, 1)], now=0.1)
    state.submit(d, [TaskEntry(2, DEFAULT_RETRIES, 0.0, [encode_deps([1]), b"call-2"], Flag.DEPS)], now=0.1)
    state.results(w, adopter.results(state, w, [header()]), now=0.2)
    results, _ = outbox(state)
    assert [(e.id, e.status) for e in results[d.id]] == [(2, Status.RESUBMIT)]  # the header is not routed
    assert not d.tasks and state.counters["tasks_resubmitted"] == 1


def test_a_relayed_notice_and_its_drivers_notice_adopt_the_task_once() -> None:
    """A direct task that forks: its slot's process relays its notice ahead of its children."""
    state, adopter = make_state(), Adopter()
    d, w = driver(state), worker(state)
    relayed = TaskEntry(KEY, DEFAULT_RETRIES, 0.0, [encode_origin(W1, 1), d.id, b"call"], Flag.NESTED)
    adopter.adopt(state, driver(state, b"nested-driver"), [relayed], now=0.1)
    assert list(w.assigned) == [KEY] and 1 in d.tasks
    adopter.adopt(state, d, [notice(W1, 1)], now=0.2)  # the second: ignored
    assert list(w.assigned) == [KEY]
    state.results(w, adopter.results(state, w, [header()]), now=0.3)
    assert state.counters["tasks_direct"] == 1 and d.done == 1 and not d.tasks and not w.assigned


def test_a_direct_task_noticed_before_the_header_of_the_one_before_is_never_taken_back() -> None:
    """The slot's header of its last direct task is held back while the next lone fork's notice arrives:
    the slot holds two tasks, another idles. The slot has both over its socket: taking one back would
    run it twice (it did under load: tasks_stolen 1, its result by the broker)."""
    state, adopter = make_state(), Adopter()
    d, w = driver(state), worker(state)
    w2 = worker(state, W2, n=2)
    adopter.adopt(state, d, [notice(W1, 1), notice(W1, 2, KEY + 1)], now=0.1)
    assert list(w.assigned) == [KEY, KEY + 1]
    assert dispatch(state, now=5.0) == {}  # long past any stall: the idle slot gets nothing of theirs
    _, cancels = outbox(state)
    assert W1 not in cancels and not w2.assigned and "tasks_stolen" not in state.counters
