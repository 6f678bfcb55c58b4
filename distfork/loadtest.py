"""``distfork loadtest``: drive a cluster with many forks and report what it did.

::

    this process                                              the cluster
    ┌──────────────────────────────────────────────┐
    │ main thread: fork(work, payload, ...) while  │  SUBMIT  ┌────────┐  TASKS  ┌─────────┐
    │   fewer than `concurrency` are unfinished    │ ───────▶ │ broker │ ──────▶ │ workers │
    │   (a semaphore), until `tasks` were forked   │ ◀─────── │        │ ◀────── │ work()  │
    │   or `duration_s` passed; progress display   │ RESULTS  └────────┘ RESULTS └─────────┘
    │ callback thread: on each future's end, note  │
    │   the time, the outcome, release a slot      │
    └──────────────────────────────────────────────┘

Latency is measured per task from the ``fork`` call to its future's done
callback (what a user of ``add_done_callback`` sees), for every task that
finished, failures included. The task, :func:`work`, sleeps ``task_s``,
returns ``result_bytes`` bytes and where it ran, and raises
:class:`LoadTestError` for the chosen fraction of tasks. Bytes moved are
counted on both ends: what this driver sent and got back, and - when the
broker reports it - the broker's payload bytes by path (inline pickle
stream, shared memory, ZeroMQ frames) during the run.

With no address, an embedded local cluster (``distfork.init(workers=...)``)
is started for the run and stopped after it. ``warmup`` tasks run first, out
of the measure: a worker's first task imports this module.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import DistforkError

__all__ = ["LoadSpec", "LoadTestError", "Report", "figure", "plot_report", "run", "work"]

log = logging.getLogger(__name__)

_TIMELINE_MIN_BIN_S = 0.01


class LoadTestError(DistforkError):
    """The failure a load test injects on purpose (``fail_fraction``)."""


def work(payload: Any, task_s: float, result_bytes: int, fail: bool) -> tuple[str, int, Any]:
    """The load test's task: sleep ``task_s``, then return (host, pid, ``result_bytes`` bytes) or raise."""
    if task_s > 0:
        time.sleep(task_s)
    if fail:
        raise LoadTestError(f"injected failure ({len(payload) if payload is not None else 0}-byte payload)")
    return socket.gethostname(), os.getpid(), np.zeros(result_bytes, np.uint8) if result_bytes else None


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    """What to run: ``tasks`` forks, or as many as fit in ``duration_s`` (then the rest finish)."""

    tasks: int | None = 1000
    duration_s: float | None = None
    concurrency: int = 64
    payload_bytes: int = 0
    result_bytes: int = 0
    task_s: float = 0.0
    fail_fraction: float = 0.0
    #: Tasks run and waited for before the measured run (workers import the task's module on the first one).
    warmup: int = 0
    #: Longest wait for the unfinished tasks once forking stopped.
    drain_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.tasks is None and self.duration_s is None:
            raise ValueError("give a number of tasks or a duration")
        if self.tasks is not None and self.tasks < 1:
            raise ValueError(f"tasks={self.tasks}: give at least 1")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s={self.duration_s}: give a positive number of seconds")
        if self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency}: give at least 1")
        if self.payload_bytes < 0 or self.result_bytes < 0 or self.task_s < 0:
            raise ValueError("payload_bytes, result_bytes and task_s cannot be negative")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup}: give 0 or more")
        if not 0.0 <= self.fail_fraction <= 1.0:
            raise ValueError(f"fail_fraction={self.fail_fraction}: give a number from 0 to 1")

    def fails(self, i: int) -> bool:
        """Whether task ``i`` (from 0) is one of the injected failures: exactly floor(n * fraction) of n tasks."""
        f = self.fail_fraction
        return math.floor((i + 1) * f) > math.floor(i * f)


