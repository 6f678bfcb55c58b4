"""BrokerState's decisions as one list of instructions, driven by a fake clock (no sockets, no sleeps).

Work stealing, a supervisor's EXITED, task timeouts and peer expiry, each at
chosen instants, and the decisions that used to live in broker.py (the
RESULT_SHM flag, reclaim answers, unknown peers' segments).
"""

from __future__ import annotations

import signal

from distfork.broker_instructions import (
    Cancel,
    Discard,
    Reclaimed,
    Reject,
    SendResults,
    SendTasks,
    UnlinkOrphan,
)
from distfork.broker_state import BrokerState, PeerInfo, TaskState
from distfork.config import Config
from distfork.protocol import DEFAULT_RETRIES, Entry, Flag, Keepalive, ResultEntry, Status, TaskEntry

D1, W1, W2 = b"D-one", b"W-one", b"W-two"
SEGMENT = "df-ab-1001-5-0123456789abcdef"


def make_state(domain: str | None = None) -> BrokerState:
    return BrokerState(Config(heartbeat_s=1.0, liveness=3, max_retries=2, prefetch_s=0.002), now=0.0, domain=domain)


def driver(state: BrokerState, now: float = 0.0, domain: str | None = None) -> PeerInfo:
    return state.hello(D1, {"role": "driver", "name": "drv", "host": "dh", "pid": 7, "shm_domain": domain}, now)


def worker(state: BrokerState, peer: bytes, now: float = 0.0, pid: int = 1001, host: str = "h", slots: int = 1,
           domain: str | None = None) -> PeerInfo:
    info = {"role": "worker", "name": peer.decode(), "host": host, "pid": pid, "slots": slots, "shm_domain": domain}
    return state.hello(peer, info, now)


def submit(state: BrokerState, d: PeerInfo, ids: range | list[int], now: float, timeout_s: float = 0.0) -> None:
    state.submit(d, [TaskEntry(i, DEFAULT_RETRIES, timeout_s, [b"call-%d" % i]) for i in ids], now)


def sent(instructions: list[object]) -> dict[bytes, list[int]]:
    """Driver task ids handed to each worker."""
    return {i.worker: [t.task_id for t in i.tasks] for i in instructions if isinstance(i, SendTasks)}


def results(instructions: list[object]) -> dict[bytes, list[Entry]]:
    return {i.driver: i.entries for i in instructions if isinstance(i, SendResults)}


# -- work stealing ----------------------------------------------------------------


def stalled_with_prefetch() -> tuple[BrokerState, PeerInfo, PeerInfo]:
    """W1 runs task 1 of 1 slot with tasks 2..5 prefetched behind it (at t=1); nothing idles yet."""
    state = make_state()
    d, w1 = driver(state), worker(state, W1)
    submit(state, d, [100], now=0.0)
    state.dispatch(0.0)
    (task,) = next(i.tasks for i in state.take_instructions() if isinstance(i, SendTasks))
    state.results(w1, [ResultEntry(task.key, Status.OK, 1e-4, [b"v"])], now=0.5)  # short tasks: prefetch on
    submit(state, d, [1, 2, 3, 4, 5], now=1.0)
    state.dispatch(1.0)
    assert sent(state.take_instructions()) == {W1: [1, 2, 3, 4, 5]}
    return state, d, w1


def test_prefetched_tasks_of_a_stalled_worker_go_to_a_worker_that_idles_under_new_keys() -> None:
    state, d, w1 = stalled_with_prefetch()
    old = {t.task_id: t.key for t in w1.assigned.values()}
    worker(state, W2, now=1.001, pid=1002)
    state.dispatch(1.005)  # task 1 has run 5 ms: not stalled yet (10 ms at least while W2 has nothing to take)
    assert sent(state.take_instructions()) == {}
    assert state.may_steal()  # an idle worker beside one holding more than its slots

    state.dispatch(1.02)  # stalled now: its prefetched tasks are recalled and handed out again
    out = state.take_instructions()

    assert [i for i in out if isinstance(i, Cancel)] == [Cancel(W1, [old[2], old[3], old[4], old[5]])]
    assert sent(out) == {W2: [2]}  # a free slot first; W2's run time is unknown: no prefetch
    assert [t.task_id for t in w1.assigned.values()] == [1]
    assert d.tasks[2].key != old[2] and d.tasks[2].worker == W2
    assert [t.task_id for t in state.queue if t.state is TaskState.QUEUED] == [3, 4, 5]
    assert state.counters["tasks_stolen"] == 4
    assert not state.may_steal()


