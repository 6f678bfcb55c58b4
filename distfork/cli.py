"""The ``distfork`` command: ``broker``, ``worker``, ``up``, ``status``, ``loadtest``, ``keygen``.

A cluster has one address, ``tcp://HOST:PORT`` (default port 7340), that
drivers and workers alike connect to::

    distfork broker --bind tcp://127.0.0.1:7340
    distfork worker --connect tcp://127.0.0.1:7340 --slots 1
    distfork up --workers 4            # both, in the foreground, until Ctrl-C
    distfork status --address tcp://127.0.0.1:7340
    distfork loadtest --address tcp://127.0.0.1:7340 --tasks 10000 --concurrency 256
    distfork broker --metrics-port 9340  # Prometheus metrics at http://127.0.0.1:9340/metrics
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from typing import Any

import click

from . import config as _config
from .config import DEFAULT_ADDRESS
from .errors import DistforkError

__all__ = ["main"]

log = logging.getLogger("distfork")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        force=True,  # a process forked by the fork server sets it up again, with its own pid
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s distfork[{os.getpid()}] %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _host_of(address: str) -> str:
    """The host part of a tcp:// address (``*`` is every interface); loopback for ipc:// and the like."""
    scheme, _, rest = address.partition("://")
    if scheme != "tcp":
        return "127.0.0.1"
    host = rest.rpartition(":")[0].strip("[]")
    return "0.0.0.0" if host in ("*", "") else host


def _check_bind(address: str, metrics_host: str | None = None) -> None:
    """Refuse address forms we do not understand (see endpoint.py); what is really bound is checked after binding."""
    from .endpoint import check_bind, check_host

    try:
        check_bind(address)
        if metrics_host is not None:
            check_host(metrics_host, "--metrics-host")
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _insecure(insecure: bool) -> dict[str, bool]:
    """``--insecure``: no keys at all, not even this user's default ones (children inherit it)."""
    return {"insecure": True} if insecure else {}


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
@click.option("--keys-dir", type=click.Path(file_okay=False), expose_value=False,
              callback=_set_env("DISTFORK_KEYS_DIR"),
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
    """Write CURVE key pairs for a broker, its workers and its clients, and the allow-lists, into DIRECTORY.

    Secret keys are 0600 from their first byte, directories 0700. Without any keys
    configured, a tcp:// cluster uses this user's default ones, made on first use
    under $XDG_CONFIG_HOME/distfork (or ~/.config/distfork).
    """
    from .security import keygen as make_keys

    try:
        paths = make_keys(directory, overwrite=force)
    except FileExistsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"broker key pair:  {paths['broker']}  {paths['broker_secret']}   (the broker only)")
    click.echo(f"worker key pair:  {paths['worker']}  {paths['worker_secret']}   (workers, with broker.key)")
    click.echo(f"client key pair:  {paths['client']}  {paths['client_secret']}   (drivers, status, with broker.key)")
    click.echo(f"allow-lists:      {paths['allowed']}/clients/ and {paths['allowed']}/workers/ (public keys by role)")
    click.echo(f"use: distfork --keys-dir {directory} broker --bind tcp://0.0.0.0:7340   (and the same --keys-dir, "
               f"or DISTFORK_KEYS_DIR={directory}, for workers and drivers)")


@cli.command()
@click.option("--bind", default=DEFAULT_ADDRESS, show_default=True, help="Address drivers and workers connect to.")
@click.option("--insecure", is_flag=True,
              help="No keys (not even this user's default ones): anyone who can reach the address runs code. "
                   "Clients then need DISTFORK_INSECURE=1.")
@click.option("--parent-pid", type=int, default=None, hidden=True, help="Stop when this process is gone.")
@click.option("--session", default=None, hidden=True, help="Session id (shared-memory name prefix); random by default.")
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), default=None,
              help="Serve Prometheus metrics on this port (http://HOST:PORT/metrics).")
