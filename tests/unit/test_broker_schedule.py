"""Mixed task durations through BrokerState, simulated on a fake clock (no sockets, no sleeps).

A small discrete-event simulation: one driver, one-slot workers that run the
tasks they are handed in order, drop those the broker takes back (CANCEL)
before they start, and answer each task with its result; every message takes
``LATENCY_S``. The broker is the real :class:`BrokerState`, called as
broker.py calls it: a method per message, then ``dispatch`` and
``take_instructions``; also every ``STEAL_CHECK_S`` while ``may_steal()``.
The makespan is compared with the ideal schedule's lower bound,
``max(total work / slots, longest task)``.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable

from distfork.broker_instructions import Cancel, SendResults, SendTasks
from distfork.broker_state import BrokerState, PeerInfo
from distfork.config import STEAL_CHECK_S, Config
from distfork.protocol import DEFAULT_RETRIES, ResultEntry, Status, TaskEntry

LATENCY_S = 0.0002  # one message, one way (ZeroMQ over ipc on a busy machine)


class Sim:
    def __init__(self, workers: int) -> None:
        self.now = 0.0
        self.state = BrokerState(Config(), now=0.0)
        self.driver = self.state.hello(b"D", {"role": "driver", "name": "d", "host": "h", "pid": 7}, 0.0)
        self.slots: list[PeerInfo] = [
            self.state.hello(b"W%d" % i, {"role": "worker", "name": f"w{i}", "host": "h", "pid": 100 + i, "slots": 1},
                             0.0)
            for i in range(workers)
        ]
        self.local: dict[bytes, deque[tuple[int, float]]] = {w.id: deque() for w in self.slots}  # (key, run_s)
        self.busy_until: dict[bytes, float] = {w.id: 0.0 for w in self.slots}
        self.cancelled: dict[bytes, set[int]] = {w.id: set() for w in self.slots}
        self.run_s: dict[int, float] = {}  # by the driver's task id
        self.done: set[int] = set()
        self.ran = 0  # task runs, duplicates included
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = itertools.count()
        self.next_id = 1
        self.wake_at = -1.0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.events, (t, next(self.seq), fn))

    def submit(self, durations: list[float]) -> None:
        entries = []
        for d in durations:
            self.run_s[self.next_id] = d
            entries.append(TaskEntry(self.next_id, DEFAULT_RETRIES, 0.0, [b"call"]))
            self.next_id += 1
        self.at(self.now + LATENCY_S, lambda: self._broker(lambda: self.state.submit(self.driver, entries, self.now)))

    def _broker(self, handle: Callable[[], None]) -> None:
        handle()
        self.state.dispatch(self.now)
        for ins in self.state.take_instructions():
            if isinstance(ins, SendTasks):
                work = [(t.key, self.run_s[t.task_id]) for t in ins.tasks]
                self.at(self.now + LATENCY_S, lambda w=ins.worker, work=work: self._tasks(w, work))
            elif isinstance(ins, Cancel):
                self.at(self.now + LATENCY_S, lambda w=ins.worker, keys=ins.keys: self.cancelled[w].update(keys))
            elif isinstance(ins, SendResults):
                self.done.update(e.id for e in ins.entries)
        if self.state.may_steal() and self.wake_at <= self.now:
            self.wake_at = self.now + STEAL_CHECK_S
            self.at(self.wake_at, lambda: self._broker(lambda: None))

    def _tasks(self, w: bytes, work: list[tuple[int, float]]) -> None:
        idle = not self.local[w] and self.busy_until[w] <= self.now
        self.local[w].extend(work)
        if idle:
            self._run_next(w)

    def _run_next(self, w: bytes) -> None:
        q = self.local[w]
        while q and q[0][0] in self.cancelled[w]:
            q.popleft()
        if not q:
            return
        key, run_s = q.popleft()
        self.ran += 1
        self.busy_until[w] = end = self.now + run_s + 0.00005  # a little overhead per task
        self.at(end, lambda: self._finished(w, key, run_s))

    def _finished(self, w: bytes, key: int, run_s: float) -> None:
        peer = self.state.workers[w]
        result = [ResultEntry(key, Status.OK, run_s, [b"value"])]
        self.at(self.now + LATENCY_S, lambda: self._broker(lambda: self.state.results(peer, result, self.now)))
        self._run_next(w)

    def run(self, until_done: int) -> float:
        while self.events and len(self.done) < until_done:
            self.now, _, fn = heapq.heappop(self.events)
            fn()
        assert len(self.done) >= until_done
        return self.now

    def makespan(self, durations: list[float]) -> float:
        """Submit ``durations`` now; the time until the last result reaches the driver."""
        start = self.now
        target = len(self.done) + len(durations)
        self.submit(durations)
        return self.run(target) + LATENCY_S - start


def ideal(durations: list[float], slots: int) -> float:
    return max(sum(durations) / slots, max(durations))


def after_a_burst_of_no_ops(workers: int = 2) -> Sim:
    sim = Sim(workers)
    sim.makespan([1e-5] * 2000)  # the broker learns that tasks are tiny
    return sim


def test_1_ms_and_100_ms_tasks_mixed_after_a_burst_of_no_ops_finish_within_10_percent_of_the_ideal() -> None:
    for seed in range(5):
        durations = [0.001] * 200 + [0.1] * 20
        random.Random(seed).shuffle(durations)
        sim = after_a_burst_of_no_ops()
        took = sim.makespan(durations)
        assert took <= 1.10 * ideal(durations, 2), (seed, took)
        assert sim.ran == 2000 + 220  # nothing taken back ran twice


def test_4_sleeps_of_250_ms_on_2_workers_after_a_burst_of_no_ops_finish_within_5_percent_of_the_ideal() -> None:
    sim = after_a_burst_of_no_ops()
    assert sim.makespan([0.25] * 4) <= 1.05 * 0.5


def test_3_long_tasks_on_2_workers_after_a_burst_of_no_ops_take_two_task_times_not_three() -> None:
    sim = after_a_burst_of_no_ops()
    assert sim.makespan([0.25] * 3) <= 1.05 * 0.5