def test_while_other_tasks_are_queued_a_worker_is_stalled_only_after_4_times_its_run_time_and_50_ms() -> None:
    state, d, w1 = stalled_with_prefetch()
    submit(state, d, [6, 7], now=1.0)
    worker(state, W2, now=1.001, pid=1002)
    state.dispatch(1.02)  # W2 takes queued task 6; W1, quiet for 20 ms, keeps its prefetched tasks (and gets 7)
    assert sent(state.take_instructions()) == {W2: [6], W1: [7]}
    assert len(w1.assigned) == 6 and state.counters["tasks_stolen"] == 0


def test_nothing_is_stolen_while_no_worker_idles_however_long_a_task_runs() -> None:
    state, _, w1 = stalled_with_prefetch()
    assert not state.may_steal()
    state.dispatch(100.0)
    assert state.take_instructions() == []
    assert len(w1.assigned) == 5 and state.counters["tasks_stolen"] == 0


def slow_down(state: BrokerState, w: PeerInfo, run_s: float, n: int, start: float) -> float:
    """``w`` reports its next ``n`` tasks as taking ``run_s``, one batch each, ``run_s`` apart; returns the time."""
    now = start
    for _ in range(n):
        now += run_s
        first = next(iter(w.assigned.values()))
        state.results(w, [ResultEntry(first.key, Status.OK, run_s, [b"v"])], now=now)
    return now


def prefetched_while_short(extra_submitted: tuple[int, ...] = ()) -> tuple[BrokerState, PeerInfo, PeerInfo]:
    """W1 took tasks 6..26 at t=1 while its tasks took 0.1 ms (1 slot + 20 prefetched); then 6 took 5 ms each."""
    state, d, w1 = stalled_with_prefetch()
    for t in list(w1.assigned.values()):
        state.results(w1, [ResultEntry(t.key, Status.OK, 1e-4, [b"v"])], now=1.0)
    submit(state, d, range(6, 27), now=1.0)
    state.dispatch(1.0)
    assert sent(state.take_instructions()) == {W1: list(range(6, 27))}
    now = slow_down(state, w1, 0.005, 6, start=1.0)  # slower after all, batch after batch
    submit(state, d, list(extra_submitted), now=now)
    state.dispatch(now)
    state.take_instructions()
    assert len(w1.assigned) == 15 and state.prefetch(w1) == 0
    return state, d, w1


def test_tasks_prefetched_while_short_go_to_an_idle_slot_once_they_turn_out_long_though_the_worker_progresses() -> None:
    state, d, w1 = prefetched_while_short()
    old = [t.key for t in w1.assigned.values()]
    worker(state, W2, now=1.031, pid=1002)
    state.dispatch(1.035)  # W1 had a result 5 ms ago: not stalled, but it holds 14 x 5 ms it would not get now
    out = state.take_instructions()

    assert [i for i in out if isinstance(i, Cancel)] == [Cancel(W1, old[1:])]
    assert sent(out) == {W2: [13]}
    assert [t.task_id for t in w1.assigned.values()] == [12]
    assert state.counters["tasks_stolen"] == 14


def test_a_worker_keeps_the_prefetched_tasks_its_run_times_still_justify() -> None:
    state, _, w1 = stalled_with_prefetch()  # 4 tasks of 0.1 ms prefetched: 0.4 ms of work
    worker(state, W2, now=1.001, pid=1002)
    state.dispatch(1.005)  # W1 is not stalled yet
    assert sent(state.take_instructions()) == {}
    assert len(w1.assigned) == 5 and state.counters["tasks_stolen"] == 0


def test_a_worker_of_half_millisecond_tasks_gives_a_starved_slot_all_beyond_its_prefetch_room() -> None:
    state, d, w1 = stalled_with_prefetch()  # W1 has tasks 1..5; its tasks took 0.1 ms
    for t in list(w1.assigned.values()):
        state.results(w1, [ResultEntry(t.key, Status.OK, 1e-4, [b"v"])], now=1.0)
    submit(state, d, range(6, 20), now=1.0)
    state.dispatch(1.0)
    assert sent(state.take_instructions()) == {W1: list(range(6, 20))}
    now = slow_down(state, w1, 0.001, 5, start=1.0)  # then 1 ms each: 0.85 ms on average
    assert w1.avg_run_s is not None and 8e-4 < w1.avg_run_s < 9e-4 and state.prefetch(w1) == 2
    worker(state, W2, now=now + 0.001, pid=1002)
    state.dispatch(now + 0.004)  # 6 beyond its room: 5 ms by the average, but one may be long
    out = state.take_instructions()

    assert sent(out) == {W2: [14]}
    assert [t.task_id for t in w1.assigned.values()] == [11, 12, 13]
    assert state.counters["tasks_stolen"] == 6


