"""Nested forks vs flat submission of the same number of tasks.

    python benchmarks/bench_nested.py [--depth 12] [--workers 2] [--rounds 3]

Recursive Fibonacci that forks both halves down to ``--depth`` (465 forks at
depth 12) cannot run on ProcessPoolExecutor at all (a task waiting for its
own children deadlocks the pool), so the comparison is with Dask-style flat
submission: the driver forks as many no-op tasks as the recursion makes,
then gathers them. Prints tasks/s of each (best of --rounds).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distfork  # noqa: E402
from bench_tasks import fib, noop  # noqa: E402


def forks_of(n: int) -> int:
    """Tasks forked by fib(n), the root included."""
    return 1 if n < 2 else 1 + forks_of(n - 1) + forks_of(n - 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    n_tasks = forks_of(a.depth)
    distfork.init(workers=a.workers)
    try:
        distfork.wait(distfork.fork(fib, 5))  # warm up
        nested = flat = 0.0
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            distfork.wait(distfork.fork(fib, a.depth))
            nested = max(nested, n_tasks / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            distfork.wait_all([distfork.fork(noop) for _ in range(n_tasks)])
            flat = max(flat, n_tasks / (time.perf_counter() - t0))
    finally:
        distfork.shutdown()
    print(f"fib({a.depth}) with nested forks: {n_tasks} tasks, {nested:8.0f} tasks/s ({a.workers} workers)")
    print(f"flat submission of {n_tasks} no-op tasks: {flat:8.0f} tasks/s")
    print(f"nested/flat: {nested / flat:.2f}x   (ProcessPoolExecutor: the nested version deadlocks)")


if __name__ == "__main__":
    main()
