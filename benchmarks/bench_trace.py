"""What tracing costs: no-op fork throughput untraced and inside ``distfork.trace()``, same run.

    python benchmarks/bench_trace.py [--workers 2] [--throughput-n 20000] [--rounds 5]

Untraced and traced rounds alternate in pairs, which of the two goes first
alternating too (this machine's speed drifts); each round starts after a full
garbage collection, with nothing left of the last. The best round of each is
kept, and the median ratio of the back-to-back pairs (steadier when other work
shares the machine) is printed too, and the median of each pair's traced
minus untraced CPU per fork, by process. ProcessPoolExecutor runs alongside as the usual
yardstick. The goal: traced >= 0.9x untraced; untraced unchanged (one flag
check per fork: the line "flag check" says what it costs per fork).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import os
import threading
import time
import timeit
from collections.abc import Callable
from typing import Any

import psutil
from bench_core import throughput

import distfork
from bench_tasks import noop
from distfork import tracing


def _thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid``: /proc's schedstat (nanoseconds; psutil's ticks are 10 ms,
    too coarse for a few µs per fork), else psutil."""
    out: dict[int, float] = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0]) / 1e9
    except (OSError, ValueError):
        try:
            for t in psutil.Process(pid).threads():
                out[t.id] = t.user_time + t.system_time
        except psutil.Error:
            pass
    return out


def cpu_now() -> dict[str, float]:
    """CPU seconds so far of this process's fork-calling thread, its driver I/O thread, the broker and the
    workers (summed): where a traced fork's extra cost lands."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {"driver main": 0.0, "driver io": 0.0, "driver other": 0.0, "broker": 0.0, "workers": 0.0}
    for tid, cpu_s in _thread_cpu_s(os.getpid()).items():
        name = names.get(tid, "")
        key = ("driver main" if name == "MainThread" else "driver io" if name == "distfork-driver-io"
               else "driver other")
        out[key] += cpu_s
    for child in psutil.Process().children(recursive=True):
        try:
            name = child.name()
        except psutil.Error:
            continue
        key = "broker" if "broker" in name else "workers" if "worker" in name else ""
        if key:
            out[key] += sum(_thread_cpu_s(child.pid).values())
    return out


def measured(submit: Callable[[], Any], n: int, cpu: dict[str, list[float]]) -> float:
    """Throughput of ``n`` forks; adds each process's CPU per fork (µs) to ``cpu``."""
    gc.collect()  # each round from the same heap: a full collection costs per object the driver holds
    before = cpu_now()
    rate = throughput(submit, n)
    after = cpu_now()
    for k, v in after.items():
        cpu.setdefault(k, []).append((v - before[k]) / n * 1e6)
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--throughput-n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    distfork.init(workers=a.workers)
    tputs: dict[str, list[float]] = {"ProcessPoolExecutor": [], "untraced": [], "traced": []}
    recorded = 0
    cpus: dict[str, dict[str, list[float]]] = {"untraced": {}, "traced": {}}
    with concurrent.futures.ProcessPoolExecutor(a.workers) as pool:
        ppe: Callable[[], Any] = lambda: pool.submit(noop)  # noqa: E731
        fork: Callable[[], Any] = lambda: distfork.fork(noop)  # noqa: E731
        for submit in (ppe, fork):
            for _ in range(200):
                submit().result()
        for i in range(a.rounds):
            tputs["ProcessPoolExecutor"].append(throughput(ppe, a.throughput_n))
            for traced in (False, True) if i % 2 == 0 else (True, False):
                if not traced:
                    tputs["untraced"].append(measured(fork, a.throughput_n, cpus["untraced"]))
                    continue
                with distfork.trace() as t:
                    tputs["traced"].append(measured(fork, a.throughput_n, cpus["traced"]))
                tasks = t.tasks()
                recorded = len(tasks)
                assert all(x.status == "ok" and x.worker for x in tasks), "a traced task without its worker report"
                del t, tasks
    distfork.shutdown()
    best = {k: max(v) for k, v in tputs.items()}
    for name, v in best.items():
        print(f"{name:<20} throughput {v:8.0f} tasks/s ({a.throughput_n} no-op forks, {a.workers} workers, "
              f"best of {a.rounds})")
    pairs = sorted(t / u for u, t in zip(tputs["untraced"], tputs["traced"], strict=True))
    print(f"ratio traced/untraced: {best['traced'] / best['untraced']:.2f}x (best rounds; median of the "
          f"{len(pairs)} round pairs, each measured back to back: {pairs[len(pairs) // 2]:.2f}x)")
    print(f"                       "
          f"untraced/ProcessPoolExecutor: {best['untraced'] / best['ProcessPoolExecutor']:.2f}x   "
          f"traced/ProcessPoolExecutor: {best['traced'] / best['ProcessPoolExecutor']:.2f}x")
    # CPU per fork by process (median over rounds): the busiest process bounds the throughput.
    for name, cpu in cpus.items():
        med = {k: sorted(v)[len(v) // 2] for k, v in cpu.items()}
        parts = "  ".join(f"{k} {v:5.1f}" for k, v in med.items())
        print(f"{name:<9} CPU us/fork: {parts}  total {sum(med.values()):5.1f}")
    # What tracing adds, pair by pair (the two rounds of a pair ran back to back), then the median.
    untraced, traced = cpus["untraced"], cpus["traced"]
    extra = {k: sorted(t - u for u, t in zip(untraced[k], traced[k], strict=True)) for k in untraced}
    totals = sorted(sum(traced[k][i] - untraced[k][i] for k in untraced) for i in range(len(tputs["traced"])))
    parts = "  ".join(f"{k} {v[len(v) // 2]:+5.1f}" for k, v in extra.items())
    print(f"traced extra (median of pairs) CPU us/fork: {parts}  total {totals[len(totals) // 2]:+5.1f}")
    check_s = min(timeit.repeat("tracing.ACTIVE", globals={"tracing": tracing}, number=1_000_000, repeat=3)) / 1e6
    print(f"flag check of an untraced fork: {check_s * 1e9:.0f} ns = {check_s * best['untraced'] * 100:.3f}% "
          f"of an untraced fork's share of the throughput; last traced round recorded {recorded} tasks")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.1f} s)")