def test_a_worker_of_tiny_tasks_keeps_its_prefetch_through_one_slow_batch() -> None:
    state, d, w1 = stalled_with_prefetch()  # its tasks took 0.1 ms
    for t in list(w1.assigned.values()):
        state.results(w1, [ResultEntry(t.key, Status.OK, 1e-4, [b"v"])], now=1.0)
    submit(state, d, range(6, 27), now=1.0)
    state.dispatch(1.0)
    state.take_instructions()
    first = next(iter(w1.assigned.values()))
    state.results(w1, [ResultEntry(first.key, Status.OK, 0.1, [b"v"])], now=1.01)  # a pause (GC, the OS)
    worker(state, W2, now=1.011, pid=1002)
    state.dispatch(1.015)  # by the average it holds 19 x 30 ms; by its speed a moment ago, 2 ms
    assert sent(state.take_instructions()) == {}
    assert len(w1.assigned) == 20 and state.counters["tasks_stolen"] == 0


def test_an_idle_slot_takes_queued_work_before_it_takes_back_another_workers_prefetch() -> None:
    state, _, w1 = prefetched_while_short(extra_submitted=(90, 91))
    worker(state, W2, now=1.031, pid=1002)
    state.dispatch(1.035)
    out = state.take_instructions()
    assert [i for i in out if isinstance(i, Cancel)] == []
    assert sent(out) == {W2: [90]}
    assert len(w1.assigned) == 15 and state.counters["tasks_stolen"] == 0


# -- a supervisor's EXITED --------------------------------------------------------


def test_exited_forgets_every_slot_of_that_process_and_only_those_and_requeues_their_tasks() -> None:
    state = make_state()
    d = driver(state)
    a = worker(state, W1, pid=5, host="h1", slots=1)
    b = worker(state, b"W-one-b", pid=5, host="h1", slots=1)
    other_host = worker(state, W2, pid=5, host="h2", slots=1)  # same pid, another host: another process
    submit(state, d, [1, 2, 3], now=0.0)
    state.dispatch(0.0)
    assert sent(state.take_instructions()) == {W1: [1], b"W-one-b": [2], W2: [3]}

    state.exited("h1", 5, -signal.SIGKILL, now=0.5)

    assert set(state.workers) == {W2} and other_host.assigned
    assert not a.assigned and not b.assigned
    assert sorted((t.task_id, t.losses, t.state) for t in state.queue) == [
        (1, 1, TaskState.QUEUED), (2, 1, TaskState.QUEUED)]  # a try lost each, back at the front
    notice = [i for i in state.take_instructions() if not isinstance(i, SendTasks)]
    assert [type(i).__name__ for i in notice] == ["ClusterNotice"]  # the cluster shrank: the driver is told


def test_a_process_killed_again_and_again_fails_its_task_naming_the_signal_and_memory() -> None:
    state = make_state()
    d = driver(state)
    submit(state, d, [1], now=0.0)
    for n in range(3):  # max_retries=2: the third loss fails it
        worker(state, W1, now=float(n), pid=40 + n)
        state.dispatch(float(n))
        assert sent(state.take_instructions()) == {W1: [1]}
        state.exited("h", 40 + n, -signal.SIGKILL, now=n + 0.5)
    (entry,) = results(state.take_instructions())[D1]
    assert entry.id == 1 and entry.status == Status.LOST
    text = bytes(entry.frames[0]).decode()
    assert "killed by signal SIGKILL (9), possibly out of memory" in text
    assert "lost 3 times, more than max_retries=2" in text


def test_exited_with_a_code_names_the_code_and_an_unknown_process_changes_nothing() -> None:
    state = make_state()
    d = driver(state)
    worker(state, W1, pid=5)
    state.take_instructions()
    state.exited("h", 6, 1, now=0.1)
    assert W1 in state.workers and state.take_instructions() == []
    submit(state, d, [1], now=0.2)
    state.dispatch(0.2)
    state.take_instructions()
    for n in range(3):
        state.exited("h", 5 + n, 3, now=0.3 + n)
        if n < 2:
            worker(state, W1, now=0.4 + n, pid=6 + n)
            state.dispatch(0.4 + n)
            assert sent(state.take_instructions()) == {W1: [1]}
    (entry,) = results(state.take_instructions())[D1]
    assert "its process exited with code 3" in bytes(entry.frames[0]).decode()


