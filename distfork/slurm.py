"""Workers on Slurm: a broker on the login node, workers as the tasks of Slurm job arrays.

::

    login node (the driver's process)                          compute nodes
    ┌───────────────────────────────────────────┐             ┌──────────────────────────────────┐
    │ SlurmCluster                              │   sbatch    │ array task 123_0 (Slurm job)     │
    │   keys: a fresh `distfork keygen` (0700)  │ ──────────▶ │   distfork --keys-dir K worker   │
    │   `distfork broker --bind tcp://HOST:P`   │             │     --connect tcp://HOST:P       │
    │      (a child; CURVE keys, ends with us)  │ ◀── CURVE ─ │     --slots $SLURM_CPUS_PER_TASK │
    │   reaper: scancels our jobs if we die     │             │ array task 123_1, 124_0 ...      │
    │   adapt thread: status → scale(n)         │   scancel   └──────────────────────────────────┘
    └───────────────────────────────────────────┘ ──────────▶ (scale down, close, driver exit)

Each worker is one task of a job array (``sbatch --array=0-N``): Slurm
schedules every task on its own, so workers join as nodes free up, and one
task can be cancelled on its own (``scancel 123_4``) to scale down. More
workers: another array of the difference. The job script runs ``distfork
worker`` under its nanny with the allocation's CPUs as slots; the worker
tells the broker its Slurm job id (HELLO), which ``distfork status`` shows.

Slurm ending a worker (time limit, preemption, ``scancel``) sends it
SIGTERM: the worker says goodbye, its tasks are re-queued and run on another
worker; a worker killed outright is noticed by heartbeat. Either way it is a
lost worker like any other (``docs/ARCHITECTURE.md``, "Workers on Slurm").

The keys live in a directory the compute nodes must read (a shared file
system, as Slurm clusters have for $HOME): by default a new 0700 directory
under ``~/.cache/distfork/slurm``, removed when the cluster closes.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from . import config as _config
from .errors import DistforkError

__all__ = ["AdaptPolicy", "SlurmCluster", "SlurmError"]

log = logging.getLogger(__name__)

#: States of a job (array task) that still holds or waits for a place in the queue.
_LIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED"})


class SlurmError(DistforkError):
    """A Slurm command (sbatch, squeue, scancel) failed, or is not installed."""


@dataclass
class AdaptPolicy:
    """How many workers the queue asks for, bounded by ``minimum`` and ``maximum``.

    Scaling up follows demand at once; scaling down waits until demand stayed
    lower for ``wait_count`` decisions in a row (as dask-jobqueue's ``adapt``),
    so a short lull between bursts does not cancel workers that take long to
    come back through the Slurm queue. No sockets, no clock: unit-tested.
    """

    minimum: int
    maximum: int
    slots_per_worker: int = 1
    wait_count: int = 3
    _below: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.minimum <= self.maximum:
            raise ValueError(f"adapt needs 0 <= minimum <= maximum, got minimum={self.minimum}, "
                             f"maximum={self.maximum}")

    def decide(self, queued: int, running: int, current: int) -> int:
        """The number of workers to have, given the broker's queued and running tasks."""
        want = math.ceil((queued + running) / max(1, self.slots_per_worker))
        want = min(self.maximum, max(self.minimum, want))
        if want >= current:
            self._below = 0
            return want
        self._below += 1
        if self._below < self.wait_count:
            return current
        self._below = 0
        return want


def slurm_job_id(env: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """This process's Slurm job as squeue names it: ``ARRAYJOB_TASK`` for an array task, else the job id."""
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return env.get("SLURM_JOB_ID") or None


def _run(cmd: Sequence[str], stdin: str | None = None, timeout_s: float = 60.0) -> str:
    """Run a Slurm command; its stdout, or SlurmError naming it and what it said."""
    try:
        done = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} is not installed or not on PATH: distfork.SlurmCluster runs on a Slurm "
                         "login node (where sbatch, squeue and scancel work)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{shlex.join(cmd)} did not finish within {timeout_s:g} s: is slurmctld reachable?") \
            from None
    if done.returncode != 0:
        raise SlurmError(f"{shlex.join(cmd)} failed (exit {done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _default_host() -> str:
    """An address of this host that other nodes reach: the one its name resolves to, if not loopback."""
    try:
        addr = socket.gethostbyname(socket.getfqdn())
    except OSError:
        addr = ""
    if not addr or addr.startswith("127."):
        raise SlurmError("cannot tell which address of this login node the compute nodes reach (its name "
                         f"resolves to {addr or 'nothing'}): pass host='ADDRESS' (distfork slurm --host)")
    return addr


#: The job script's lines that turn what Slurm gave the job into ``distfork worker --resources``:
#: its CPUs; its GPUs (Slurm's count, else the entries of CUDA_VISIBLE_DEVICES, else what was asked:
#: gpu=0 for a job without GPUs, so a worker on a GPU node does not advertise GPUs it was not given);
#: its memory (--mem, or --mem-per-cpu times its CPUs, in MiB) as memory_gb; the user's ``resources`` last.
_JOB_RESOURCES = """\
CPUS=${{SLURM_CPUS_PER_TASK:-{cpus}}}
GPUS=${{SLURM_GPUS_ON_NODE:-$(printf '%s' "${{CUDA_VISIBLE_DEVICES:-}}" | tr ',' '\\n' | grep -c .)}}
[ "$GPUS" -gt 0 ] || GPUS={gpus}
RES="cpu=$CPUS,gpu=$GPUS"
MEM_MB=${{SLURM_MEM_PER_NODE:-}}
[ -n "$MEM_MB" ] || [ -z "${{SLURM_MEM_PER_CPU:-}}" ] || MEM_MB=$((SLURM_MEM_PER_CPU * CPUS))
[ -z "$MEM_MB" ] || RES="$RES,memory_gb=$(awk -v mb="$MEM_MB" 'BEGIN {{ printf "%.1f", mb * 1048576 / 1e9 }}')"
"""


def _resource_spec(resources: Mapping[str, float]) -> str:
    """``{"ssd": 1}`` -> ``"ssd=1"`` for ``--resources``, checked as the worker will check it."""
    from .resources import parse_resources

    spec = ",".join(f"{k}={v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{k}={v!r}"
                    for k, v in resources.items())
    try:
        parse_resources(spec)
    except ValueError as exc:
        raise ValueError(f"SlurmCluster(resources=...): {exc}") from None
    return spec


def _label_specs(labels: Mapping[str, str]) -> list[str]:
    """``{"zone": "a"}`` -> ``["zone=a"]`` for ``--label``; a label that would not survive the trip is refused."""
    bad = [f"{k}={v}" for k, v in labels.items()
           if not str(k).strip() or any(c in f"{k}{v}" for c in ",;\n") or "=" in str(k)]
    if bad:
        raise ValueError(f"SlurmCluster(labels=...): {bad} - give names and values without ',', ';', '=' in "
                         "names or newlines, e.g. {'zone': 'a'}")
    return [f"{k}={v}" for k, v in labels.items()]


class SlurmCluster:
    """A keyed broker here and ``workers`` workers as Slurm jobs; a context manager.

    ::

        with distfork.SlurmCluster(workers=8, partition="cpu", time="1:00:00", cpus_per_worker=4) as cluster:
            distfork.init(cluster.address, keys_dir=cluster.keys_dir)
            ...

    Parameters: ``partition``, ``time`` (sbatch's ``--time``), ``account``,
    ``cpus_per_worker`` (the worker's slots), ``gpus_per_worker``
    (``--gres=gpu:N``), ``memory`` (``--mem``, e.g. ``"16G"``),
    ``extra_sbatch`` (more ``#SBATCH`` options, e.g. ``["--qos=low"]``),
    ``setup`` (shell lines run before the worker, e.g. ``module load``),
    ``resources`` (more the workers advertise, e.g. ``{"ssd": 1}``: on top of
    what Slurm gave the job, found at run time: its CPUs, its memory from
    ``--mem``, its GPUs from ``CUDA_VISIBLE_DEVICES`` or Slurm's count),
    ``labels`` (``{"zone": "a"}``, for ``options(labels=...)``),
    ``host`` (the address of this node the workers connect to), ``port``
    (default: a free one), ``keys_dir`` (existing keys from ``distfork
    keygen``; default: fresh ones), ``directory`` (where the keys and job
    logs go; must be readable from the compute nodes), ``python`` (the
    interpreter the workers run, default this one).
    """

    def __init__(
        self,
        workers: int = 0,
        *,
        partition: str | None = None,
        time: str | None = None,
        account: str | None = None,
        cpus_per_worker: int = 1,
        gpus_per_worker: int = 0,
        memory: str | None = None,
        extra_sbatch: Sequence[str] = (),
        setup: Sequence[str] = (),
        job_name: str = "distfork-worker",
        host: str | None = None,
        port: int | None = None,
        keys_dir: str | None = None,
        directory: str | None = None,
        python: str = sys.executable,
        start_timeout_s: float = 30.0,
        resources: Mapping[str, float] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        if workers < 0 or cpus_per_worker < 1 or gpus_per_worker < 0:
            raise ValueError(f"SlurmCluster needs workers >= 0, cpus_per_worker >= 1 and gpus_per_worker >= 0; "
                             f"got {workers}, {cpus_per_worker}, {gpus_per_worker}")
        bad = [o for o in extra_sbatch if not o.startswith("-") or "\n" in o]
        if bad:
            raise ValueError(f"extra_sbatch takes sbatch options such as '--qos=low', one per item; got {bad}")
        self.resources = _resource_spec(resources or {})
        self.labels = _label_specs(labels or {})
        self.n_initial = workers
        self.partition, self.time, self.account = partition, time, account
        self.cpus_per_worker, self.gpus_per_worker, self.memory = cpus_per_worker, gpus_per_worker, memory
        self.extra_sbatch, self.setup, self.job_name = list(extra_sbatch), list(setup), job_name
        self.host = host
        self.port = port
        self.python = python
        self.start_timeout_s = start_timeout_s
        # absolute: the job script runs on other nodes, in the job's working directory
        self._given_keys = os.path.abspath(keys_dir) if keys_dir else None
        self._given_dir = os.path.abspath(directory) if directory else None
        self.directory = ""
        self.keys_dir = ""
        self.address = ""
        self.broker: subprocess.Popen[bytes] | None = None
        self._reaper: subprocess.Popen[bytes] | None = None
        self.jobs: list[str] = []  # array job ids we submitted, in order
        self._cancelled: set[str] = set()  # array tasks we cancelled (squeue may still list them a moment)
        self._lock = threading.RLock()
        self._adapt_stop = threading.Event()
        self._adapt_thread: threading.Thread | None = None
        self._closed = False

    # -- life cycle --------------------------------------------------------------

    def start(self) -> SlurmCluster:
        """Make keys, start the broker and the reaper, submit the initial workers."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)
        return self

    def _start(self) -> None:
        base = Path(self._given_dir) if self._given_dir else Path.home() / ".cache" / "distfork" / "slurm"
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory = str(base / f"cluster-{secrets.token_hex(4)}")
        os.mkdir(self.directory, 0o700)
        os.mkdir(os.path.join(self.directory, "logs"), 0o700)
        if self._given_keys:
            self.keys_dir = self._given_keys
        else:
            from .security import keygen

            self.keys_dir = os.path.join(self.directory, "keys")
            os.mkdir(self.keys_dir, 0o700)
            keygen(self.keys_dir)
        host = self.host or _default_host()
        port = self.port or _free_port(host)
        self.address = f"tcp://{'[' + host + ']' if ':' in host else host}:{port}"
        self.broker = subprocess.Popen(
            [self.python, "-m", "distfork", "--keys-dir", self.keys_dir, "broker", "--bind", self.address,
             "--parent-pid", str(os.getpid())],
            stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_for_broker()
        self._reaper = subprocess.Popen(
            [self.python, "-c", "import sys; from distfork.slurm import _reap; sys.exit(_reap(int(sys.argv[1]), "
             "sys.argv[2]))", str(os.getpid()), self._jobs_file()],
            stdin=subprocess.DEVNULL, start_new_session=True)  # outlives a SIGKILL of our process group
        log.info("distfork broker at %s (keys %s); submitting %d Slurm workers", self.address, self.keys_dir,
                 self.n_initial)
        if self.n_initial:
            self.scale(self.n_initial)

    def _wait_for_broker(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            assert self.broker is not None
            if self.broker.poll() is not None:
                raise SlurmError(f"the distfork broker for {self.address} exited ({self.broker.returncode}) at "
                                 "start: see its log above (is the address one of this node's?)")
            try:
                self.status(timeout_s=1.0)
                return
            except (TimeoutError, DistforkError):
                if time.monotonic() > deadline:
                    raise SlurmError(f"the distfork broker at {self.address} did not answer within "
                                     f"{self.start_timeout_s:g} s") from None

    def close(self) -> None:
        """Cancel every job we submitted (and wait until squeue lists none), stop the broker, remove our keys."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._adapt_stop.set()
        if self._adapt_thread is not None:
            self._adapt_thread.join(30)
        try:
            if self.jobs:
                _run(["scancel", *self.jobs])
                self._wait_gone(self.jobs, 30.0)
        except SlurmError as exc:
            log.error("could not cancel the Slurm jobs %s: %s; cancel them with scancel", self.jobs, exc)
        finally:
            for p in (self._reaper, self.broker):
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in (self._reaper, self.broker):
                if p is None:
                    continue
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if self.directory:
                shutil.rmtree(self.directory, ignore_errors=True)

    def _wait_gone(self, jobs: Sequence[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._queue(jobs, live_only=False):
            if time.monotonic() > deadline:
                log.warning("Slurm jobs %s are still in the queue %g s after scancel", jobs, timeout_s)
                return
            time.sleep(0.2)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SlurmCluster {self.address or '(not started)'} jobs={self.jobs}>"

    # -- the job script ------------------------------------------------------------

    def job_script(self, n: int) -> str:
        """The sbatch script of an array of ``n`` workers."""
        opts = [f"--job-name={self.job_name}", f"--array=0-{n - 1}", "--ntasks=1",
                f"--cpus-per-task={self.cpus_per_worker}",
                f"--output={os.path.join(self.directory, 'logs', '%A_%a.out')}"]
        if self.partition:
            opts.append(f"--partition={self.partition}")
        if self.time:
            opts.append(f"--time={self.time}")
        if self.account:
            opts.append(f"--account={self.account}")
        if self.memory:
            opts.append(f"--mem={self.memory}")
        if self.gpus_per_worker:
            opts.append(f"--gres=gpu:{self.gpus_per_worker}")
        opts += self.extra_sbatch
        worker = [self.python, "-m", "distfork", "--keys-dir", self.keys_dir, "worker", "--connect", self.address]
        for label in self.labels:
            worker += ["--label", label]
        lines = ["#!/bin/sh", *(f"#SBATCH {o}" for o in opts), "", *self.setup,
                 *_JOB_RESOURCES.format(cpus=self.cpus_per_worker, gpus=self.gpus_per_worker).splitlines(),
                 *([f"RES=\"$RES\"{shlex.quote(',' + self.resources)}"] if self.resources else []),
                 # the allocation's CPUs are the worker's slots; what Slurm gave the job, its resources
                 f'exec {shlex.join(worker)} --slots "$CPUS" --resources "$RES"', ""]
        return "\n".join(lines)

    def _jobs_file(self) -> str:
        return os.path.join(self.directory, "jobs")

    # -- scaling -------------------------------------------------------------------

    def _queue(self, jobs: Sequence[str] | None = None, live_only: bool = True) -> dict[str, str]:
        """Our array tasks in squeue: ``{"123_4": state}`` (pending tasks one by one)."""
        jobs = list(self.jobs if jobs is None else jobs)
        if not jobs:
            return {}
        try:
            out = _run(["squeue", "--array", "--noheader", "--format=%i|%T", f"--jobs={','.join(jobs)}"])
        except SlurmError as exc:
            if "Invalid job id" not in str(exc):
                raise
            out = ""  # every one of them has ended and left slurmctld's memory (MinJobAge)
        rows = dict(line.strip().split("|", 1) for line in out.splitlines() if "|" in line)
        if live_only:
            rows = {j: s for j, s in rows.items() if s in _LIVE and j not in self._cancelled}
        return rows

    def worker_jobs(self) -> dict[str, str]:
        """Our workers that Slurm has not ended: ``{"123_4": "RUNNING" or "PENDING" ...}``."""
        with self._lock:
            return self._queue()

    def scale(self, n: int) -> None:
        """Have ``n`` workers: submit an array of the missing ones, or cancel the surplus
        (pending ones first, then those running the fewest tasks)."""
        if n < 0:
            raise ValueError(f"scale needs n >= 0, got {n}")
        if self._closed or not self.address:
            raise SlurmError("this SlurmCluster is not running: use it in a `with` block or call start()")
        with self._lock:
            live = self._queue()
            if n > len(live):
                self._submit(n - len(live))
            elif n < len(live):
                self._cancel(live, len(live) - n)

    def _submit(self, n: int) -> None:
        out = _run(["sbatch", "--parsable"], stdin=self.job_script(n))
        job = out.strip().split(";")[0]
        if not job.isdigit():
            raise SlurmError(f"sbatch answered {out.strip()!r}, not a job id")
        self.jobs.append(job)
        with open(self._jobs_file(), "a") as f:  # the reaper cancels what this file lists
            f.write(job + "\n")
        log.info("submitted Slurm job array %s of %d workers", job, n)

    def _cancel(self, live: dict[str, str], n: int) -> None:
        busy = self._busy_by_job()
        order = sorted(live, key=lambda j: (live[j] != "PENDING", busy.get(j, 0), [-int(x) for x in j.split("_")]))
        victims = order[:n]
        _run(["scancel", *victims])
        self._cancelled.update(victims)
        log.info("cancelled Slurm workers %s", victims)

    def _busy_by_job(self) -> dict[str, int]:
        try:
            snap = self.status(timeout_s=2.0)
        except (TimeoutError, DistforkError):
            return {}
        busy: dict[str, int] = {}
        for w in snap["workers"]:
            job = w.get("slurm_job")
            if isinstance(job, str):
                busy[job] = busy.get(job, 0) + int(w.get("assigned", 0))
        return busy

    def status(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The broker's status snapshot (``distfork status --json``)."""
        from .status import query_status

        return query_status(self.address, timeout_s, config=_config.load(keys_dir=self.keys_dir))

    def adapt(self, minimum: int = 0, maximum: int = 8, interval_s: float = 1.0, wait_count: int = 3) -> None:
        """Scale between ``minimum`` and ``maximum`` workers from the broker's queue, every ``interval_s``."""
        policy = AdaptPolicy(minimum, maximum, self.cpus_per_worker, wait_count)
        self._adapt_stop.set()
        if self._adapt_thread is not None:
            self._adapt_thread.join(30)
        self._adapt_stop = stop = threading.Event()
        self._adapt_thread = threading.Thread(target=self._adapt, args=(policy, interval_s, stop),
                                              name="distfork-slurm-adapt", daemon=True)
        self._adapt_thread.start()

    def _adapt(self, policy: AdaptPolicy, interval_s: float, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                snap = self.status(timeout_s=max(1.0, interval_s))
                with self._lock:
                    current = len(self._queue())
                    target = policy.decide(int(snap["queued"]), int(snap["running"]), current)
                    if target != current and not stop.is_set():
                        log.info("adapt: %d queued, %d running tasks: %d -> %d workers", snap["queued"],
                                 snap["running"], current, target)
                        self.scale(target)
            except (TimeoutError, DistforkError) as exc:
                log.warning("adapt: %s", exc)
            stop.wait(interval_s)


def _reap(parent_pid: int, jobs_file: str) -> int:
    """Wait until ``parent_pid`` is gone, then scancel every job listed in ``jobs_file`` (the reaper process)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(0.5):
        try:
            os.kill(parent_pid, 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            jobs = [j for j in Path(jobs_file).read_text().split() if j]
        except FileNotFoundError:
            return 0
        if jobs:
            subprocess.run(["scancel", *jobs], timeout=60, check=False)
        shutil.rmtree(os.path.dirname(jobs_file), ignore_errors=True)
        return 0
    return 0

