"""``distfork slurm``: a keyed broker here and workers as Slurm jobs, until Ctrl-C or SIGTERM.

::

    distfork slurm --workers 8 --partition cpu --time 2:00:00 --cpus-per-worker 4
    distfork slurm --adapt 0:16 --host 10.0.0.5 --extra-sbatch=--qos=low
    distfork slurm --workers 2 --gpus-per-worker 1 --memory 32G --resources ssd=1 --label zone=a

Prints the address (stdout, first line) and how drivers connect (stderr);
stopping it cancels every job it submitted (``distfork/slurm.py``).
"""

from __future__ import annotations

import os
import signal
import threading

import click

from .errors import DistforkError

__all__ = ["slurm"]


def _adapt_range(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    lo, sep, hi = value.partition(":")
    try:
        bounds = (int(lo), int(hi))
    except ValueError:
        bounds = (-1, -1)
    if not sep or not 0 <= bounds[0] <= bounds[1]:
        raise click.BadParameter(f"{value!r}: give MIN:MAX workers, e.g. 0:16")
    return bounds


@click.command()
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True, help="Workers to start with.")
@click.option("--adapt", "adapt", default=None, metavar="MIN:MAX", callback=_adapt_range,
              help="Scale between MIN and MAX workers from the queue depth.")
@click.option("--partition", default=None, help="sbatch --partition.")
@click.option("--time", "time_limit", default=None, help="sbatch --time of each worker job, e.g. 2:00:00.")
@click.option("--account", default=None, help="sbatch --account.")
@click.option("--cpus-per-worker", type=click.IntRange(min=1), default=1, show_default=True,
              help="sbatch --cpus-per-task; the worker's slots.")
@click.option("--gpus-per-worker", type=click.IntRange(min=0), default=0, show_default=True,
              help="sbatch --gres=gpu:N.")
@click.option("--memory", default=None, help="sbatch --mem of each worker, e.g. 16G.")
@click.option("--resources", "resource_spec", default=None, metavar="NAME=N,...",
              help="More the workers advertise, on top of the job's CPUs, GPUs and --mem: ssd=1,licence=2.")
@click.option("--label", "label_specs", multiple=True, metavar="NAME=VALUE",
              help="A label of every worker, for options(labels=...): --label zone=a (repeatable).")
@click.option("--extra-sbatch", multiple=True, help="Another sbatch option, e.g. --extra-sbatch=--qos=low (repeat).")
@click.option("--setup", multiple=True, help="A shell line run before the worker, e.g. 'module load cuda' (repeat).")
@click.option("--host", default=None, help="The address of this node the workers connect to (default: its name's).")
@click.option("--port", type=click.IntRange(min=1, max=65535), default=None, help="The broker's port (default: free).")
@click.option("--directory", type=click.Path(file_okay=False), default=None,
              help="Where keys and job logs go; the compute nodes must read it (default ~/.cache/distfork/slurm).")
def slurm(workers: int, adapt: tuple[int, int] | None, partition: str | None, time_limit: str | None,
          account: str | None, cpus_per_worker: int, gpus_per_worker: int, memory: str | None,
          extra_sbatch: tuple[str, ...], setup: tuple[str, ...], host: str | None, port: int | None,
          directory: str | None, resource_spec: str | None, label_specs: tuple[str, ...]) -> None:
    """Run a keyed broker here and workers as Slurm jobs until Ctrl-C; then cancel the jobs.

    Keys: those of --keys-dir / DISTFORK_KEYS_DIR if given, else fresh ones (removed at the end).
    """
    from .resources import parse_labels, parse_resources
    from .slurm import SlurmCluster

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    try:
        resources = parse_resources(resource_spec or "")
        labels = parse_labels(",".join(label_specs))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    try:
        cluster = SlurmCluster(
            workers, partition=partition, time=time_limit, account=account, cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker, memory=memory, extra_sbatch=extra_sbatch, setup=setup, host=host,
            port=port, keys_dir=os.environ.get("DISTFORK_KEYS_DIR") or None, directory=directory,
            resources=resources, labels=labels)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        cluster.start()
        if adapt is not None:
            cluster.adapt(*adapt)
        click.echo(cluster.address)
        click.echo(f"distfork on Slurm: broker at {cluster.address}, jobs {' '.join(cluster.jobs) or '(none yet)'}\n"
                   f"connect with: DISTFORK_ADDRESS={cluster.address} DISTFORK_KEYS_DIR={cluster.keys_dir}  "
                   f"(or distfork.init({cluster.address!r}, keys_dir={cluster.keys_dir!r}))", err=True)
        while not stop.wait(0.5):
            if cluster.broker is not None and cluster.broker.poll() is not None:
                raise click.ClickException(f"the broker exited ({cluster.broker.returncode})")
    except DistforkError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        cluster.close()
