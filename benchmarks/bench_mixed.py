"""Mixed task durations: does a long task wait behind short ones prefetched to a busy worker?

    python benchmarks/bench_mixed.py [--workers 2] [--burst 2000] [--short 200] [--long 20] [--rounds 2]

Two cases, each for distfork and a ``concurrent.futures.ProcessPoolExecutor``
with the same number of workers, measured in one run, in alternation:

* ``sleep after burst``: ``--burst`` no-op tasks are forked and gathered (the
  broker learns that tasks are tiny), then 4 x ``time.sleep(0.25)``;
  makespan of the sleeps.
* ``mixed after burst``: the same burst, then ``--short`` x ``sleep(0.001)``
  and ``--long`` x ``sleep(0.1)``, shuffled (fixed seed), forked at once;
  makespan of those. Tasks prefetched while they looked as short as the
  burst's must not keep a long one waiting on a busy worker.

Each makespan is printed with its ratio to the ideal schedule's lower bound,
``max(total work / workers, longest task)``, and to the pool's. The best of
``--rounds`` is kept for each (this machine's speed drifts).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import random
import time
from collections.abc import Callable
from typing import Any

import distfork
from bench_tasks import noop

Submit = Callable[..., Any]


def sleeps_after_burst(submit: Submit, burst: int, durations: list[float]) -> float:
    """Makespan of ``time.sleep(d)`` for each of ``durations``, forked after ``burst`` no-ops finished."""
    for f in [submit(noop) for _ in range(burst)]:
        f.result()
    t0 = time.perf_counter()
    for f in [submit(time.sleep, d) for d in durations]:
        f.result()
    return time.perf_counter() - t0


def ideal(durations: list[float], workers: int) -> float:
    """The lower bound of any schedule's makespan on ``workers`` slots."""
    return max(sum(durations) / workers, max(durations))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--burst", type=int, default=2000)
    ap.add_argument("--short", type=int, default=200, help="1 ms tasks in the mixed case")
    ap.add_argument("--long", type=int, default=20, help="100 ms tasks in the mixed case")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    durations = [0.001] * a.short + [0.1] * a.long
    random.Random(16).shuffle(durations)
    cases: dict[str, tuple[Callable[[Submit], float], float]] = {
        "4 x 250 ms after burst": (lambda s: sleeps_after_burst(s, a.burst, [0.25] * 4), ideal([0.25] * 4, a.workers)),
        f"{a.short}x1ms+{a.long}x100ms after burst": (lambda s: sleeps_after_burst(s, a.burst, durations),
                                                     ideal(durations, a.workers)),
    }
    distfork.init(workers=a.workers)
    best: dict[tuple[str, str], float] = {}
    with concurrent.futures.ProcessPoolExecutor(a.workers) as pool:
        systems: dict[str, Submit] = {"ProcessPoolExecutor": pool.submit, "distfork": distfork.fork}
        for submit in systems.values():
            for f in [submit(noop) for _ in range(100)]:  # warm up
                f.result()
        for _ in range(a.rounds):
            for case, (run, _) in cases.items():
                for name, submit in systems.items():
                    took = run(submit)
                    best[name, case] = min(best.get((name, case), took), took)
    distfork.shutdown()
    for case, (_, lower) in cases.items():
        p, d = best["ProcessPoolExecutor", case], best["distfork", case]
        print(f"{case:<30} ideal {lower:6.3f} s   ProcessPoolExecutor {p:6.3f} s ({p / lower:5.3f}x ideal)   "
              f"distfork {d:6.3f} s ({d / lower:5.3f}x ideal, {d / p:5.3f}x the pool)")


if __name__ == "__main__":
    main()
