"""Per-task overhead: distfork vs concurrent.futures.ProcessPoolExecutor, same run.

    python benchmarks/bench_core.py [--workers 2] [--latency-n 2000] [--throughput-n 20000] [--ship-code]

Prints, for each system, the sequential fork+wait latency of a no-op (p50,
p99) and the throughput of N no-op forks submitted then gathered, and the
ratios distfork / ProcessPoolExecutor; then the CPU time (user + system) each
distfork process spent per no-op task over the throughput runs: the driver
(this process, all its threads), the broker, and the workers together. Only ratios mean anything on a shared
machine; run it a few times. ``--ship-code``: every fork carries a code
package's hash (``init(code=["bench_tasks"])``), as the forks of a driver
connected to a remote cluster do, to see what code shipping costs per fork.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import psutil

import distfork
from bench_tasks import noop  # importable: every system pickles it by reference


def latency_samples(submit: Callable[[], Any], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        submit().result()
        samples.append(time.perf_counter() - t0)
    return samples


def throughput(submit: Callable[[], Any], n: int) -> float:
    t0 = time.perf_counter()
    futs = [submit() for _ in range(n)]
    for f in futs:
        f.result()
    return n / (time.perf_counter() - t0)


def cpu_s(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds the processes have used so far (one gone meanwhile counts 0)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--latency-n", type=int, default=2000)
    ap.add_argument("--throughput-n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; best throughput is kept")
    ap.add_argument("--ship-code", action="store_true", help="ship bench_tasks as a code package")
    a = ap.parse_args()

    # Both systems stay up and are measured in alternation, round after round:
    # this machine's speed drifts over seconds, and alternating spreads the
    # drift over both instead of favouring whichever ran in the quiet moment.
    t0 = time.perf_counter()
    if a.ship_code:
        os.environ.setdefault("DISTFORK_CODE_CACHE_DIR", tempfile.mkdtemp(prefix="distfork-bench-code-"))
    distfork.init(workers=a.workers, code=["bench_tasks"] if a.ship_code else ())
    distfork.wait(distfork.fork(noop))
    first = time.perf_counter() - t0
    systems: dict[str, Callable[[], Any]] = {}
    cluster = distfork.api._runtime.cluster if distfork.api._runtime is not None else None
    roles = {"driver": [psutil.Process()],
             "broker": [psutil.Process(cluster.broker.pid)] if cluster is not None and cluster.broker else [],
             "workers": [psutil.Process(pid) for pid in cluster.pids[1:]] if cluster is not None else []}
    cpu = dict.fromkeys(roles, 0.0)
    samples: dict[str, list[float]] = {"ProcessPoolExecutor": [], "distfork": []}
    tputs: dict[str, list[float]] = {"ProcessPoolExecutor": [], "distfork": []}
    with concurrent.futures.ProcessPoolExecutor(a.workers) as pool:
        systems["ProcessPoolExecutor"] = lambda: pool.submit(noop)
        systems["distfork"] = lambda: distfork.fork(noop)
        for submit in systems.values():
            for _ in range(200):  # warm up
                submit().result()
        for _ in range(a.rounds):
            for name, submit in systems.items():
                samples[name] += latency_samples(submit, a.latency_n // a.rounds)
                before = {role: cpu_s(procs) for role, procs in roles.items()} if name == "distfork" else {}
                tputs[name].append(throughput(submit, a.throughput_n))
                for role, used in before.items():
                    cpu[role] += cpu_s(roles[role]) - used
    distfork.shutdown()
    results: dict[str, dict[str, float]] = {}
    for name in systems:
        xs = sorted(samples[name])
        results[name] = {"p50": statistics.median(xs), "p99": xs[int(len(xs) * 0.99) - 1], "tput": max(tputs[name])}

    for name, r in results.items():
        print(f"{name:<20} no-op latency p50 {r['p50'] * 1e6:7.0f} us  p99 {r['p99'] * 1e6:7.0f} us   "
              f"throughput {r['tput']:8.0f} tasks/s ({a.throughput_n} forks, {a.workers} workers)")
    d, p = results["distfork"], results["ProcessPoolExecutor"]
    print(f"ratio distfork/ProcessPoolExecutor: latency p50 {d['p50'] / p['p50']:.2f}x (lower is better), "
          f"p99 {d['p99'] / p['p99']:.2f}x, throughput {d['tput'] / p['tput']:.2f}x (higher is better)")
    n = a.throughput_n * a.rounds
    print("CPU per no-op task: " + ", ".join(f"{role} {cpu[role] / n * 1e6:.0f} us" for role in roles)
          + f" ({n} forks; driver: this process, all threads)")
    print(f"distfork embedded cluster start -> first result: {first:.3f} s")


if __name__ == "__main__":
    main()
