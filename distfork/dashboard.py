"""The live dashboard on the broker's metrics port: ``/`` (a page) and ``/dashboard.json`` (what it polls).

::

    broker thread                                   HTTP thread (the metrics server's)
    ┌────────────────────────────────┐  one dict   ┌──────────────────────────────────┐
    │ every heartbeat_s (_tick):      │  swapped    │ GET /               the page     │
    │   Dashboard.publish(state, now) │ ──────────▶ │ GET /dashboard.json  latest dict │
    │   builds a JSON-able snapshot   │  (atomic)   │ GET /metrics        Prometheus   │
    └────────────────────────────────┘             └──────────────────────────────────┘

The snapshot is built on the broker's thread, which owns the state, and
handed over by replacing one reference; the HTTP thread never reads the
task table. It shows workers (slots, the tasks they run now and for how
long, their resources free/total and labels, their Slurm job), queue
depth, tasks per second over the last minutes, each driver's tasks in
flight and held values, and recent failures — never a task's
arguments or values: the broker cannot read them (it never unpickles) and
the page would not show them if it could. The page is one static file with
its own script, no CDN; it binds where the metrics bind (loopback unless
``--metrics-host`` says otherwise), so it is as private as ``/metrics``.
"""

from __future__ import annotations

import collections
import itertools
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

if TYPE_CHECKING:
    from .broker_state import BrokerState

__all__ = ["Dashboard", "serve"]

_HISTORY_S = 600.0  # tasks/s history kept for the page
_PAGE = Path(__file__).with_name("static") / "dashboard.html"
_RUNNING_SHOWN = 4  # tasks listed per worker row

StartResponse = Callable[..., Any]
App = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class Dashboard:
    """The latest snapshot (written by the broker thread, read by the HTTP thread)."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {"ready": False}
        self._history: collections.deque[tuple[float, int]] = collections.deque()

    def publish(self, state: BrokerState, now: float) -> None:
        """Build the page's data from the broker's state (call on the broker's thread)."""
        wall = time.time()
        status = state.status(now)
        counters = status["counters"]
        finished = int(counters.get("tasks_succeeded", 0)) + int(counters.get("tasks_failed", 0))
        self._history.append((wall, finished))
        while self._history and self._history[0][0] < wall - _HISTORY_S:
            self._history.popleft()
        drivers = {p.id: p.info.get("name") for p in state.peers.values() if p.role == "driver"}
        workers = []
        for w, row in zip(state.workers.values(), status["workers"], strict=True):
            running = [
                {"task": t.task_id, "driver": drivers.get(t.driver),
                 "running_s": round(max(0.0, now - t.dispatched), 3)}
                for t in itertools.islice(w.assigned.values(), min(w.slots, _RUNNING_SHOWN))
            ]
            workers.append({k: row[k] for k in ("name", "host", "pid", "slots", "busy", "assigned", "done", "failed",
                                                "rss_bytes", "last_seen_s")}
                           | {"running": running, "resources": _resources(row.get("resources")),
                              "slurm_job": row.get("slurm_job")})
        self.snapshot = {
            "ready": True,
            "time": wall,
            "uptime_s": status["uptime_s"],
            "queued": status["queued"],
            "running": status["running"],
            "prefetched": status["prefetched"],
            "finished": finished,
            "succeeded": int(counters.get("tasks_succeeded", 0)),
            "failed": int(counters.get("tasks_failed", 0)),
            "workers": workers,
            "drivers": [{k: d[k] for k in ("name", "host", "pid", "unfinished", "queued", "running", "waiting",
                                           "prefetched", "held", "done", "failed")} for d in status["drivers"]],
            "history": list(self._history),
            "failures": list(state.recent_failures),
        }

    def wsgi(self, fallback: App) -> App:
        """The page and its JSON; everything else (``/metrics``) goes to ``fallback``."""

        def app(environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "/")
            if path in ("/", "/dashboard"):
                return _reply(start, "text/html; charset=utf-8", _PAGE.read_bytes())
            if path == "/dashboard.json":
                body = json.dumps(self.snapshot, separators=(",", ":")).encode()
                return _reply(start, "application/json", body)
            return fallback(environ, start)

        return app


def _resources(entry: Any) -> dict[str, Any] | None:
    """A worker process's resources for the page: ``{"total", "free", "labels"}`` (slots shown apart), or None."""
    if not isinstance(entry, dict) or not isinstance(entry.get("total"), dict):
        return None
    total = {k: v for k, v in sorted(entry["total"].items()) if k != "slots"}
    free = entry.get("free") or {}
    return {"total": total, "free": {k: free.get(k, v) for k, v in total.items()},
            "labels": dict(sorted((entry.get("labels") or {}).items()))}


def _reply(start: StartResponse, kind: str, body: bytes) -> list[bytes]:
    start("200 OK", [("Content-Type", kind), ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
                     ("X-Content-Type-Options", "nosniff")])
    return [body]


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


def serve(host: str, port: int, app: App) -> tuple[WSGIServer, threading.Thread]:
    """A threaded HTTP server for ``app`` on ``host:port`` (IPv4 or IPv6), served from a daemon thread."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    class Server(_Server):
        address_family = family

    server = make_server(host, port, app, Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="distfork-metrics-http", daemon=True)
    thread.start()
    return server, thread
