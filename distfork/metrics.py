"""The broker's numbers: cheap counters on its thread, Prometheus text on another.

::

    broker thread (owns the socket)             prometheus_client HTTP thread
    ┌──────────────────────────────────┐        ┌────────────────────────────────┐
    │ per SUBMIT / RESULTS message:     │        │ GET /metrics                    │
    │   BrokerMetrics.tasks_in(...)     │ plain  │   _Collector.collect():         │
    │   BrokerMetrics.results_in(...)   │ ints & │   reads the ints and lists, and │
    │ per TASKS message:                │ lists  │   BrokerState's counters and    │
    │   BrokerMetrics.started += n      │ ─────▶ │   sizes, builds metric families │
    └──────────────────────────────────┘        └────────────────────────────────┘

The broker never calls into prometheus_client on its hot path: it adds to
plain Python integers once per message (and one bucket increment per result
for the latency histograms). A scrape copies them; a copy of a list or dict
is atomic under the GIL, so the scrape thread takes no lock the broker
waits on. The HTTP server is prometheus_client's own thread; it never
touches the ZeroMQ socket.

What is counted where:

* tasks submitted, succeeded, failed (by reason), retried, cancelled, and
  dropped messages: :class:`~distfork.broker_state.BrokerState` ``counters``;
* tasks started: tasks handed to workers (a task re-queued after a lost
  worker or taken back from a stalled one counts again);
* latency: from the SUBMIT that brought a task to the RESULTS that brought
  its outcome, measured by the broker; run time: the worker's own measure;
* payload bytes by path, for task arguments as they arrive from drivers and
  results as they arrive from workers: ``inline`` is the pickle stream,
  ``frames`` the out-of-band buffers sent as ZeroMQ frames, ``shm`` the
  out-of-band buffers that went through a shared-memory segment (their
  lengths are read from the segment's small JSON manifest; the broker
  never unpickles anything).
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from . import resources
from .errors import ProtocolError
from .protocol import Entry, Flag, ResultEntry, Status, TaskEntry, decode_manifest

_INF = float("inf")

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .broker_state import BrokerState, PeerInfo

__all__ = ["DIRECTIONS", "LATENCY_BUCKETS_S", "PATHS", "BrokerMetrics", "MetricsServer", "classify"]

log = logging.getLogger(__name__)

#: Upper bounds of the latency and run-time histogram buckets, in seconds.
LATENCY_BUCKETS_S = (
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0,
    float("inf"),
)
#: How a payload travelled.
PATHS = ("inline", "shm", "frames")
#: Which payloads: task arguments (driver to worker) or results (worker to driver).
DIRECTIONS = ("task", "result")
_INLINE, _SHM, _FRAMES = range(3)
_MANIFEST_MAX_BYTES = 64 * 1024  # a larger "manifest" is not one of ours: counted, not parsed
# reason label -> BrokerState counter (kept there by the task's Status)
_FAILURE_REASONS = {s.name.lower(): f"tasks_failed_{s.name.lower()}" for s in Status if s != Status.OK}


def _shm_bytes(manifest: Any) -> int:
    """Bytes of the buffers a shared-memory manifest frame describes (0 if it is not one)."""
    if len(manifest) > _MANIFEST_MAX_BYTES:
        return 0
    try:
        return sum(int(n) for _, n in decode_manifest(manifest).bufs)
    except (ProtocolError, ValueError, TypeError):
        return 0


def classify(entries: Sequence[Entry]) -> tuple[list[int], list[int]]:
    """Payload bytes and transfers per path (indexed as :data:`PATHS`) of a batch.

    The frame layout (see serialize.py) tells the path without unpickling:
    ``[stream]`` inline, ``[stream, manifest]`` shared memory,
    ``[stream, manifest, buf, ...]`` frames. The stream's bytes count as
    inline in every case.
    """
    stream_bytes = inline = shm = shm_bytes = frames_n = frames_bytes = 0
    for e in entries:
        frames = e[3]  # Entry.frames: indexing is the cheapest way into a NamedTuple
        if e[4] & Flag.DEPS:  # Entry.flags: a task naming futures; its first frame lists them
            frames = frames[1:]
        n = len(frames)
        if n == 1:
            inline += 1
            stream_bytes += len(frames[0])
        elif n == 2:
            shm += 1
            stream_bytes += len(frames[0])
            shm_bytes += _shm_bytes(frames[1])
        elif n:
            frames_n += 1
            stream_bytes += len(frames[0])
            frames_bytes += sum(map(len, frames[2:]))
    return [stream_bytes, shm_bytes, frames_bytes], [inline, shm, frames_n]


class BrokerMetrics:
    """What the broker counts beyond its task table; updated only by the broker thread."""

    def __init__(self, state: BrokerState) -> None:
        self.state = state
        #: Tasks handed to workers.
        self.started = 0
        # [direction][path]
        self.bytes = [[0, 0, 0], [0, 0, 0]]
        self.transfers = [[0, 0, 0], [0, 0, 0]]
        n = len(LATENCY_BUCKETS_S)
        self.latency_buckets = [0] * n  # not cumulative
        self.latency_sum_s = 0.0
        self.run_buckets = [0] * n
        self.run_sum_s = 0.0

    def tasks_in(self, entries: Sequence[TaskEntry]) -> None:
        """A SUBMIT batch arrived."""
        self._add(0, entries)

    def results_in(self, worker: PeerInfo, entries: Sequence[ResultEntry], now: float) -> None:
        """A RESULTS batch arrived from ``worker`` (call before the state pops its tasks)."""
        self._add(1, entries)
        assigned = worker.assigned
        bounds, lat, run = LATENCY_BUCKETS_S, self.latency_buckets, self.run_buckets
        where = bisect.bisect_left
        lat_sum = run_sum = 0.0
        for e in entries:
            key, run_s = e[0], e[2]  # ResultEntry.id, ResultEntry.run_s
            if not 0.0 <= run_s < _INF:  # a NaN from a broken peer would poison the sum for good
                continue
            run[where(bounds, run_s)] += 1
            run_sum += run_s
            task = assigned.get(key)
            if task is not None:
                latency_s = now - task.submitted
                lat[where(bounds, latency_s)] += 1
                lat_sum += latency_s
        self.latency_sum_s += lat_sum
        self.run_sum_s += run_sum

    def _add(self, direction: int, entries: Sequence[Entry]) -> None:
        nbytes, transfers = classify(entries)
        b, t = self.bytes[direction], self.transfers[direction]
        for i in range(3):
            b[i] += nbytes[i]
            t[i] += transfers[i]

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able summary, added to ``distfork status --json`` under ``"metrics"``."""
        return {
            "tasks_started": self.started,
            "payload_bytes": {d: dict(zip(PATHS, list(self.bytes[i]), strict=True)) for i, d in enumerate(DIRECTIONS)},
            "payload_transfers": {
                d: dict(zip(PATHS, list(self.transfers[i]), strict=True)) for i, d in enumerate(DIRECTIONS)
            },
            "latency": {"count": sum(self.latency_buckets), "sum_s": round(self.latency_sum_s, 6)},
        }

    def serve(self, port: int, host: str = "127.0.0.1") -> MetricsServer:
        """Serve ``/metrics`` on ``host:port`` from a thread of prometheus_client (port 0: any free port)."""
        return MetricsServer(self, host, port)


