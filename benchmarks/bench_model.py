"""A big model forked again and again: distfork vs the local call, same run.

    python benchmarks/bench_model.py [--size 5000] [--rounds 10] [--workers 2] [--inflight 10]

A ``torch.nn.Linear(size, size)`` (100 MB of float32 weights at 5000) runs
forward on an (8, size) input. Printed, per call, each with its ratio to the
local call measured in this run:

  local        ``m(x)`` in this process
  jit.fork     ``torch.jit.wait(torch.jit.fork(m, x))``
  sequential   ``distfork.wait(distfork.fork(m, x))`` in a loop
  in flight    ``--inflight`` forks submitted, then ``wait_all`` (wall / forks)
  shared       ``distfork.share(m)`` once, then the handle as the function
               (the same loop as sequential); skipped if there is no share()
  memory       bytes in /dev/shm of this cluster's session plus the workers'
               resident set growth, after the loops, in copies of the weights

Targets (issue 14): sequential <= 1.3x local; in flight <= 0.75x local per
fork with 2 workers; memory <= 1 copy of the weights per host. Only ratios
mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch

import distfork


def best_s(run: Callable[[], Any], rounds: int) -> float:
    """Median wall time of ``run`` over ``rounds`` runs, after one warm-up."""
    run()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def session_shm_bytes(session: str) -> int:
    total = 0
    for name in os.listdir("/dev/shm"):
        if name.startswith(f"df-{session}-"):
            try:
                total += os.stat(os.path.join("/dev/shm", name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


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

    local = best_s(lambda: m(x), a.rounds)
    jit = best_s(lambda: torch.jit.wait(torch.jit.fork(m, x)), a.rounds)

    distfork.init(workers=a.workers)
    try:
        rt = distfork.api._runtime
        assert rt is not None and rt.cluster is not None
        procs = [psutil.Process(p) for p in rt.cluster.pids]
        distfork.wait_all([distfork.fork(torch.set_num_threads, 1) for _ in range(4 * a.workers)])
        rss0 = sum(p.memory_info().rss for p in procs)
        seq = best_s(lambda: distfork.wait(distfork.fork(m, x)), a.rounds)
        inflight = best_s(
            lambda: distfork.wait_all([distfork.fork(m, x) for _ in range(a.inflight)]), max(2, a.rounds // 3)
        ) / a.inflight
        share = getattr(distfork, "share", None)
        shared = None
        if share is not None:
            h = share(m)
            shared = best_s(lambda: distfork.wait(distfork.fork(h, x)), a.rounds)
        extra = session_shm_bytes(rt.cluster.session) + sum(p.memory_info().rss for p in procs) - rss0
    finally:
        distfork.shutdown()

    mb = weights / 1e6
    print(f"model: Linear({a.size}, {a.size}), {mb:.0f} MB of weights; input (8, {a.size}); "
          f"{a.workers} workers; median of {a.rounds}")
    print(f"local call                  {local * 1e3:8.1f} ms   1.00x")
    print(f"torch.jit.fork/wait         {jit * 1e3:8.1f} ms   {jit / local:.2f}x")
    print(f"distfork fork+wait (loop)   {seq * 1e3:8.1f} ms   {seq / local:.2f}x local   (target <= 1.3x)")
    print(f"{a.inflight} forks in flight (per fork) {inflight * 1e3:7.1f} ms   {inflight / local:.2f}x local   "
          "(target <= 0.75x)")
    if shared is not None:
        print(f"share(m) then fork(h, x)    {shared * 1e3:8.1f} ms   {shared / local:.2f}x local")
    print(f"memory beyond the driver    {extra / 1e6:8.0f} MB   {extra / weights:.2f} copies of the weights "
          "(target <= 1 per host)")


if __name__ == "__main__":
    main()