@click.option("--metrics-host", default=None, help="Address the metrics port listens on (default: the --bind host).")
def broker(bind: str, insecure: bool, parent_pid: int | None, session: str | None, metrics_port: int | None,
           metrics_host: str | None) -> None:
    """Run a broker: the task table that drivers and workers connect to."""
    from .broker import Broker
    from .endpoint import ExposedError

    _check_bind(bind, metrics_host)
    try:
        b = Broker(bind, _config.load(**_insecure(insecure)), parent_pid=parent_pid, session=session,
                   metrics_port=metrics_port, metrics_host=metrics_host or _host_of(bind), insecure=insecure)
    except (OSError, ExposedError, ValueError) as exc:  # the metrics port, exposure, key files
        raise click.ClickException(str(exc)) from None
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
@click.option("--resources", "resource_spec", default=None, metavar="NAME=N,...",
              help="What tasks may ask for beyond slots, cpu, memory_gb and CUDA gpus, found by themselves: "
                   "gpu=2,ram_gb=64,ssd=1 (also DISTFORK_RESOURCES).")
@click.option("--label", "label_specs", multiple=True, metavar="NAME=VALUE",
              help="A label tasks can select: --label zone=a (repeatable; also DISTFORK_LABELS).")
def worker(address: str, slots: int | None, processes: int, name: str | None, nanny: bool,
           parent_pid: int | None, resource_spec: str | None, label_specs: tuple[str, ...]) -> None:
    """Run a worker that takes tasks from the broker at --connect."""
    from . import resources
    from .security import client_keys

    try:  # through the environment: the nanny's worker processes inherit them
        if resource_spec is not None:
            resources.parse_resources(resource_spec)
            os.environ["DISTFORK_RESOURCES"] = resource_spec
        if label_specs:
            os.environ["DISTFORK_LABELS"] = ",".join(label_specs)
        resources.parse_labels(os.environ.get("DISTFORK_LABELS", ""))
        resources.parse_resources(os.environ.get("DISTFORK_RESOURCES", ""))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    cfg = _config.load()
    try:
        client_keys(cfg, address, role="worker")  # bad key files: say so once, before any process starts
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if nanny:
        from .cluster import Supervisor

        _run_until_signal(Supervisor(cfg, address, processes, slots, fork_server=sys.platform == "linux"))
        return
    from .worker import Worker

    w = Worker(address, cfg, slots=slots or cfg.slots, name=name, parent_pid=parent_pid)
    w.install_signal_handlers()
    w.serve_forever()


@cli.command("fork-server", hidden=True)
@click.option("--report-fd", type=int, required=True, help="Where to report the pids and exits of children.")
@click.option("--parent-pid", type=int, required=True, help="Stop when this process is gone.")
def fork_server(report_fd: int, parent_pid: int) -> None:
    """Fork `distfork ...` processes on request, from one interpreter (the embedded cluster's)."""
    from . import broker as _broker  # noqa: F401 - imported once here, not in every child
    from . import forkserver
    from . import worker as _worker  # noqa: F401

    forkserver.serve(report_fd, parent_pid, lambda argv: cli.main(args=argv, prog_name="distfork"))


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
@click.option("--insecure", is_flag=True,
              help="No keys (not even this user's default ones): anyone who can reach the address runs code. "
                   "Clients then need DISTFORK_INSECURE=1.")
@click.option("--metrics-port", type=click.IntRange(min=1, max=65535), default=None,
              help="The broker serves Prometheus metrics on this port.")
