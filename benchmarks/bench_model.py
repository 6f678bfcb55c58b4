"""A big model forked again and again: distfork vs the local call, same run.

    python benchmarks/bench_model.py [--size 5000] [--rounds 10] [--workers 2] [--inflight 10]

A ``torch.nn.Linear(size, size)`` (100 MB of float32 weights at 5000) runs
forward on an (8, size) input. Printed, per call, each with its ratio to the
local call timed right before it in this run:

  local        ``m(x)`` in this process
  jit.fork     ``torch.jit.wait(torch.jit.fork(m, x))``
  sequential   ``distfork.wait(distfork.fork(m, x))`` in a loop
  in flight    ``--inflight`` forks submitted, then ``wait_all`` (wall / forks)
  changed      sequential, with an in-place op on the weights before each
               fork (training in the driver: no copy can be reused)
  held         a module built by a task (``fm = fork(build, size)``), kept in
               the cluster as a held value, then ``fork(forward, fm, x)``
               again and again (sequential and in flight): the weights never
               pass through the driver
  shared       ``distfork.share(m)`` once, then the handle as the function
               (the same loop, and in flight); skipped if there is no share()
  memory       growth of this cluster's /dev/shm bytes plus the workers'
               anonymous pages over the loops, in copies of the weights
               (warm spare segments of the argument path count too)

Targets (issue 14): sequential <= 1.3x local; in flight <= 0.75x local per
fork with 2 workers; memory <= 1 copy of the weights per host. Only ratios
mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import distfork
from distfork.status import query_status


def paired(run: Callable[[], Any], local: Callable[[], Any], rounds: int, per: int = 1) -> tuple[float, float]:
    """Median seconds of ``run`` (divided by ``per``) and median ratio to ``local`` timed right before it.

    Pairing each run with a local call measured next to it keeps the ratio
    meaningful on a machine whose load changes from second to second.
    """
    run()
    local()
    times, ratios = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        local()
        t1 = time.perf_counter()
        run()
        t2 = time.perf_counter()
        times.append((t2 - t1) / per)
        ratios.append((t2 - t1) / per / (t1 - t0))
    return statistics.median(times), statistics.median(ratios)


def session_shm_bytes(session: str) -> int:
    total = 0
    for name in os.listdir("/dev/shm"):
        if name.startswith(f"df-{session}-"):
            try:
                total += os.stat(os.path.join("/dev/shm", name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def session_shm_bytes_of(name: str) -> int:
    try:
        return os.stat(os.path.join("/dev/shm", name)).st_blocks * 512
    except FileNotFoundError:
        return 0


def private_dirty(pid: int) -> int:
    """Bytes of a process's own copies: its anonymous pages (heap, and pages it wrote of a private
    mapping). Not smaps' Private_Dirty, which also counts /dev/shm pages that only this process maps
    (the segments are counted once already, from /dev/shm)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0


def build(size: int) -> Any:
    """A task: the module, built in a worker (its result stays in the cluster when tasks take it)."""
    torch.manual_seed(0)
    m = torch.nn.Linear(size, size)
    m.requires_grad_(False)
    return m


