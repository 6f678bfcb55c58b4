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
    sup._backoff_s = 4.0  # it has been dying young for a while
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