@click.option("--metrics-host", default=None, help="Address the metrics port listens on (default: the --bind host).")
def up(bind: str, workers: int | None, slots: int | None, insecure: bool, metrics_port: int | None,
       metrics_host: str | None) -> None:
    """Run a broker and workers in the foreground until Ctrl-C or SIGTERM."""
    from .cluster import LocalCluster

    _check_bind(bind, metrics_host)
    metrics = ["--metrics-port", str(metrics_port), "--metrics-host", metrics_host or _host_of(bind)] \
        if metrics_port is not None else []
    # The child broker judges what it really listens on; it must be told our --insecure.
    broker_args = [*metrics, "--insecure"] if insecure else metrics
    cluster = LocalCluster(_config.load(**_insecure(insecure)), workers=workers, address=bind, slots=slots,
                           broker_args=broker_args)
    try:
        _run_until_signal(cluster, banner=(
            f"distfork cluster up at {bind} with {cluster.n_workers} workers\n"
            f"connect with: DISTFORK_ADDRESS={bind}  (or distfork.init({bind!r}))"
            + (f"\nmetrics at http://{metrics[3]}:{metrics_port}/metrics" if metrics else "")
        ))
    except (RuntimeError, TimeoutError) as exc:  # the broker did not start (its own error is logged above)
        raise click.ClickException(str(exc)) from None


@cli.command()
@click.option("--address", default=lambda: os.environ.get("DISTFORK_ADDRESS", DEFAULT_ADDRESS),
              show_default=DEFAULT_ADDRESS, help="The broker's address.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--timeout", "timeout_s", type=float, default=5.0, show_default=True, help="Seconds to wait.")
@click.option("--expect-worker-host", "expect_host", default=None, metavar="HOST",
              help="Exit with status 3 unless a worker of HOST is registered (a worker's health check).")
def status(address: str, as_json: bool, timeout_s: float, expect_host: str | None) -> None:
    """Print the broker's workers and its queues per driver (exit 1 if no broker answers)."""
    from .status import query_status, render_status

    try:
        snap = query_status(address, timeout_s)
    except (TimeoutError, DistforkError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(snap, indent=2))
    else:
        _echo_rich(*render_status(snap, address))
    if expect_host is not None and not any(w.get("host") == expect_host for w in snap["workers"]):
        raise _NoSuchWorker(f"no worker of host {expect_host!r} is registered at {address}")


class _NoSuchWorker(click.ClickException):
    """The broker answered, without a worker of the expected host: exit status 3 (no answer: 1)."""

    exit_code = 3


def _console(stderr: bool = False) -> Any:
    """A rich console; when not a terminal, wide enough that tables are not cut."""
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=stderr, highlight=False, width=max(console.width, 200))
    return console


def _echo_rich(*renderables: Any) -> None:
    console = _console()
    with console.capture() as captured:
        for r in renderables:
            console.print(r)
    click.echo(captured.get(), nl=False)


@cli.command()
@click.option("--address", default=lambda: os.environ.get("DISTFORK_ADDRESS"), show_default="an embedded cluster",
              help="The broker's address (also DISTFORK_ADDRESS); none: start a local cluster for the run.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Embedded cluster: its worker processes (default one per core). With --address: wait for this "
                   "many to register before starting.")
@click.option("--tasks", "n_tasks", type=click.IntRange(min=1), default=None,
              help="Tasks to run (default 1000, or unbounded with --duration).")
