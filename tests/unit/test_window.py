"""``Window``: the driver's in-flight window, a semaphore that is cheap while not full."""

from __future__ import annotations

import threading

import pytest

from distfork.window import Window

pytestmark = pytest.mark.timeout(30)


def test_an_acquire_beyond_n_waits_for_a_release() -> None:
    w = Window(2)
    w.acquire()
    w.acquire()
    got = threading.Event()
    t = threading.Thread(target=lambda: (w.acquire(), got.set()))
    t.start()
    assert not got.wait(0.05)  # all slots taken: it waits
    w.release()
    assert got.wait(10)
    t.join(10)


def test_never_more_than_n_slots_taken_by_many_threads() -> None:
    n, rounds, threads = 3, 2000, 6
    w = Window(n)
    taken, most = [0], [0]
    lock = threading.Lock()

    def work() -> None:
        for _ in range(rounds):
            w.acquire()
            with lock:
                taken[0] += 1
                most[0] = max(most[0], taken[0])
            with lock:
                taken[0] -= 1
            w.release()

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(20)
    assert most[0] <= n and taken[0] == 0
    for _ in range(n):  # every slot came back
        w.acquire()