@dataclasses.dataclass
class Report:
    """The outcome of a run; :meth:`to_json` for machines."""

    address: str
    workers: int  # worker processes registered when the run started
    spec: LoadSpec
    submitted: int
    finished: int
    succeeded: int
    failures: dict[str, int]
    elapsed_s: float  # first fork to last completion
    latencies_s: list[float]
    finish_times_s: list[float]  # completion times, from the first fork
    sent_bytes: int
    received_bytes: int
    by_worker: dict[str, int]
    broker_bytes: dict[str, dict[str, int]] | None  # the broker's payload bytes by direction and path

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def tasks_per_s(self) -> float:
        return self.finished / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentiles(self) -> dict[str, float]:
        if not self.latencies_s:
            return {}
        lat = np.asarray(self.latencies_s)
        p50, p90, p99 = np.percentile(lat, [50, 90, 99])
        return {"min": float(lat.min()), "mean": float(lat.mean()), "p50": float(p50), "p90": float(p90),
                "p99": float(p99), "max": float(lat.max())}

    def timeline_bin_s(self) -> float:
        """The timeline's bin: about 40 over the run, 1, 2 or 5 times a power of ten, 10 ms at least."""
        raw = max(self.elapsed_s / 40, _TIMELINE_MIN_BIN_S)
        power = 10 ** math.floor(math.log10(raw))
        return float(next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9)))

    def timeline(self, bin_s: float | None = None) -> list[float]:
        """Tasks finished per second in consecutive ``bin_s`` bins (default :meth:`timeline_bin_s`).

        The last bin is as long as the run lasted. One shorter than half a
        bin is merged into the one before: a few tasks that finished just
        past a bin's edge, divided by a sliver of time, would draw a spike
        the run never had.
        """
        if not self.finish_times_s:
            return []
        bin_s = bin_s or self.timeline_bin_s()
        counts = np.bincount((np.asarray(self.finish_times_s) / bin_s).astype(int))
        if len(counts) > 1 and self.elapsed_s - (len(counts) - 1) * bin_s < bin_s / 2:
            counts[-2] += counts[-1]
            counts = counts[:-1]
        widths = np.full(len(counts), bin_s)
        widths[-1] = max(self.elapsed_s - (len(counts) - 1) * bin_s, 1e-3)
        return [float(c / w) for c, w in zip(counts, widths, strict=True)]

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "workers": self.workers,
            "spec": dataclasses.asdict(self.spec),
            "submitted": self.submitted,
            "finished": self.finished,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "failures": dict(self.failures),
            "elapsed_s": round(self.elapsed_s, 6),
            "tasks_per_s": round(self.tasks_per_s, 3),
            "latency_s": self.percentiles(),
            "bytes": {"sent": self.sent_bytes, "received": self.received_bytes, "broker": self.broker_bytes},
            "by_worker": dict(self.by_worker),
            "throughput_per_s": {"bin_s": self.timeline_bin_s(), "values": self.timeline()},
        }


class _Tally:
    """Outcomes noted by done callbacks (the driver's callback thread)."""

    def __init__(self, concurrency: int) -> None:
        self.room = threading.BoundedSemaphore(concurrency)
        self.lock = threading.Lock()
        self.all_done = threading.Condition(self.lock)
        self.finished = 0
        self.succeeded = 0
        self.received = 0
        self.latencies: list[float] = []
        self.finish_times: list[float] = []
        self.failures: collections.Counter[str] = collections.Counter()
        self.by_worker: collections.Counter[str] = collections.Counter()
        self.pending: set[Any] = set()  # unfinished futures (finished ones are let go with their results)

    def done(self, fut: Any, started: float) -> None:
        now = time.perf_counter()
        try:
            exc = fut.exception()
        except BaseException as e:  # noqa: BLE001 - cancelled
            exc = e
        with self.lock:
            self.pending.discard(fut)
            self.latencies.append(now - started)
            self.finish_times.append(now)
            self.finished += 1
            if exc is None:
                host, pid, out = fut.result()
                self.succeeded += 1
                self.by_worker[f"{host}/{pid}"] += 1
                self.received += out.nbytes if out is not None else 0
            else:
                self.failures[type(exc).__name__] += 1
            self.all_done.notify_all()
        self.room.release()


def _broker_bytes(address: str) -> dict[str, dict[str, int]] | None:
    from .status import query_status

    try:
        metrics = query_status(address, timeout_s=5.0).get("metrics")
    except (TimeoutError, OSError):
        return None
    return metrics.get("payload_bytes") if isinstance(metrics, dict) else None


def _wait_for_workers(address: str, n: int, timeout_s: float) -> int:
    from .status import query_status

    deadline = time.monotonic() + timeout_s
    while True:
        workers = query_status(address, timeout_s=max(0.5, deadline - time.monotonic()))["workers"]
        count = len({(w.get("host"), w.get("pid")) for w in workers})
        if count >= n:
            return count
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} of {n} worker processes registered at {address} within {timeout_s:g} s")
        time.sleep(0.05)


def run(
    spec: LoadSpec,
    address: str | None = None,
    workers: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    wait_workers_s: float = 60.0,
) -> Report:
    """Run the load test against ``address`` (or an embedded cluster of ``workers``) and report.

    ``progress(finished, submitted, elapsed_s)`` is called from this thread
    about ten times a second. Initializes distfork for the run and shuts it
    down after, so the process must not have a runtime already.
    """
    import distfork

    distfork.init(address, workers=workers)
    try:
        rt = distfork.api._runtime
        assert rt is not None and rt.address is not None
        where = rt.address
        registered = _wait_for_workers(where, workers or (rt.cluster.n_workers if rt.cluster else 1), wait_workers_s)
        if spec.warmup:
            payload = np.ones(spec.payload_bytes, np.uint8) if spec.payload_bytes else None
            warm = [distfork.fork(work, payload, spec.task_s, spec.result_bytes, False) for _ in range(spec.warmup)]
            distfork.wait_all(warm, timeout=spec.drain_timeout_s)
            del warm
        before = _broker_bytes(where)
        report = _drive(spec, where, registered, progress)
        after = _broker_bytes(where)
        if before is not None and after is not None:
            report.broker_bytes = {
                d: {p: after[d][p] - before.get(d, {}).get(p, 0) for p in after[d]} for d in after
            }
        return report
    finally:
        distfork.shutdown()


