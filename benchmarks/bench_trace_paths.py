"""What the trace code itself costs per fork, in each process, without processes or sockets.

    python benchmarks/bench_trace_paths.py [--batch 64] [--batches 300]

Runs each process's traced-only path on batches of ``--batch`` no-op forks:
the driver's fork-calling thread (``tracing.begin`` and the ``_traced``
entry), the worker slot (scope, stamps, its note, the notes entry), the
broker (``tracing.take_notes`` and the notes entry for the driver) and the
driver's I/O thread (``tracing.notes_of``, ``tracing.finish``); prints the
CPU microseconds per fork of each (thread time, best of 5). In a real run
each costs about twice this (cold caches, a shared GIL), plus the garbage
collections the ring adds; ``bench_trace.py`` measures that whole.
"""

from __future__ import annotations

import argparse
import gc
import time
import types
from collections.abc import Callable
from typing import Any

from distfork import protocol, tracing
from distfork.protocol import ResultEntry


def noop() -> None:
    pass


def best_us(fn: Callable[[], Any], forks: int, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return min(times) / forks * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=300)
    a = ap.parse_args()
    size, rounds = a.batch, a.batches
    forks = size * rounds
    trace = tracing.Trace(capacity=forks).__enter__()
    traced: dict[int, tracing.Pending] = {}

    def driver_main() -> None:
        for task_id in range(1, forks + 1):
            pending = tracing.begin(noop, (), {}, True)
            assert pending is not None
            traced[task_id] = pending

    frames_in, frames_out = [b"x" * 40], [b"y" * 4]

    def worker() -> bytes:
        for _ in range(rounds):
            notes = []
            for key in range(1, size + 1):
                started = time.perf_counter()  # the worker stamps these anyway
                traced = 256 & 256
                if traced:
                    tracing.open_task()
                finished = time.perf_counter()
                if traced:
                    notes.append(tracing.close_task(key, started, finished, frames_in, frames_out))
            head = tracing.notes_entry(notes)
        return bytes(head.frames[0])

    tasks = {k: types.SimpleNamespace(trace=256, submitted=1.0, dispatched=2.0, losses=0, task_id=k, note=None)
             for k in range(1, size + 1)}
    peer: Any = types.SimpleNamespace(info={"name": "w/0", "host": "h", "pid": 9}, assigned=tasks)

    def broker() -> ResultEntry:
        results = [ResultEntry(0, 0, 0.0, [worker_notes], protocol.Flag.TRACE, size)]
        results += [ResultEntry(k, 0, 0.1, [b"v"]) for k in range(1, size + 1)]
        for _ in range(rounds):
            rest = tracing.take_notes(peer, results, 5.0)
            head = protocol.notes_entry([n for n in (tasks[e.id].note for e in rest) if n is not None])
        return head

    def driver_io() -> None:
        task_id = 0
        for _ in range(rounds):
            entries = [driver_notes] + [ResultEntry(k, 0, 0.1, [b"v"]) for k in range(1, size + 1)]
            blob, rest = tracing.notes_of(entries, traced)
            for e in rest:
                task_id += 1
                tracing.finish(traced.pop(task_id), e.status, e.flags, None, "driver", e.id, blob)

    main_us = best_us(driver_main, forks, 1)
    worker_us = best_us(worker, forks)
    worker_notes = worker()
    broker_us = best_us(broker, forks)
    driver_notes = broker()
    io_us = best_us(driver_io, forks, 1)
    trace.close()
    t0 = time.perf_counter()
    n = len(trace.tasks())
    read_us = (time.perf_counter() - t0) / n * 1e6
    print(f"trace code, CPU us per fork: driver main {main_us:.2f}  driver io {io_us:.2f}  broker {broker_us:.2f}  "
          f"worker {worker_us:.2f}  total {main_us + io_us + broker_us + worker_us:.2f}   "
          f"(reading the trace afterwards: {read_us:.1f} us per task)")


if __name__ == "__main__":
    main()
