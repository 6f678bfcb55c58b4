"""A/B of the direct path (distfork/direct.py) in one process: no-op fork+wait latency, direct vs broker path.

    python benchmarks/bench_direct_ab.py [--workers 2] [--blocks 20] [--block 100]

One embedded cluster; alternating blocks of sequential ``wait(fork(noop))``, the
direct path on in one block and forced off in the next (by making no task
eligible), so the machine's drift falls on both alike; ProcessPoolExecutor
blocks alternate with them as the yardstick. Prints p50 / p99 of each and
the ratios. Only ratios mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import time
from collections.abc import Callable
from typing import Any

import distfork
import distfork.direct
from bench_tasks import noop


def block(submit: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        submit().result()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--block", type=int, default=100)
    a = ap.parse_args()
    distfork.init(workers=a.workers, direct=True)
    eligible = distfork.direct.eligible
    samples: dict[str, list[float]] = {"ProcessPoolExecutor": [], "direct": [], "broker": []}
    with concurrent.futures.ProcessPoolExecutor(a.workers) as pool:
        def fork() -> Any:
            return distfork.fork(noop)

        block(lambda: pool.submit(noop), 200)
        block(fork, 200)
        for _ in range(a.blocks):
            samples["ProcessPoolExecutor"] += block(lambda: pool.submit(noop), a.block)
            distfork.direct.eligible = eligible
            samples["direct"] += block(fork, a.block)
            distfork.direct.eligible = lambda *args: False
            samples["broker"] += block(fork, a.block)
    distfork.direct.eligible = eligible
    distfork.shutdown()
    stats = {}
    for name, xs in samples.items():
        xs.sort()
        stats[name] = (statistics.median(xs), xs[int(len(xs) * 0.99) - 1])
        print(f"{name:<20} no-op latency p50 {stats[name][0] * 1e6:7.0f} us  p99 {stats[name][1] * 1e6:7.0f} us"
              f"  ({len(xs)} forks)")
    ppe, d, b = stats["ProcessPoolExecutor"], stats["direct"], stats["broker"]
    print(f"ratio to ProcessPoolExecutor p50: direct {d[0] / ppe[0]:.2f}x, broker path {b[0] / ppe[0]:.2f}x; "
          f"direct / broker path p50 {d[0] / b[0]:.2f}x, p99 {d[1] / b[1]:.2f}x")


if __name__ == "__main__":
    main()
