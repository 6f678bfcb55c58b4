"""The ``distfork`` command: ``broker``, ``worker``, ``up``, ``status``.

A cluster has one address, ``tcp://HOST:PORT`` (default port 7340), that
drivers and workers alike connect to::

    distfork broker --bind tcp://127.0.0.1:7340
    distfork worker --connect tcp://127.0.0.1:7340 --slots 1
    distfork up --workers 4            # both, in the foreground, until Ctrl-C
    distfork status --address tcp://127.0.0.1:7340
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import urllib.parse
from typing import Any

import click

from . import config as _config
from .config import DEFAULT_ADDRESS

__all__ = ["main"]

log = logging.getLogger("distfork")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s distfork[{os.getpid()}] %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _is_loopback(address: str) -> bool:
    """True if a ZeroMQ address only listens on this machine."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = urllib.parse.urlsplit(f"//{rest}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def _check_bind(address: str, insecure: bool) -> None:
    if _is_loopback(address):
        return
    if not insecure:
        raise click.UsageError(
            f"refusing to bind {address}: it is reachable from other machines, and whoever can reach "
            "a distfork broker can run any code on its workers. Bind a loopback address "
            f"(the default, {DEFAULT_ADDRESS}), or pass --insecure if this network is trusted."
        )
    log.warning(
        "INSECURE: broker bound to %s without authentication; anyone who can reach it can run code on the workers",
        address,
    )


@click.group()
@click.option("--log-level", default=lambda: os.environ.get("DISTFORK_LOG_LEVEL", "WARNING"), show_default="WARNING",
              help="Logging level (also DISTFORK_LOG_LEVEL).")
def cli(log_level: str) -> None:
    """distfork: torch.jit.fork / wait for a cluster of processes."""
    _setup_logging(log_level)


@cli.command()
@click.option("--bind", default=DEFAULT_ADDRESS, show_default=True, help="Address drivers and workers connect to.")
@click.option("--insecure", is_flag=True, help="Allow binding a non-loopback address without keys.")
@click.option("--parent-pid", type=int, default=None, hidden=True, help="Stop when this process is gone.")
@click.option("--session", default=None, hidden=True, help="Session id (shared-memory name prefix); random by default.")
def broker(bind: str, insecure: bool, parent_pid: int | None, session: str | None) -> None:
    """Run a broker: the task table that drivers and workers connect to."""
    from .broker import Broker

    _check_bind(bind, insecure)
    b = Broker(bind, _config.load(), parent_pid=parent_pid, session=session)
    b.install_signal_handlers()
    b.serve_forever()


@cli.command()
@click.option("--connect", "address", default=lambda: os.environ.get("DISTFORK_ADDRESS", DEFAULT_ADDRESS),
              show_default=DEFAULT_ADDRESS, help="The broker's address (also DISTFORK_ADDRESS).")
@click.option("--slots", type=click.IntRange(min=1), default=None, help="Tasks run at once (threads); default 1.")
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes to keep running.")
@click.option("--name", default=None, help="Name shown in status (default host-pid).")
@click.option("--nanny/--no-nanny", default=True, show_default=True,
              help="Run the worker as a child that is replaced when it dies (a crash, or a cancelled task).")
@click.option("--parent-pid", type=int, default=None, hidden=True, help="Stop when this process is gone.")
def worker(address: str, slots: int | None, processes: int, name: str | None, nanny: bool,
           parent_pid: int | None) -> None:
    """Run a worker that takes tasks from the broker at --connect."""
    cfg = _config.load()
    if nanny:
        from .cluster import Supervisor

        _run_until_signal(Supervisor(cfg, address, processes, slots))
        return
    from .worker import Worker

    w = Worker(address, cfg, slots=slots or cfg.slots, name=name, parent_pid=parent_pid)
    w.install_signal_handlers()
    w.serve_forever()


def _run_until_signal(sup: Any, banner: str | None = None) -> None:
    """Start a supervisor, run until SIGTERM/SIGINT, stop it."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        sup.start()
        if banner:
            click.echo(banner, err=True)
            click.echo(sup.address)
            sys.stdout.flush()
        stop.wait()
    finally:
        sup.stop()


@cli.command()
@click.option("--bind", default=DEFAULT_ADDRESS, show_default=True, help="The cluster's address.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Worker processes (default: one per core).")
@click.option("--slots", type=click.IntRange(min=1), default=None, help="Slots per worker.")
@click.option("--insecure", is_flag=True, help="Allow binding a non-loopback address without keys.")
def up(bind: str, workers: int | None, slots: int | None, insecure: bool) -> None:
    """Run a broker and workers in the foreground until Ctrl-C or SIGTERM."""
    from .cluster import LocalCluster

    _check_bind(bind, insecure)
    cluster = LocalCluster(_config.load(), workers=workers, address=bind, slots=slots)
    _run_until_signal(cluster, banner=(
        f"distfork cluster up at {bind} with {cluster.n_workers} workers\n"
        f"connect with: DISTFORK_ADDRESS={bind}  (or distfork.init({bind!r}))"
    ))


@cli.command()
@click.option("--address", default=lambda: os.environ.get("DISTFORK_ADDRESS", DEFAULT_ADDRESS),
              show_default=DEFAULT_ADDRESS, help="The broker's address.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--timeout", "timeout_s", type=float, default=5.0, show_default=True, help="Seconds to wait.")
def status(address: str, as_json: bool, timeout_s: float) -> None:
    """Print the broker's workers, drivers and queue."""
    from .status import query_status

    try:
        snap = query_status(address, timeout_s)
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(snap, indent=2))
        return
    click.echo(f"broker at {address}: up {snap['uptime_s']:.0f} s, {snap['queued']} queued, {snap['running']} assigned")
    click.echo(f"{'worker':<28} {'host':<16} {'pid':>7} {'slots':>5} {'busy':>4} {'done':>8} {'failed':>6} {'seen':>6}")
    for w in snap["workers"]:
        click.echo(
            f"{str(w['name'])[:28]:<28} {str(w['host'])[:16]:<16} {w['pid']:>7} {w['slots']:>5} {w['busy']:>4} "
            f"{w['done']:>8} {w['failed']:>6} {w['last_seen_s']:>5.1f}s"
        )
    for d in snap["drivers"]:
        click.echo(f"driver {d['name']}: {d['unfinished']} unfinished, {d['done']} done")


def main() -> None:
    cli(prog_name="distfork")
