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
from .errors import DistforkError

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


def _host_of(address: str) -> str:
    """The host part of a tcp:// address (``*`` is every interface); loopback for ipc:// and the like."""
    scheme, _, rest = address.partition("://")
    if scheme != "tcp":
        return "127.0.0.1"
    host = rest.rpartition(":")[0].strip("[]")
    return "0.0.0.0" if host in ("*", "") else host


def _check_bind(address: str, insecure: bool) -> None:
    if _is_loopback(address):
        return
    from .security import server_keys

    if server_keys(_config.load()) is not None:
        return  # CURVE: only admitted keys get in
    if not insecure:
        raise click.UsageError(
            f"refusing to bind {address} without keys: it is reachable from other machines, and whoever can "
            "reach a distfork broker can run any code on its workers. Make keys with `distfork keygen DIR` and "
            "pass --keys-dir DIR (or DISTFORK_KEYS_DIR) to the broker, workers and drivers; or bind a loopback "
            f"address (the default, {DEFAULT_ADDRESS}); or pass --insecure if this network is trusted."
        )
    log.warning(
        "INSECURE: broker bound to %s without authentication; anyone who can reach it can run code on the workers",
        address,
    )


def _set_env(name: str) -> Any:
    """A click callback that hands an option to every process we start, through its DISTFORK_* variable."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value:
            os.environ[name] = value
        return value

    return callback


@click.group()
@click.option("--log-level", default=lambda: os.environ.get("DISTFORK_LOG_LEVEL", "WARNING"), show_default="WARNING",
              help="Logging level (also DISTFORK_LOG_LEVEL).")
@click.option("--keys-dir", type=click.Path(file_okay=False), expose_value=False, callback=_set_env("DISTFORK_KEYS_DIR"),
              help="Keys from `distfork keygen DIR` (also DISTFORK_KEYS_DIR): CURVE on every socket.")
@click.option("--curve-secret-file", type=click.Path(dir_okay=False), expose_value=False,
              callback=_set_env("DISTFORK_CURVE_SECRET_FILE"), help="Our own secret key file (overrides --keys-dir).")
@click.option("--curve-server-key", expose_value=False, callback=_set_env("DISTFORK_CURVE_SERVER_KEY"),
              help="The broker's public key file or Z85 text (drivers, workers; overrides --keys-dir).")
@click.option("--curve-allow-dir", type=click.Path(file_okay=False), expose_value=False,
              callback=_set_env("DISTFORK_CURVE_ALLOW_DIR"),
              help="Directory of admitted public keys (broker; overrides --keys-dir).")
def cli(log_level: str) -> None:
    """distfork: torch.jit.fork / wait for a cluster of processes.

    Key options go before the command: distfork --keys-dir keys broker ...
    """
    _setup_logging(log_level)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace keys that exist.")
def keygen(directory: str, force: bool) -> None:
    """Write CURVE key pairs for a broker and its clients, and an allow-list, into DIRECTORY."""
    from .security import keygen as make_keys

    try:
        paths = make_keys(directory, overwrite=force)
    except FileExistsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"broker key pair:  {paths['broker']}  {paths['broker_secret']}")
    click.echo(f"client key pair:  {paths['client']}  {paths['client_secret']}")
    click.echo(f"allow-list:       {os.path.dirname(paths['allowed'])}/ (holds the client's public key)")
    click.echo(f"use: distfork --keys-dir {directory} broker --bind tcp://0.0.0.0:7340   (and the same --keys-dir, "
               f"or DISTFORK_KEYS_DIR={directory}, for workers and drivers)")


@cli.command()
@click.option("--bind", default=DEFAULT_ADDRESS, show_default=True, help="Address drivers and workers connect to.")
@click.option("--insecure", is_flag=True, help="Allow binding a non-loopback address without keys.")
@click.option("--parent-pid", type=int, default=None, hidden=True, help="Stop when this process is gone.")
@click.option("--session", default=None, hidden=True, help="Session id (shared-memory name prefix); random by default.")
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), default=None,
              help="Serve Prometheus metrics on this port (http://HOST:PORT/metrics).")
@click.option("--metrics-host", default=None, help="Address the metrics port listens on (default: the --bind host).")
def broker(bind: str, insecure: bool, parent_pid: int | None, session: str | None, metrics_port: int | None,
           metrics_host: str | None) -> None:
    """Run a broker: the task table that drivers and workers connect to."""
    from .broker import Broker

    _check_bind(bind, insecure)
    b = Broker(bind, _config.load(), parent_pid=parent_pid, session=session, metrics_port=metrics_port,
               metrics_host=metrics_host or _host_of(bind))
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
        while not stop.wait(0.2):
            if sup.refused:
                raise click.ClickException("the broker refused our key; see the log above")
    finally:
        sup.stop()


@cli.command()
@click.option("--bind", default=DEFAULT_ADDRESS, show_default=True, help="The cluster's address.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Worker processes (default: one per core).")
@click.option("--slots", type=click.IntRange(min=1), default=None, help="Slots per worker.")
@click.option("--insecure", is_flag=True, help="Allow binding a non-loopback address without keys.")
@click.option("--metrics-port", type=click.IntRange(min=1, max=65535), default=None,
              help="The broker serves Prometheus metrics on this port.")
@click.option("--metrics-host", default=None, help="Address the metrics port listens on (default: the --bind host).")
def up(bind: str, workers: int | None, slots: int | None, insecure: bool, metrics_port: int | None,
       metrics_host: str | None) -> None:
    """Run a broker and workers in the foreground until Ctrl-C or SIGTERM."""
    from .cluster import LocalCluster

    _check_bind(bind, insecure)
    metrics = ["--metrics-port", str(metrics_port), "--metrics-host", metrics_host or _host_of(bind)] \
        if metrics_port is not None else []
    cluster = LocalCluster(_config.load(), workers=workers, address=bind, slots=slots, broker_args=metrics)
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
    except (TimeoutError, DistforkError) as exc:
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
