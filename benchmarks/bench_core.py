"""Per-task overhead: distfork vs concurrent.futures.ProcessPoolExecutor, same run.

    python benchmarks/bench_core.py [--workers 2] [--latency-n 2000] [--throughput-n 20000]

Prints, for each system, the sequential fork+wait latency of a no-op (p50,
p99) and the throughput of N no-op forks submitted then gathered, and the
ratios distfork / ProcessPoolExecutor. Only ratios mean anything on a shared
machine; run it a few times.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import time
from collections.abc import Callable
from typing import Any

import distfork
from bench_tasks import noop  # importable: every system pickles it by reference


def latency(submit: Callable[[], Any], n: int) -> tuple[float, float]:
    for _ in range(min(200, n)):  # warm up
        submit().result()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        submit().result()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def throughput(submit: Callable[[], Any], n: int) -> float:
    t0 = time.perf_counter()
    futs = [submit() for _ in range(n)]
    for f in futs:
        f.result()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--latency-n", type=int, default=2000)
    ap.add_argument("--throughput-n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3, help="throughput rounds; the best is kept")
    a = ap.parse_args()

    results: dict[str, dict[str, float]] = {}
    with concurrent.futures.ProcessPoolExecutor(a.workers) as pool:
        pool_submit = lambda: pool.submit(noop)  # noqa: E731
        p50, p99 = latency(pool_submit, a.latency_n)
        tput = max(throughput(pool_submit, a.throughput_n) for _ in range(a.rounds))
        results["ProcessPoolExecutor"] = {"p50": p50, "p99": p99, "tput": tput}

    t0 = time.perf_counter()
    distfork.init(workers=a.workers)
    distfork.wait(distfork.fork(noop))
    first = time.perf_counter() - t0
    df_submit = lambda: distfork.fork(noop)  # noqa: E731
    p50, p99 = latency(df_submit, a.latency_n)
    tput = max(throughput(df_submit, a.throughput_n) for _ in range(a.rounds))
    results["distfork"] = {"p50": p50, "p99": p99, "tput": tput}
    distfork.shutdown()

    for name, r in results.items():
        print(f"{name:<20} no-op latency p50 {r['p50'] * 1e6:7.0f} us  p99 {r['p99'] * 1e6:7.0f} us   "
              f"throughput {r['tput']:8.0f} tasks/s ({a.throughput_n} forks, {a.workers} workers)")
    d, p = results["distfork"], results["ProcessPoolExecutor"]
    print(f"ratio distfork/ProcessPoolExecutor: latency p50 {d['p50'] / p['p50']:.2f}x (lower is better), "
          f"p99 {d['p99'] / p['p99']:.2f}x, throughput {d['tput'] / p['tput']:.2f}x (higher is better)")
    print(f"distfork embedded cluster start -> first result: {first:.3f} s")


if __name__ == "__main__":
    main()