@click.option("--duration", "duration_s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Fork for this many seconds, then let the unfinished tasks finish.")
@click.option("--concurrency", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tasks unfinished at once (the window).")
@click.option("--payload-bytes", type=click.IntRange(min=0), default=0, show_default=True,
              help="Size of each task's argument (a numpy byte array).")
@click.option("--result-bytes", type=click.IntRange(min=0), default=0, show_default=True,
              help="Size of each task's result.")
@click.option("--task-seconds", "task_s", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="How long each task sleeps.")
@click.option("--fail-fraction", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fraction of tasks that raise LoadTestError.")
@click.option("--warmup", type=click.IntRange(min=0), default=32, show_default=True,
              help="Tasks run first and left out of the report (workers import the task's module once).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw the latency histogram and throughput over time to this PNG (needs distfork[plot]).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def loadtest(address: str | None, workers: int | None, n_tasks: int | None, duration_s: float | None,
             concurrency: int, payload_bytes: int, result_bytes: int, task_s: float, fail_fraction: float,
             warmup: int, as_json: bool, plot_path: str | None, quiet: bool) -> None:
    """Drive a cluster with forks; report throughput, latency percentiles, failures and bytes moved."""
    from . import loadtest as lt

    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.UsageError("--plot needs matplotlib: pip install 'distfork[plot]'") from None
    try:
        spec = lt.LoadSpec(tasks=n_tasks if n_tasks is not None or duration_s is not None else 1000,
                           duration_s=duration_s, concurrency=concurrency, payload_bytes=payload_bytes,
                           result_bytes=result_bytes, task_s=task_s, fail_fraction=fail_fraction, warmup=warmup)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        report = _run_loadtest(lt, spec, address, workers, quiet)
    except (TimeoutError, DistforkError) as exc:
        raise click.ClickException(str(exc)) from None
    if plot_path is not None:
        lt.plot_report(report, plot_path)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        _echo_rich(_loadtest_table(report, plot_path))
    if report.failures.get("unfinished"):
        raise click.ClickException(f"{report.failures['unfinished']} tasks did not finish in time")


def _run_loadtest(lt: Any, spec: Any, address: str | None, workers: int | None, quiet: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = spec.tasks if spec.duration_s is None else None
    with Progress(TextColumn("[bold]loadtest"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]:>9.0f} tasks/s"), TextColumn("{task.fields[inflight]:>6} in flight"),
                  TimeElapsedColumn(), console=_console(stderr=True), disable=quiet, transient=False) as bar:
        task = bar.add_task("loadtest", total=total, rate=0.0, inflight=0)

        def progress(finished: int, submitted: int, elapsed_s: float) -> None:
            bar.update(task, completed=finished, rate=finished / elapsed_s if elapsed_s > 0 else 0.0,
                       inflight=submitted - finished)

        return lt.run(spec, address=address, workers=workers, progress=progress)


def _loadtest_table(report: Any, plot_path: str | None) -> Any:
    from rich.console import Group
    from rich.table import Table

    from .status import format_bytes

    t = Table(title=f"loadtest of {report.address} ({report.workers} workers)", title_justify="left",
              show_header=False, show_edge=False, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    spec = report.spec
    t.add_row("tasks", f"{report.finished} finished of {report.submitted} forked, {report.succeeded} succeeded")
    t.add_row("load", f"concurrency {spec.concurrency}, payload {format_bytes(spec.payload_bytes)}, "
                      f"result {format_bytes(spec.result_bytes)}, task {spec.task_s:g} s")
    t.add_row("throughput", f"{report.tasks_per_s:,.1f} tasks/s over {report.elapsed_s:.2f} s")
    pct = report.percentiles()
    if pct:
        t.add_row("latency", "  ".join(f"{k} {pct[k] * 1000:.2f} ms" for k in ("p50", "p90", "p99", "max")))
    failures = ", ".join(f"{k}: {v}" for k, v in sorted(report.failures.items())) or "none"
    t.add_row("failures", failures, style="red" if report.failed else None)
    t.add_row("bytes", f"sent {format_bytes(report.sent_bytes)}, received {format_bytes(report.received_bytes)}")
    if report.broker_bytes:
        for direction, paths in report.broker_bytes.items():
            t.add_row(f"  {direction}s", ", ".join(f"{p} {format_bytes(n)}" for p, n in paths.items()))
    if report.by_worker:
        counts = sorted(report.by_worker.values())
        t.add_row("spread", f"{len(counts)} workers ran tasks: {counts[0]} to {counts[-1]} each")
    if plot_path:
        t.add_row("plot", plot_path)
    return Group(t)


cli.add_command(__import__("distfork.cli_trace", fromlist=["trace_command"]).trace_command)


def main() -> None:
    cli(prog_name="distfork")


from .cli_slurm import slurm as _slurm  # noqa: E402 - `distfork slurm`, in its own module

cli.add_command(_slurm)
