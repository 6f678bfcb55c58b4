"""Bursts of two-task pipelines: distfork keeps each intermediate in the cluster, ProcessPoolExecutor cannot.

    python benchmarks/bench_pipeline.py [--pipelines 1000] [--rounds 3] [--mb 1] [--workers 2]

Each round submits --pipelines pipelines at once: ``fork(total, fork(ones, n))``
with a float64 intermediate of --mb megabytes, then waits for all. distfork
runs with shared memory and on ZeroMQ frames (DISTFORK_SHM=0, the cross-host
path); ProcessPoolExecutor gets each intermediate back in the driver and
submits it again. Prints pipelines/s, the driver's received result bytes and
the broker's peak RSS (the held values live there), then the ratios.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_tasks import ones, total  # noqa: E402


def distfork_run(pipelines: int, rounds: int, n: int, workers: int) -> tuple[float, int, float]:
    import psutil

    import distfork
    from distfork.status import query_status

    distfork.init(workers=workers)
    rt = distfork.api._runtime
    assert rt is not None and rt.cluster is not None and rt.cluster.broker is not None and rt.address is not None
    broker = psutil.Process(rt.cluster.broker.pid)
    peak = 0.0
    try:
        distfork.wait(distfork.fork(total, distfork.fork(ones, n)))  # warm up
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            outs = [distfork.fork(total, distfork.fork(ones, n)) for _ in range(pipelines)]
            peak = max(peak, broker.memory_info().rss)
            assert distfork.wait_all(outs) == [float(n)] * pipelines
            best = min(best, time.perf_counter() - t0)
            peak = max(peak, broker.memory_info().rss)
        received = query_status(rt.address)["drivers"][0]["result_bytes"]
        return pipelines / best, received, peak / 2**20
    finally:
        distfork.shutdown()


def pool_run(pipelines: int, rounds: int, n: int, workers: int) -> float:
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        pool.submit(total, pool.submit(ones, n).result()).result()
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            made = [pool.submit(ones, n) for _ in range(pipelines)]
            outs = [pool.submit(total, f.result()) for f in made]
            assert [f.result() for f in outs] == [float(n)] * pipelines
            best = min(best, time.perf_counter() - t0)
        return pipelines / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipelines", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mb", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    n = int(a.mb * 1_000_000 // 8)
    if a.child:  # one distfork configuration, in a process whose environment set it
        rate, received, peak = distfork_run(a.pipelines, a.rounds, n, a.workers)
        print(f"{rate:.3f} {received} {peak:.3f}")
        return

    rows = {}
    for label, shm in (("distfork (shm)", "1"), ("distfork (frames)", "0")):
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--pipelines", str(a.pipelines), "--rounds", str(a.rounds),
             "--mb", str(a.mb), "--workers", str(a.workers)],
            env={**os.environ, "DISTFORK_SHM": shm}, check=True, capture_output=True, text=True,
        ).stdout.split()
        rows[label] = (float(out[0]), int(out[1]), float(out[2]))
    pool_rate = pool_run(a.pipelines, a.rounds, n, a.workers)

    print(f"{a.pipelines} pipelines at once, fork(total, fork(ones, n)) with {a.mb:g} MB intermediates, "
          f"{a.workers} workers, best of {a.rounds}")
    for label, (rate, received, peak) in rows.items():
        print(f"{label:<20} {rate:>8.0f} pipelines/s   driver received {received / 2**20:8.2f} MB   "
              f"broker peak RSS {peak:7.1f} MB")
    moved = (a.rounds + 1) * a.pipelines * n * 8 * 2 / 2**20
    print(f"{'ProcessPoolExecutor':<20} {pool_rate:>8.0f} pipelines/s   "
          f"(each intermediate to the driver and back: {moved:.0f} MB in all)")
    for label, (rate, _, _) in rows.items():
        print(f"{label} / ProcessPoolExecutor: {rate / pool_rate:.1f}x")


if __name__ == "__main__":
    main()