class _Collector:
    """Builds the metric families from the broker's numbers at scrape time."""

    def __init__(self, metrics: BrokerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        m = self.metrics
        state = m.state
        counters = dict(state.counters)
        workers = list(state.workers.values())
        peers = list(state.peers.values())

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"distfork_{name}", doc, value=value)

        yield counter("tasks_submitted", "Tasks received from drivers.", counters.get("tasks_submitted", 0))
        yield counter("tasks_started", "Tasks handed to workers (again after a lost worker or a steal).", m.started)
        yield counter("tasks_succeeded", "Tasks whose function returned.", counters.get("tasks_succeeded", 0))
        failed = CounterMetricFamily("distfork_tasks_failed", "Tasks that failed, by reason.", labels=["reason"])
        for reason, key in _FAILURE_REASONS.items():
            failed.add_metric([reason], counters.get(key, 0))
        yield failed
        yield counter("tasks_retried", "Tasks re-queued after the worker running them was lost.",
                      counters.get("tasks_retried", 0))
        yield counter("tasks_cancelled", "Tasks cancelled by their driver.", counters.get("tasks_cancelled", 0))
        yield counter("tasks_stolen", "Prefetched tasks taken back from a stalled worker.",
                      counters.get("tasks_stolen", 0))
        yield counter("messages_dropped", "Malformed or unexpected messages dropped.",
                      counters.get("messages_dropped", 0))

        queued = (len(state.queue) + len(state.resource_queue) + sum(len(q) for q in list(state.pinned.values()))
                  - state.stale_queued)
        yield GaugeMetricFamily("distfork_queue_depth", "Tasks waiting for a worker.", value=queued)
        drivers = [p for p in list(state.peers.values()) if p.role == "driver"]
        yield GaugeMetricFamily("distfork_values_held", "Results kept for the tasks that take them as arguments.",
                                value=sum(len(d.holds) for d in drivers))
        yield counter("results_held", "Results kept in the broker because tasks took them as arguments.",
                      counters.get("results_held", 0))
        yield GaugeMetricFamily("distfork_tasks_running", "Tasks held by workers (running or prefetched).",
                                value=sum(len(w.assigned) for w in workers))
        processes = {(w.info.get("host"), w.info.get("pid")) for w in workers}
        yield GaugeMetricFamily("distfork_workers_alive", "Worker processes registered.", value=len(processes))
        yield GaugeMetricFamily("distfork_worker_slots", "Task slots of the registered workers.",
                                value=sum(w.slots for w in workers))
        rss = {(w.info.get("host"), w.info.get("pid")): w.rss_bytes or 0 for w in workers}
        yield GaugeMetricFamily("distfork_workers_rss_bytes", "Resident memory of the worker processes.",
                                value=sum(rss.values()))
        yield GaugeMetricFamily("distfork_drivers_connected", "Drivers registered.",
                                value=sum(1 for p in peers if p.role == "driver"))
        amounts = GaugeMetricFamily("distfork_worker_resources",
                                    "What each worker process has (state=total) and its running tasks hold (held).",
                                    labels=["worker", "host", "resource", "state"])
        for proc in resources.processes(workers):
            host = str(proc.slots[0].info.get("host"))
            for name, total in sorted(proc.total.items()):
                amounts.add_metric([proc.name, host, name, "total"], total)
                amounts.add_metric([proc.name, host, name, "held"], proc.held.get(name, 0.0))
        yield amounts

        for name, doc, buckets, total in (
            ("task_latency_seconds", "From the task's arrival at the broker to its result's.",
             list(m.latency_buckets), m.latency_sum_s),
            ("task_run_seconds", "The task's run time on its worker.", list(m.run_buckets), m.run_sum_s),
        ):
            cumulative, pairs = 0, []
            for bound, count in zip(LATENCY_BUCKETS_S, buckets, strict=True):
                cumulative += count
                pairs.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            yield HistogramMetricFamily(f"distfork_{name}", doc, buckets=pairs, sum_value=total)

        nbytes = CounterMetricFamily("distfork_payload_bytes", "Payload bytes by direction and path.",
                                     labels=["direction", "path"])
        transfers = CounterMetricFamily("distfork_payload_transfers", "Payloads by direction and path.",
                                        labels=["direction", "path"])
        for i, direction in enumerate(DIRECTIONS):
            for j, path in enumerate(PATHS):
                nbytes.add_metric([direction, path], m.bytes[i][j])
                transfers.add_metric([direction, path], m.transfers[i][j])
        yield nbytes
        yield transfers


class MetricsServer:
    """An HTTP server on its own thread: one broker's metrics (prometheus_client's WSGI app) and its
    live dashboard (distfork/dashboard.py)."""

    def __init__(self, metrics: BrokerMetrics, host: str, port: int) -> None:
        from prometheus_client import CollectorRegistry, make_wsgi_app

        from .dashboard import Dashboard, serve

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(metrics))
        # The same port serves the live dashboard (distfork/dashboard.py): "/" and "/dashboard.json".
        self.dashboard = Dashboard()
        server: WSGIServer
        thread: threading.Thread
        try:
            server, thread = serve(host, port, self.dashboard.wsgi(make_wsgi_app(self.registry)))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self._server, self._thread = server, thread
        self.host = host
        self.port = int(server.server_address[1])
        log.info("metrics at http://%s:%d/metrics", host, self.port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)