def _drive(spec: LoadSpec, address: str, registered: int, progress: Callable[[int, int, float], None] | None) -> Report:
    import distfork

    payload = np.ones(spec.payload_bytes, np.uint8) if spec.payload_bytes else None
    tally = _Tally(spec.concurrency)
    start = time.perf_counter()
    deadline = start + spec.duration_s if spec.duration_s is not None else math.inf
    next_report = start
    submitted = 0
    while (spec.tasks is None or submitted < spec.tasks) and time.perf_counter() < deadline:
        if progress is not None and time.perf_counter() >= next_report:
            progress(tally.finished, submitted, time.perf_counter() - start)
            next_report = time.perf_counter() + 0.1
        if not tally.room.acquire(timeout=0.1):
            continue
        t0 = time.perf_counter()
        fut = distfork.fork(work, payload, spec.task_s, spec.result_bytes, spec.fails(submitted))
        with tally.lock:
            tally.pending.add(fut)
        fut.add_done_callback(functools.partial(tally.done, started=t0))
        submitted += 1
    drain_until = time.perf_counter() + spec.drain_timeout_s
    while tally.finished < submitted and time.perf_counter() < drain_until:
        with tally.lock:
            tally.all_done.wait(0.1)
        if progress is not None and time.perf_counter() >= next_report:
            progress(tally.finished, submitted, time.perf_counter() - start)
            next_report = time.perf_counter() + 0.1
    with tally.lock:
        unfinished = list(tally.pending)
    for f in unfinished:
        f.cancel()  # its callback notes it as CancelledError
    with tally.lock:
        tally.all_done.wait_for(lambda: tally.finished >= submitted, timeout=10.0)
        if progress is not None:
            progress(tally.finished, submitted, time.perf_counter() - start)
        end = max(tally.finish_times, default=start)
        failures = dict(tally.failures)
        if unfinished:
            failures["unfinished"] = failures.pop("CancelledError", 0)
        return Report(
            address=address,
            workers=registered,
            spec=spec,
            submitted=submitted,
            finished=tally.finished,
            succeeded=tally.succeeded,
            failures=failures,
            elapsed_s=end - start,
            latencies_s=list(tally.latencies),
            finish_times_s=[t - start for t in tally.finish_times],
            sent_bytes=submitted * spec.payload_bytes,
            received_bytes=tally.received,
            by_worker=dict(tally.by_worker),
            broker_bytes=None,
        )


def plot_report(report: Report, path: str) -> None:
    """Draw the latency histogram and the throughput over time into ``path`` (PNG); needs matplotlib."""
    import matplotlib.pyplot as plt

    fig = figure(report)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure(report: Report) -> Any:
    """The loadtest's matplotlib figure: latency histogram (left), throughput over time (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    lat_ms = np.asarray(report.latencies_s) * 1000
    if lat_ms.size:
        low, high = max(lat_ms.min(), 1e-3), max(lat_ms.max(), 2e-3)
        bins = np.geomspace(low, high * 1.0001, 50) if high / low > 20 else 50
        left.hist(lat_ms, bins=bins, color="tab:blue")
        if not isinstance(bins, int):
            left.set_xscale("log")
            # Labels at 1, 2 and 5 per decade over few decades, at the powers of ten over many, in plain
            # numbers: matplotlib's default labels minor ticks too, which run into one unreadable row.
            decades = math.log10(high / low)
            left.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades < 3 else (1.0,)))
            left.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            left.xaxis.set_minor_formatter(NullFormatter())
        pct = report.percentiles()
        for name, style in (("p50", "-"), ("p99", "--")):
            left.axvline(pct[name] * 1000, color="black", linestyle=style, label=f"{name} {pct[name] * 1000:.2f} ms")
        left.legend()
    left.set_xlabel("latency (ms)")
    left.set_ylabel("tasks")
    left.set_title(f"latency of {report.finished} tasks")
    rates = report.timeline()
    if rates:
        starts = np.arange(len(rates)) * report.timeline_bin_s()
        edges = np.append(starts, max(report.elapsed_s, starts[-1]))
        right.stairs(rates, edges, color="tab:green")
    right.set_ylim(bottom=0)
    right.set_xlabel("time since start (s)")
    right.set_ylabel("tasks/s")
    right.set_title(f"throughput (mean {report.tasks_per_s:.0f} tasks/s)")
    fig.suptitle(f"distfork loadtest: {report.address}, {report.workers} workers, "
                 f"concurrency {report.spec.concurrency}")
    fig.tight_layout()
    return fig
