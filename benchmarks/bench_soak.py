"""Soak: a million no-op forks through a bounded window; memory must stay flat.

    python benchmarks/bench_soak.py [--tasks 1000000] [--window 10000] [--workers 2]

Prints tasks/s every 100,000 forks with the RSS of the driver and of the
broker at that moment, then the peaks. Flat means: the RSS at the end is
about the RSS after the first 100k (the window, not the total, sets it).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distfork  # noqa: E402
from bench_tasks import noop  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--window", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--every", type=int, default=100_000)
    a = ap.parse_args()

    distfork.init(workers=a.workers, window=a.window)
    rt = distfork.api._runtime
    assert rt is not None and rt.cluster is not None and rt.cluster.broker is not None
    driver, broker = psutil.Process(), psutil.Process(rt.cluster.broker.pid)
    mb = lambda p: p.memory_info().rss / 2**20  # noqa: E731
    peak_driver = peak_broker = 0.0
    pending: collections.deque[distfork.Future[None]] = collections.deque()
    start = last = time.perf_counter()
    print(f"{a.tasks} no-op forks, window {a.window}, {a.workers} workers")
    for i in range(1, a.tasks + 1):
        pending.append(distfork.fork(noop))  # blocks while the window is full
        while pending and pending[0].done():
            pending.popleft().result()
        if i % a.every == 0:
            now = time.perf_counter()
            d, b = mb(driver), mb(broker)
            peak_driver, peak_broker = max(peak_driver, d), max(peak_broker, b)
            print(f"{i:>9} forks  {a.every / (now - last):8.0f} tasks/s   RSS driver {d:7.1f} MB  broker {b:7.1f} MB",
                  flush=True)
            last = now
    for f in pending:
        f.result()
    total = time.perf_counter() - start
    print(f"done: {a.tasks / total:.0f} tasks/s overall; "
          f"peak RSS driver {peak_driver:.1f} MB, broker {peak_broker:.1f} MB")
    distfork.shutdown()


if __name__ == "__main__":
    main()