# -- timeouts and expiry ----------------------------------------------------------


def test_a_task_past_its_timeout_fails_timed_out_and_its_slot_mates_lose_no_try() -> None:
    state = make_state()
    d = driver(state)
    w = worker(state, W1, slots=2)
    submit(state, d, [1], now=0.0, timeout_s=2.5)
    submit(state, d, [2], now=0.0)
    state.dispatch(0.0)
    state.take_instructions()
    state.keepalive(b"C-1", Keepalive([W1]), now=1.0)
    assert w.control == b"C-1"
    (key1,) = [t.key for t in w.assigned.values() if t.task_id == 1]

    state.keepalive(b"C-1", Keepalive([W1], bye=True, timed_out=frozenset([key1])), now=2.6)

    (entry,) = results(state.take_instructions())[D1]
    assert (entry.id, entry.status, entry.run_s) == (1, Status.TIMED_OUT, 2.5)
    assert "ran longer than its timeout_s=2.5" in bytes(entry.frames[0]).decode()
    assert state.counters["tasks_timed_out"] == 1
    (task2,) = state.queue
    assert task2.task_id == 2 and task2.losses == 0  # the process ended to stop task 1: 2 is not blamed


def test_a_silent_driver_expires_and_its_running_task_is_recalled_from_its_worker() -> None:
    state = make_state()
    d = driver(state)
    w = worker(state, W1)
    submit(state, d, [1, 2], now=0.0)
    state.dispatch(0.0)
    (task,) = next(i.tasks for i in state.take_instructions() if isinstance(i, SendTasks))
    state.seen(W1, now=3.0)
    assert state.expire(now=3.0) == []  # 3 heartbeats of 1 s: exactly at the limit, not yet
    state.seen(W1, now=3.2)
    assert state.expire(now=3.2) == [d]

    assert state.take_instructions() == [Cancel(W1, [task.key])]
    assert not w.assigned and D1 not in state.peers
    assert state.counters["driver_tasks_dropped"] == 2
    state.results(w, [ResultEntry(task.key, Status.OK, 0.1, [b"late"])], now=3.3)
    assert state.take_instructions() == []  # a late result of a dropped task goes nowhere


# -- decisions that moved out of broker.py --------------------------------------------


def test_a_result_may_travel_by_shared_memory_only_to_a_worker_of_the_drivers_dev_shm() -> None:
    state = make_state()
    d = driver(state, domain="dom-a")
    worker(state, W1, pid=1001, domain="dom-a")
    worker(state, W2, pid=1002, domain="dom-b")
    submit(state, d, [1, 2], now=0.0)
    state.dispatch(0.0)
    tasks = {i.worker: i.entries for i in state.take_instructions() if isinstance(i, SendTasks)}
    (here,), (there,) = tasks[W1], tasks[W2]
    assert here.flags & Flag.RESULT_SHM and here.pid == 7  # the driver's pid: its death frees the result
    assert not there.flags & Flag.RESULT_SHM and there.pid == 0


def test_a_reclaim_is_answered_after_dispatch_so_a_task_a_free_slot_takes_is_not_given_back() -> None:
    state = make_state()
    d = driver(state)
    submit(state, d, [1, 2], now=0.0)
    state.reclaim(d, [1, 2, 99], now=0.1)
    assert state.take_instructions() == []  # nothing decided before the dispatch
    worker(state, W1)
    state.dispatch(0.2)
    out = state.take_instructions()
    assert sent(out) == {W1: [1]}
    assert out[-1] == Reclaimed(D1, [2], [1, 2, 99])


def test_messages_from_an_unknown_peer_are_rejected_and_the_segments_they_name_freed() -> None:
    state = make_state(domain="dom-a")
    manifest = b'{"shm": "%s", "size": 8, "bufs": [[0, 8]]}' % SEGMENT.encode()
    shm_result = ResultEntry(9, Status.OK, 0.1, [b"stream", manifest])
    inline = ResultEntry(10, Status.OK, 0.1, [b"value"])
    state.unknown_peer(W1, 1.0, results=[shm_result, inline])
    state.unknown_peer(D1, 1.0, recycled=[SEGMENT, "/etc/passwd", "df-not-a-name"])
    assert state.take_instructions() == [
        Reject(W1, "unknown peer: say hello"),
        Discard(W1, [shm_result]),  # back to its maker, which unlinks it
        Reject(D1, "unknown peer: say hello"),
        UnlinkOrphan(SEGMENT),  # only a distfork segment name is ever unlinked
    ]
    assert state.counters["unknown_peer_messages"] == 2
