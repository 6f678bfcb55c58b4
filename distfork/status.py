"""Ask a broker for its status (``distfork status``, readiness checks, tests)."""

from __future__ import annotations

import os
import time
from typing import Any

import zmq

from . import protocol, security
from .config import Config, load
from .errors import AuthenticationError, ProtocolError
from .protocol import Msg

__all__ = ["format_bytes", "query_status", "render_status"]


def query_status(address: str, timeout_s: float = 5.0, config: Config | None = None) -> dict[str, Any]:
    """The broker's status snapshot (keys from ``config``, default this process's).

    Raises builtin ``TimeoutError`` if no broker answers in time, and
    :class:`~distfork.errors.AuthenticationError` if it refuses our key.
    """
    ctx: zmq.Context[zmq.Socket[Any]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"S" + os.urandom(8))
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    keys = security.client_keys(config or load(), address)
    monitor = security.watch_handshake(sock) if security.secure_client(sock, keys) else None
    if monitor is not None:
        poller.register(monitor, zmq.POLLIN)
    deadline = time.monotonic() + timeout_s
    try:
        sock.connect(address)
        sock.send_multipart(protocol.encode_signal(Msg.STATUS))
        while (left_s := deadline - time.monotonic()) > 0:
            events = dict(poller.poll(int(left_s * 1000)))
            if monitor is not None and monitor in events:
                text = security.failure_text(monitor, address)
                if text is not None:
                    raise AuthenticationError(text)
            if sock in events:
                kind, body = protocol.decode(sock.recv_multipart())
                if kind is Msg.STATUS_REPLY:
                    return protocol.decode_json(body)
                if kind is Msg.REJECT:
                    raise ProtocolError(f"the broker at {address} refused the status query")
        raise TimeoutError(
            f"no distfork broker answered at {address} within {timeout_s:g} s "
            "(if that broker uses keys, give ours: --keys-dir / DISTFORK_KEYS_DIR)"
        )
    finally:
        if monitor is not None:
            sock.disable_monitor()
            monitor.close(linger=0)
        sock.close(linger=0)


def format_bytes(n: float | None) -> str:
    """``1536`` -> ``1.5 KiB``; None -> ``-``."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_resources(entry: Any) -> str:
    """A worker process's resources as ``gpu 0/1 · cpu 2/2 · zone=a`` (free/total), ``-`` if unknown."""
    if not isinstance(entry, dict) or not isinstance(entry.get("total"), dict):
        return "-"
    free = entry.get("free") or {}
    parts = [f"{name} {free.get(name, total):g}/{total:g}" for name, total in sorted(entry["total"].items())
             if name != "slots"]
    parts += [f"{k}={v}" for k, v in sorted((entry.get("labels") or {}).items())]
    return " · ".join(parts) or "-"


def render_status(snap: dict[str, Any], address: str) -> list[Any]:
    """The status snapshot as rich renderables: a summary line, the workers table, the queues table."""
    from rich.table import Table
    from rich.text import Text

    workers = snap["workers"]
    processes = {(w.get("host"), w.get("pid")) for w in workers}
    summary = Text.assemble(
        ("broker ", "bold"), (address, "bold cyan"),
        f"  up {snap['uptime_s']:.0f} s · {len(processes)} worker processes, {len(workers)} slots · "
        f"{snap['queued']} queued · {snap['running']} running",
    )
    if snap.get("metrics_url"):
        summary.append(f" · metrics {snap['metrics_url']}")

    wt = Table(title="workers", title_justify="left", show_edge=False, pad_edge=False)
    slurm = any(w.get("slurm_job") for w in workers)  # a column only when some worker is a Slurm job
    for name, justify in (("worker", "left"), ("host", "left"), ("pid", "right"), ("slots", "right"),
                          ("busy", "right"), ("done", "right"), ("failed", "right"), ("rss", "right"),
                          ("heartbeat", "right"), ("resources free/total", "left"),
                          *([("slurm job", "left")] if slurm else [])):
        wt.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for w in sorted(workers, key=lambda w: (str(w.get("host")), w.get("pid") or 0, str(w.get("name")))):
        wt.add_row(
            str(w.get("name")), str(w.get("host")), str(w.get("pid")), str(w["slots"]),
            str(w["busy"]), str(w["done"]), Text(str(w["failed"]), style="red" if w["failed"] else ""),
            format_bytes(w.get("rss_bytes")), f"{w['last_seen_s']:.1f} s ago", format_resources(w.get("resources")),
            *([str(w.get("slurm_job") or "-")] if slurm else []),
        )

    qt = Table(title="queues", title_justify="left", show_edge=False, pad_edge=False)
    # waiting: for the futures their arguments name; held: values kept for tasks that take them;
    # received: result bytes sent to the driver.
    for name, justify in (("driver", "left"), ("host", "left"), ("pid", "right"), ("queued", "right"),
                          ("waiting", "right"), ("running", "right"), ("done", "right"), ("failed", "right"),
                          ("held", "right"), ("received", "right")):
        qt.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for d in snap["drivers"]:
        failed = d.get("failed", 0)
        qt.add_row(str(d.get("name")), str(d.get("host")), str(d.get("pid")), str(d.get("queued", "-")),
                   str(d.get("waiting", "-")), str(d.get("running", "-")), str(d["done"] - failed),
                   Text(str(failed), style="red" if failed else ""), str(d.get("held", "-")),
                   format_bytes(d.get("result_bytes")))
    counters = snap.get("counters", {})
    qt.add_section()
    qt.add_row("(all, since start)", "", "", str(snap["queued"]), "", str(snap["running"]),
               str(counters.get("tasks_succeeded", 0)), str(counters.get("tasks_failed", 0)), style="bold")
    return [summary, wt, qt]
