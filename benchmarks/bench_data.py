"""Large arrays: distfork vs ProcessPoolExecutor vs one numpy.copy, same run.

    python benchmarks/bench_data.py [--mb 100] [--rounds 5] [--workers 2] [--no-frames]

Four transfers of a float64 array of --mb megabytes:
  argument  the worker gets the array and returns its sum
  result    the worker returns np.ones of that size
  echo      the worker returns the array it got
  pipeline  one task makes np.ones, another takes it and returns its sum:
            fork(total, fork(ones, n)) -- the value stays in the cluster; for
            ProcessPoolExecutor it goes through the driver (result, then argument)
Each prints GB/s (array bytes / wall time of fork+wait, best of --rounds) for
distfork with shared memory, distfork forced onto ZeroMQ frames
(DISTFORK_SHM=0, the cross-host path), ProcessPoolExecutor, and one
``numpy.copy`` of the array (the memory-bandwidth floor), then the ratios.
Only ratios mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_tasks import echo, ones, total  # noqa: E402

CASES = ("argument", "result", "echo", "pipeline")
RAY_RESULT_GBPS = 1.04  # Ray's 100 MB result on this machine, issue 16 (Ray is not installed here)


def best_gbps(run: Callable[[], Any], nbytes: int, rounds: int) -> float:
    run()  # warm up: start workers, import numpy there
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def measure(submit: Callable[..., Any], a: np.ndarray, rounds: int, futures_as_arguments: bool) -> dict[str, float]:
    n = a.size

    def pipeline() -> Any:
        made = submit(ones, n)
        return submit(total, made if futures_as_arguments else made.result()).result()

    return {
        "argument": best_gbps(lambda: submit(total, a).result(), a.nbytes, rounds),
        "result": best_gbps(lambda: submit(ones, n).result(), a.nbytes, rounds),
        "echo": best_gbps(lambda: submit(echo, a).result(), a.nbytes, rounds),
        "pipeline": best_gbps(pipeline, a.nbytes, rounds),
    }


def distfork_run(mb: int, rounds: int, workers: int) -> dict[str, float]:
    import distfork

    a = np.random.default_rng(0).random(mb * 1_000_000 // 8)
    distfork.init(workers=workers)
    try:
        return measure(distfork.fork, a, rounds, futures_as_arguments=True)
    finally:
        distfork.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-frames", action="store_true", help="skip distfork forced onto ZeroMQ frames")
    ap.add_argument("--child", choices=["distfork"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:  # one distfork configuration, in a process whose environment set it
        r = distfork_run(a.mb, a.rounds, a.workers)
        print(" ".join(f"{r[c]:.6f}" for c in CASES))
        return

    arr = np.random.default_rng(0).random(a.mb * 1_000_000 // 8)
    results: dict[str, dict[str, float]] = {}
    for label, shm in (("distfork (shm)", "1"), ("distfork (frames)", "0"))[: 1 if a.no_frames else 2]:
        out = subprocess.run(
            [sys.executable, __file__, "--child", "distfork", "--mb", str(a.mb), "--rounds", str(a.rounds),
             "--workers", str(a.workers)],
            env={**os.environ, "DISTFORK_SHM": shm}, check=True, capture_output=True, text=True,
        ).stdout.split()
        results[label] = dict(zip(CASES, map(float, out), strict=True))
    with concurrent.futures.ProcessPoolExecutor(a.workers) as pool:
        results["ProcessPoolExecutor"] = measure(pool.submit, arr, a.rounds, futures_as_arguments=False)
    copy = best_gbps(lambda: np.copy(arr), arr.nbytes, a.rounds)

    print(f"{a.mb} MB float64, {a.workers} workers, best of {a.rounds}; GB/s of array bytes per fork+wait")
    print(f"{'':<22}" + "".join(f"{c:>12}" for c in CASES))
    for label, r in results.items():
        print(f"{label:<22}" + "".join(f"{r[c]:>12.2f}" for c in CASES))
    print(f"{'one numpy.copy':<22}{copy:>12.2f}")
    pool = results["ProcessPoolExecutor"]
    for label in ("distfork (shm)", "distfork (frames)")[: 1 if a.no_frames else 2]:
        r = results[label]
        print(f"{label} / ProcessPoolExecutor: " + ", ".join(f"{c} {r[c] / pool[c]:.1f}x" for c in CASES))
    r = results["distfork (shm)"]
    print("distfork (shm) time / one numpy.copy time: " + ", ".join(f"{c} {copy / r[c]:.2f}x" for c in CASES)
          + "  (target: argument and result <= 2x)")
    print(f"targets (issue 16): result >= 10x ProcessPoolExecutor ({r['result'] / pool['result']:.1f}x), "
          f">= Ray's {RAY_RESULT_GBPS} GB/s ({r['result']:.2f}), <= 2x one numpy.copy ({copy / r['result']:.2f}x)")


if __name__ == "__main__":
    main()
