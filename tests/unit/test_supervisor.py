"""Supervisor.check without processes: exits are reported at once, restarts wait out their back-off."""

from __future__ import annotations

import itertools

from distfork.cluster import Supervisor
from distfork.config import Config


class FakeProcess:
    """What Supervisor.check uses of a subprocess.Popen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


def supervisor() -> tuple[Supervisor, list[tuple[int, int]]]:
    sup = Supervisor(Config(), "ipc:///nowhere", workers=2)
    pids = itertools.count(100)
    sup._spawn_worker = lambda: FakeProcess(next(pids))  # type: ignore[assignment, method-assign, return-value]
    reports: list[tuple[int, int]] = []
    sup._report = lambda pid, code: reports.append((pid, code))
    sup.workers = [FakeProcess(1), FakeProcess(2)]  # type: ignore[list-item]
    sup._started = {1: 0.0, 2: 0.0}
    return sup, reports


def test_a_worker_waiting_out_its_back_off_holds_up_no_other_workers_exit() -> None:
    sup, reports = supervisor()
    crash_looping, healthy = sup.workers
    sup._backoff_s[1] = 4.0  # its slot has been dying young for a while
    sup._started[1] = 9.5
    crash_looping.returncode = -9  # type: ignore[attr-defined]
    sup.check(10.0)
    assert reports == [(1, -9)] and sup.workers[0] is crash_looping  # reported; its restart waits 5 s

    healthy.returncode = 1  # type: ignore[attr-defined]
    sup.check(10.1)
    assert reports == [(1, -9), (2, 1)]  # reported at once, not after the other's back-off
    assert sup.workers[0] is crash_looping and sup.workers[1].pid == 100  # it lived long: replaced at once
    sup.check(14.9)
    assert sup.workers[0] is crash_looping and reports == [(1, -9), (2, 1)]  # reported once only
    sup.check(15.0)
    assert sup.workers[0].pid == 101 and sup.restarts == 2


def test_a_refused_worker_is_reported_and_not_replaced() -> None:
    sup, reports = supervisor()
    sup.workers[0].returncode = 78  # type: ignore[attr-defined]
    sup.check(1.0)
    sup.check(60.0)
    assert reports == [(1, 78)] and [p.pid for p in sup.workers] == [2] and sup.restarts == 0


def test_a_worker_killed_while_working_is_replaced_at_once_however_often() -> None:
    sup, reports = supervisor()
    sup._progressed = lambda pid: True  # type: ignore[method-assign]  # every one finished tasks
    now = 0.0
    for _ in range(10):  # SIGKILLed every 0.5 s, as under fault injection
        victim = sup.workers[0]
        sup._started[victim.pid] = now
        now += 0.5
        victim.returncode = -9  # type: ignore[attr-defined]
        sup.check(now)
        assert sup.workers[0] is not victim, "a worker killed while working waited for a back-off"
    assert sup.restarts == 10 and sup._backoff_s[1] == 0.0


def test_a_slot_that_dies_before_finishing_a_task_backs_off_alone() -> None:
    sup, reports = supervisor()
    sup._progressed = lambda pid: False  # type: ignore[method-assign]  # a broken install: never gets that far
    waits = []
    now = 0.0
    for _ in range(8):
        victim = sup.workers[0]
        sup._started[victim.pid] = now
        victim.returncode = 1  # type: ignore[attr-defined]
        died = now + 0.2
        sup.check(died)
        at = sup._restart_at[victim.pid]
        waits.append(round(at - died, 3))
        sup.check(at - 0.01)
        assert sup.workers[0] is victim  # still waiting out its back-off
        sup.check(at)
        assert sup.workers[0] is not victim
        now = at
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    # Meanwhile the other slot's worker, killed while working, is replaced at once.
    sup._progressed = lambda pid: True  # type: ignore[method-assign]
    other = sup.workers[1]
    other.returncode = -9  # type: ignore[attr-defined]
    sup.check(now + 0.05)
    assert sup.workers[1] is not other


def test_the_same_error_exit_again_and_again_backs_off_even_after_tasks_finished() -> None:
    sup, reports = supervisor()
    sup._progressed = lambda pid: True  # type: ignore[method-assign]
    first = sup.workers[0]
    sup._started[1] = 0.0
    first.returncode = 3  # type: ignore[attr-defined]
    sup.check(0.5)
    assert sup.workers[0] is not first  # the first time: replaced at once
    second = sup.workers[0]
    sup._started[second.pid] = 0.5
    second.returncode = 3  # type: ignore[attr-defined]
    sup.check(1.0)
    assert sup.workers[0] is second  # exit code 3 again: a loop of its own making, waits
    sup.check(1.1)
    assert sup.workers[0] is not second


def test_a_worker_that_ended_itself_to_stop_a_task_is_never_backed_off() -> None:
    from distfork.worker import ABORT_EXIT_CODE

    sup, reports = supervisor()
    sup._progressed = lambda pid: False  # type: ignore[method-assign]
    for i in range(3):
        victim = sup.workers[0]
        sup._started[victim.pid] = float(i)
        victim.returncode = ABORT_EXIT_CODE  # type: ignore[attr-defined]
        sup.check(i + 0.1)
        assert sup.workers[0] is not victim