def forward(m: Any, x: Any) -> Any:
    return m(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--inflight", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(1)  # the workers run one thread each too: compare like with like
    torch.manual_seed(0)
    m = torch.nn.Linear(a.size, a.size)
    m.requires_grad_(False)
    x = torch.randn(8, a.size)
    weights = sum(p.numel() * p.element_size() for p in m.parameters())


    def local() -> Any:
        return m(x)

    local_s, _ = paired(local, local, a.rounds)
    jit_s, jit_r = paired(lambda: torch.jit.wait(torch.jit.fork(m, x)), local, a.rounds)

    distfork.init(workers=a.workers)
    try:
        rt = distfork.api._runtime
        assert rt is not None and rt.cluster is not None
        session = rt.cluster.session
        distfork.wait_all([distfork.fork(torch.set_num_threads, 1) for _ in range(4 * a.workers)])
        pids = [w["pid"] for w in query_status(rt.cluster.address)["workers"]]
        dirty0 = sum(private_dirty(p) for p in pids)
        shm0 = session_shm_bytes(session)
        seq = paired(lambda: distfork.wait(distfork.fork(m, x)), local, a.rounds)
        fly = paired(lambda: distfork.wait_all([distfork.fork(m, x) for _ in range(a.inflight)]), local,
                     max(3, a.rounds // 2), per=a.inflight)
        plain_mem = session_shm_bytes(session) - shm0 + sum(private_dirty(p) for p in pids) - dirty0
        pool = rt.driver._segments if rt.driver is not None else None
        spares = pool.stats()["spare_bytes"] if pool is not None else 0  # warm segments of the argument path
        copied = sum(session_shm_bytes_of(n) for n in (rt.copies.names() if rt.copies is not None else ()))

        def changed_then_fork() -> Any:
            with torch.no_grad():
                m.weight.add_(0.0)  # an in-place op: the version counter moves, as in training
            return distfork.wait(distfork.fork(m, x))

        changed = paired(changed_then_fork, local, max(3, a.rounds // 2))

        dirty0 = sum(private_dirty(p) for p in pids)
        shm0 = session_shm_bytes(session)
        fm = distfork.fork(build, a.size)
        first = distfork.fork(forward, fm, x)  # taken before it is done: the broker holds the module
        distfork.wait(first)
        assert fm.held, "the module's future should be held in the cluster"
        held = paired(lambda: distfork.wait(distfork.fork(forward, fm, x)), local, a.rounds)
        held_fly = paired(lambda: distfork.wait_all([distfork.fork(forward, fm, x) for _ in range(a.inflight)]),
                          local, max(3, a.rounds // 2), per=a.inflight)
        held_mem = session_shm_bytes(session) - shm0 + sum(private_dirty(p) for p in pids) - dirty0
        del first  # (fm: the lambdas above close over it)
        share = getattr(distfork, "share", None)
        shared = shared_fly = None
        if share is not None:
            dirty0 = sum(private_dirty(p) for p in pids)
            shm0 = session_shm_bytes(session)
            h = share(m)
            shared = paired(lambda: distfork.wait(distfork.fork(h, x)), local, a.rounds)
            shared_fly = paired(lambda: distfork.wait_all([distfork.fork(h, x) for _ in range(a.inflight)]),
                                local, max(3, a.rounds // 2), per=a.inflight)
            shared_mem = session_shm_bytes(session) - shm0 + sum(private_dirty(p) for p in pids) - dirty0
            h.release()
    finally:
        distfork.shutdown()

    def line(label: str, r: tuple[float, float], target: str = "") -> None:
        print(f"{label:<36}{r[0] * 1e3:8.1f} ms   {r[1]:5.2f}x local {target}")

    print(f"model: Linear({a.size}, {a.size}), {weights / 1e6:.0f} MB of weights; input (8, {a.size}); "
          f"{a.workers} workers; medians of {a.rounds}, each ratio against a local call timed next to it")
    line("local call", (local_s, 1.0))
    line("torch.jit.fork/wait", (jit_s, jit_r))
    line("fork(m, x)+wait, in a loop", seq, "(target <= 1.3x)")
    line(f"fork(m, x): {a.inflight} in flight, per fork", fly, "(target <= 0.75x)")
    line("fork(m, x), m changed before each", changed)
    print(f"{'memory of fork(m, x) beyond the driver':<36}{plain_mem / 1e6:8.0f} MB   "
          f"{plain_mem / weights:5.2f} copies of the weights (shm + workers' own pages; target <= 1)")
    print(f"{'  of which warm argument spares':<36}{spares / 1e6:8.0f} MB   "
          f"{spares / weights:5.2f} (the driver's pool, up to shm_spare_bytes, from the first fork's transfer)")
    print(f"{'  of which copies of parameters':<36}{copied / 1e6:8.0f} MB   "
          f"{copied / weights:5.2f} (segments of unchanged parameters forked again; the rest: inputs, results)")
    line("held future of m: fork(f, fm, x)+wait", held)
    line(f"held future of m: {a.inflight} in flight", held_fly)
    print(f"{'memory of the held module':<36}{held_mem / 1e6:8.0f} MB   "
          f"{held_mem / weights:5.2f} copies of the weights (its result segment, the maker's result spare, "
          "workers' own pages)")
    if shared is not None and shared_fly is not None:
        line("share(m), fork(h, x)+wait, in a loop", shared, "(target <= 1.3x)")
        line(f"share(m), {a.inflight} in flight, per fork", shared_fly, "(target <= 0.75x)")
        print(f"{'memory of share(m) beyond the driver':<36}{shared_mem / 1e6:8.0f} MB   "
              f"{shared_mem / weights:5.2f} copies of the weights (target <= 1)")


if __name__ == "__main__":
    main()
