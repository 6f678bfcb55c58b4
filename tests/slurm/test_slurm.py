"""distfork on a real Slurm: SlurmCluster's workers are Slurm jobs on two slurmd nodes (tests/slurm/slurmlab.py).

The lab runs munged, slurmctld and one slurmd per node, each node in its own
network namespace with its own address, hostname and /dev/shm. Drivers run
on the login node (the controller's namespace) as the user would run them:
a Python process that uses ``distfork.SlurmCluster`` and ``distfork.init``;
the test sends it lines of code and reads what they give. What Slurm does is
read from Slurm itself (``squeue``, ``scancel``, the job's own output file).

The time-limit case waits for slurmctld's time-limit check (every 30 s, not
configurable): it starts first, in a driver of its own, and is checked
last, so it overlaps the other tests.
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import cli_env, wait_until

from .slurmlab import SlurmLab, unavailable

pytestmark = pytest.mark.timeout(180)

DRIVER = '''
import json, os, socket, sys, time, traceback
import numpy as np
import distfork


def slurm_job():
    return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"


def where(i, delay_s=0.0):
    time.sleep(delay_s)
    return {"host": socket.gethostname(), "job": slurm_job(), "i": i}


def mark_then_sleep(path, first_s):
    """Append this worker's Slurm job to ``path``; sleep ``first_s`` on the first attempt only."""
    first = not os.path.exists(path)
    with open(path, "a") as f:
        f.write(slurm_job() + "\\n")
    if first:
        time.sleep(first_s)
    return slurm_job()


def live_workers(c):
    return sorted(w["slurm_job"] for w in c.status()["workers"])


ns = dict(globals())
for line in sys.stdin:
    try:
        ns.pop("_", None)
        exec(json.loads(line), ns)
        print(json.dumps({"ok": ns.get("_")}, default=str), flush=True)
    except BaseException:
        print(json.dumps({"error": traceback.format_exc()}), flush=True)
'''


class Driver:
    """A driver process on the login node: ``driver("_ = 1 + 1") == 2``."""

    def __init__(self, lab: SlurmLab, tmp: Path, name: str, **env: str) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        script = tmp / f"{name}.py"
        script.write_text(textwrap.dedent(DRIVER))
        self.stderr = open(tmp / f"{name}.err", "w+")  # noqa: SIM115 - closed in close()
        env = lab.env(cli_env(DISTFORK_HEARTBEAT_S="0.2", **env))
        self.proc = lab.start_on_login(sys.executable, str(script), env=env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def send(self, code: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(textwrap.dedent(code)) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout_s: float = 60.0) -> Any:
        try:
            answer = json.loads(self.lines.get(timeout=timeout_s))
        except queue.Empty:
            self.stderr.seek(0)
            raise AssertionError(f"the driver did not answer within {timeout_s} s; its log:\n"
                                 f"{self.stderr.read()[-3000:]}") from None
        assert "error" not in answer, answer["error"]
        return answer["ok"]

    def __call__(self, code: str, timeout_s: float = 60.0) -> Any:
        self.send(code)
        return self.receive(timeout_s)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmLab]:
    reason = unavailable()
    if reason:
        pytest.skip(f"no Slurm lab here: {reason}")
    with SlurmLab(nodes=2) as lab:
        yield lab


@pytest.fixture(scope="module")
def time_limited(lab: SlurmLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TimeLimited]:
    """A cluster whose worker has a time limit, running a long task (checked by the last test).

    The worker is submitted with ``time="1"`` (a minute, Slurm's smallest); once the task runs, the
    job's end is brought forward to now (``scontrol update EndTime=``, as an admin shortens a
    running job), so slurmctld ends it for its time limit at its next check (every 30 s) instead of
    after a minute or more: the other tests run meanwhile."""
    tmp = tmp_path_factory.mktemp("time-limited")
    d = Driver(lab, tmp, "time_limited")
    marks = tmp / "marks"
    try:
        d(f"""
            c = distfork.SlurmCluster(workers=1, time="1", host={lab.login.ip!r}, directory={str(tmp)!r})
            c.start()
            distfork.init(c.address, keys_dir=c.keys_dir)
            c.adapt(1, 1, interval_s=0.5)  # keeps one worker: replaces the one the time limit ends
            fut = distfork.fork(mark_then_sleep, {str(marks)!r}, 600)
        """)
        limited = TimeLimited(lab, d, marks)
        yield limited
    finally:
        d.send("c.close(); distfork.shutdown()")
        d.close()


class TimeLimited:
    """The time-limited cluster's driver, its task's marks, and the thread that shortens the job once the task runs."""

    def __init__(self, lab: SlurmLab, driver: Driver, marks: Path) -> None:
        self.driver, self.marks = driver, marks
        self.shortened: str | BaseException | None = None

        def shorten() -> None:
            try:
                wait_until(marks.exists, 60, interval_s=0.1, what="the time-limited task to start")
                job = marks.read_text().split()[0]
                end = (datetime.datetime.now() + datetime.timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S")
                lab.run("scontrol", "update", f"JobId={job}", f"EndTime={end}", timeout_s=20)
                self.shortened = job
            except BaseException as exc:  # noqa: BLE001 - raised by the test that checks
                self.shortened = exc

        self.thread = threading.Thread(target=shorten, name="shorten-time-limit", daemon=True)
        self.thread.start()


def _cleaned_up(lab: SlurmLab, jobs: list[str], pids: list[int], directory: str, marker: str = "") -> None:
    """Nothing of the cluster is left: no job in squeue, no worker process, no segment, no directory.

    A process of the cluster is one whose command line names ``marker`` (default: its directory)."""
    queued = [row for row in lab.squeue() if row[0].split("_")[0] in jobs]
    assert queued == [], f"jobs left in the queue: {queued}"

    def gone() -> bool:  # processes that were told to stop may take a moment to exit
        alive = [p for p in pids if _alive(p)]
        ours = [p.pid for p in psutil.process_iter() if (marker or directory) in " ".join(_cmdline(p))]
        return not alive and not [p for p in ours if _alive(p)]

    wait_until(gone, 15, interval_s=0.1, what="the cluster's worker, broker and reaper processes to exit")
    segments = {node: [n for n in names if int(n.split("-")[2]) in pids]
                for node, names in lab.shm_segments().items()}
    assert all(not names for names in segments.values()), f"segments left: {segments}"
    assert not os.path.exists(directory), "the cluster's keys and logs directory is still there"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def test_workers_are_slurm_jobs_on_both_nodes_running_forks_and_arrays(
        lab: SlurmLab, time_limited: Any, tmp_path: Path) -> None:
    d = Driver(lab, tmp_path, "driver", DISTFORK_RESOURCE_GRACE_S="0.5")  # its broker fails unplaceable tasks soon
    try:
        cluster = d(f"""
            c = distfork.SlurmCluster(workers=2, host={lab.login.ip!r}, directory={str(tmp_path / 'c')!r},
                                      memory="300M", resources={{"ssd": 1}}, labels={{"zone": "lab"}})
            c.start()
            distfork.init(c.address, keys_dir=c.keys_dir)
            _ = {{"jobs": c.jobs, "directory": c.directory, "keys": c.keys_dir, "address": c.address}}
        """)
        assert oct(os.stat(cluster["keys"]).st_mode & 0o777) == "0o700"
        assert oct(os.stat(Path(cluster["keys"]) / "client.key_secret").st_mode & 0o777) == "0o600"
        (job,) = cluster["jobs"]
        ran = d("_ = distfork.wait_all([distfork.fork(where, i, 0.05) for i in range(24)], timeout=60)")
        assert sorted(r["i"] for r in ran) == list(range(24))
        assert {r["host"] for r in ran} == {"node-a", "node-b"}  # each worker on its node (namespace)
        assert {r["job"] for r in ran} == {f"{job}_0", f"{job}_1"}  # the two tasks of our array

        # 20 MB out and back between namespaces with their own /dev/shm: ZeroMQ frames
        same = d("""
            a = np.random.default_rng(3).standard_normal(2_500_000)
            b = distfork.wait(distfork.fork(np.negative, a), timeout=60)
            _ = bool((b == -a).all()) and distfork.api._runtime.driver.welcome["local_workers"] == 0
        """)
        assert same is True

        # Slurm says the same: our array's two tasks run, one on each node
        rows = [row for row in lab.squeue() if row[0].startswith(f"{job}_")]
        assert sorted((j, s) for j, s, _ in rows) == [(f"{job}_0", "RUNNING"), (f"{job}_1", "RUNNING")]
        assert {n for _, _, n in rows} == {"node-a", "node-b"}

        # what Slurm gave each job (1 CPU, no GPU, --mem=300M) and the user's ssd=1 are the worker's resources
        snap = d("_ = c.status()")
        assert [w["resources"]["total"] for w in snap["workers"]] == [
            {"slots": 1, "cpu": 1, "gpu": 0, "memory_gb": 0.3, "ssd": 1}] * 2
        assert [w["resources"]["labels"] for w in snap["workers"]] == [{"zone": "lab"}] * 2
        placed = d("""
            _ = distfork.options(resources={"ssd": 1, "memory_gb": 0.3}, labels={"zone": "lab"}).fork(where, 0)
            _ = _.result(timeout=60)
        """)
        assert placed["job"] in {f"{job}_0", f"{job}_1"}
        # more than any Slurm job of this cluster was given: refused, naming what they have
        refused = d("""
            bad = [distfork.options(resources=r).fork(where, 0) for r in ({"ssd": 2}, {"gpu": 1}, {"memory_gb": 1})]
            _ = [str(f.exception(timeout=30)) for f in bad]
        """)
        for text, asked in zip(refused, ["ssd=2", "gpu=1", "memory_gb=1"], strict=True):
            assert f"asks for {asked}" in text and "gpu=0, memory_gb=0.3, slots=1, ssd=1" in text, text

        # `distfork status` (CLI, with the cluster's keys) shows each worker's Slurm job id
        env = lab.env(cli_env())
        snap = json.loads(lab.run(sys.executable, "-m", "distfork", "--keys-dir", cluster["keys"], "status",
                                  "--address", cluster["address"], "--json", env=env).stdout)
        assert sorted(w["slurm_job"] for w in snap["workers"]) == [f"{job}_0", f"{job}_1"]
        table = lab.run(sys.executable, "-m", "distfork", "--keys-dir", cluster["keys"], "status",
                        "--address", cluster["address"], env=env).stdout
        assert "slurm job" in table and f"{job}_0" in table and f"{job}_1" in table
        pids = [w["pid"] for w in snap["workers"]]

        d("c.close(); distfork.shutdown()")
        _cleaned_up(lab, [job], pids, cluster["directory"])
    finally:
        d.close()


def test_scale_from_one_to_four_and_back_to_one(lab: SlurmLab, tmp_path: Path) -> None:
    d = Driver(lab, tmp_path, "driver")
    try:
        directory = d(f"""
            c = distfork.SlurmCluster(workers=1, host={lab.login.ip!r}, directory={str(tmp_path / 'c')!r})
            c.start()
            _ = c.directory
        """)
        wait_until(lambda: len(d("_ = live_workers(c)")) == 1, 30, interval_s=0.2, what="the first worker")
        d("c.scale(4)")
        jobs = d("_ = c.jobs")
        assert len(jobs) == 2  # one more array, of the three missing workers
        live = {j for j, s, _ in lab.squeue() if j.split("_")[0] in jobs and s in ("RUNNING", "PENDING")}
        assert len(live) == 4
        four = wait_until(lambda: (w := d("_ = live_workers(c)")) and len(w) == 4 and w, 40, interval_s=0.2,
                          what="four workers to register")
        assert set(four) == live
        snap = d("_ = c.status()")
        pids = [w["pid"] for w in snap["workers"]]

        d("c.scale(1)")
        left = {j for j, s, _ in lab.squeue() if j.split("_")[0] in jobs and s in ("RUNNING", "PENDING")}
        assert len(left) == 1 and left < live
        wait_until(lambda: d("_ = live_workers(c)") == sorted(left), 30, interval_s=0.2,
                   what="the broker to list only the one worker left")
        assert d("_ = len(c.worker_jobs())") == 1

        d("c.close()")
        _cleaned_up(lab, jobs, pids, directory)
    finally:
        d.close()


def test_scancel_of_a_worker_mid_task_retries_the_task_elsewhere(lab: SlurmLab, tmp_path: Path) -> None:
    d = Driver(lab, tmp_path, "driver")
    marks = tmp_path / "marks"
    try:
        directory = d(f"""
            c = distfork.SlurmCluster(workers=2, host={lab.login.ip!r}, directory={str(tmp_path / 'c')!r})
            c.start()
            distfork.init(c.address, keys_dir=c.keys_dir)
            _ = c.directory
        """)
        wait_until(lambda: len(d("_ = live_workers(c)")) == 2, 30, interval_s=0.2, what="two workers")
        pids = [w["pid"] for w in d("_ = c.status()")["workers"]]
        d(f"fut = distfork.fork(mark_then_sleep, {str(marks)!r}, 600)")
        wait_until(marks.exists, 30, interval_s=0.1, what="the task to start")
        victim = marks.read_text().split()[0]
        lab.run("scancel", victim)  # Slurm ends the job running the task

        result = d("_ = fut.result(timeout=60)")
        assert result != victim  # ran again, on the other worker, and succeeded
        assert marks.read_text().split() == [victim, result]
        wait_until(lambda: not any(j == victim for j, _, _ in lab.squeue()), 15, interval_s=0.2,
                   what="the cancelled job to leave the queue")
        counters = d("_ = c.status()['counters']")
        assert counters.get("tasks_failed", 0) == 0 and counters.get("tasks_succeeded", 0) == 1
        jobs = d("_ = c.jobs")
        d("c.close(); distfork.shutdown()")
        _cleaned_up(lab, jobs, pids, directory)
    finally:
        d.close()


def test_adapt_follows_the_queue_up_to_its_maximum_and_back_to_its_minimum(lab: SlurmLab, tmp_path: Path) -> None:
    d = Driver(lab, tmp_path, "driver")
    try:
        directory = d(f"""
            c = distfork.SlurmCluster(workers=0, host={lab.login.ip!r}, directory={str(tmp_path / 'c')!r})
            c.start()
            distfork.init(c.address, keys_dir=c.keys_dir)
            c.adapt(0, 3, interval_s=0.3, wait_count=2)
            futs = [distfork.fork(where, i, 1.0) for i in range(9)]
            _ = c.directory
        """)
        seen: set[str] = set()

        def all_done() -> bool:
            jobs = d("_ = c.jobs")
            seen.update(j for j, s, _ in lab.squeue() if j.split("_")[0] in jobs and s in ("RUNNING", "PENDING"))
            return bool(d("_ = all(f.done() for f in futs)"))

        wait_until(all_done, 60, interval_s=0.2, what="the nine tasks on adaptively started workers")
        ran = d("_ = [f.result() for f in futs]")
        assert sorted(r["i"] for r in ran) == list(range(9))
        assert 1 < len({r["job"] for r in ran}) <= 3  # more workers came for the queue, at most the maximum
        assert len(seen) <= 3
        pids = [w["pid"] for w in d("_ = c.status()")["workers"]]
        jobs = d("_ = c.jobs")
        wait_until(lambda: not [j for j, s, _ in lab.squeue() if j.split("_")[0] in jobs], 30, interval_s=0.2,
                   what="adapt to cancel the idle workers (minimum 0)")
        d("c.close(); distfork.shutdown()")
        _cleaned_up(lab, jobs, pids, directory)
    finally:
        d.close()


@pytest.mark.parametrize("how", ["exits", "is killed"])
def test_the_driver_ending_cancels_its_jobs(lab: SlurmLab, tmp_path: Path, how: str) -> None:
    d = Driver(lab, tmp_path, "driver")
    jobs = d(f"""
        c = distfork.SlurmCluster(workers=2, host={lab.login.ip!r}, directory={str(tmp_path / 'c')!r})
        c.start()
        _ = c.jobs
    """)
    directory = d("_ = c.directory")
    assert len([j for j, _, _ in lab.squeue() if j.split("_")[0] in jobs]) == 2
    if how == "exits":  # end of input: the script ends without close(); atexit cancels, and waits for it
        d.close()
        assert d.proc.returncode == 0
        assert not [j for j, _, _ in lab.squeue() if j.split("_")[0] in jobs]
        assert not os.path.exists(directory)
    else:  # SIGKILL: no atexit, no close(); the reaper cancels the jobs
        d.proc.kill()
        d.close()
        wait_until(lambda: not [j for j, _, _ in lab.squeue() if j.split("_")[0] in jobs], 30, interval_s=0.2,
                   what="the dead driver's jobs to leave the queue")
        wait_until(lambda: not os.path.exists(directory), 10, interval_s=0.1, what="the reaper to remove the keys")
    _cleaned_up(lab, jobs, [], directory)


def test_distfork_slurm_command_with_the_users_keys_runs_until_sigterm_then_cancels(
        lab: SlurmLab, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    env = lab.env(cli_env(DISTFORK_HEARTBEAT_S="0.2"))
    lab.run(sys.executable, "-m", "distfork", "keygen", str(keys), env=env)
    cmd = lab.start_on_login(sys.executable, "-m", "distfork", "--keys-dir", str(keys), "slurm", "--workers", "2",
                             "--host", lab.login.ip, "--directory", str(tmp_path / "c"), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert cmd.stdout is not None
    address = cmd.stdout.readline().strip()
    assert address.startswith(f"tcp://{lab.login.ip}:"), address

    def status(*extra: str) -> Any:
        return json.loads(lab.run(sys.executable, "-m", "distfork", *extra, "status", "--address", address, "--json",
                                  env=env).stdout)

    snap = wait_until(lambda: (s := status("--keys-dir", str(keys))) and len(s["workers"]) == 2 and s, 40,
                      interval_s=0.3, what="the two Slurm workers to register")
    jobs = sorted(w["slurm_job"] for w in snap["workers"])
    assert {j for j, s, _ in lab.squeue() if s == "RUNNING"} >= set(jobs)
    # the user's keys, not some other: a status query without them is refused
    nokeys = lab.run(sys.executable, "-m", "distfork", "status", "--address", address, "--timeout", "1",
                     env=env, check=False)
    assert nokeys.returncode == 1
    (directory,) = (tmp_path / "c").iterdir()  # the command's own (job logs; no keys: it was given them)
    assert sorted(p.name for p in directory.iterdir()) == ["jobs", "logs"]
    cmd.terminate()
    _, err = cmd.communicate(timeout=60)
    assert cmd.returncode == 0, err
    _cleaned_up(lab, [j.split("_")[0] for j in jobs], [w["pid"] for w in snap["workers"]], str(directory),
                marker=str(keys))
    assert (keys / "client.key_secret").exists()  # the user's keys are the user's: kept


SBATCH_DRIVER = """
import json, os, socket, time
import distfork
from distfork.status import query_status

def where(i):
    time.sleep(0.05)
    return socket.gethostname()

address = os.environ["DISTFORK_ADDRESS"]
deadline = time.monotonic() + 30
while len(query_status(address)["workers"]) < 2 and time.monotonic() < deadline:
    time.sleep(0.1)
hosts = distfork.wait_all([distfork.fork(where, i) for i in range(20)], timeout=60)
workers = query_status(address)["workers"]
print("RESULT", json.dumps({"hosts": sorted(set(hosts)), "driver": socket.gethostname(),
                            "jobs": sorted(w["slurm_job"] for w in workers), "keys": os.environ["DISTFORK_KEYS_DIR"]}))
"""


def test_the_sbatch_template_runs_broker_workers_and_driver_in_one_allocation(lab: SlurmLab, tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(SBATCH_DRIVER)
    out = tmp_path / "job.out"
    template = Path(__file__).resolve().parents[2] / "deploy" / "slurm" / "distfork.sbatch"
    env = lab.env(cli_env(DISTFORK_PYTHON=sys.executable, DISTFORK_SLURM_DIR=str(tmp_path / "keys"),
                          DISTFORK_HEARTBEAT_S="0.2"))
    done = lab.run("sbatch", "--parsable", "--wait", "--nodes=2", f"--output={out}", str(template), str(driver),
                   env=env, timeout_s=120, check=False)
    text = out.read_text() if out.exists() else "(no output)"
    assert done.returncode == 0, f"the job failed ({done.returncode}): {done.stderr}\n{text}"
    job = done.stdout.strip().split(";")[0]
    result = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT ")).split(" ", 1)[1])
    assert result["hosts"] == ["node-a", "node-b"]  # a worker on each node of the allocation
    assert result["driver"] == "node-a"  # the driver (and the broker) on its first node
    assert result["jobs"] == [job] * 4  # status: both workers' slots (2 CPUs each) belong to this job
    assert not any(j.split("_")[0] == job for j, _, _ in lab.squeue())
    assert not os.path.exists(Path(result["keys"]).parent), "the job's keys were not removed"


def test_a_time_limit_ending_a_worker_loses_no_task(lab: SlurmLab, time_limited: TimeLimited) -> None:
    d, marks = time_limited.driver, time_limited.marks
    time_limited.thread.join(60)
    if isinstance(time_limited.shortened, BaseException):
        raise time_limited.shortened
    result = d("_ = fut.result(timeout=120)", timeout_s=130)
    first, again = marks.read_text().split()
    assert first == time_limited.shortened  # the job whose end came forward while it ran the task
    assert result == again != first
    assert again.split("_")[0] != first.split("_")[0]  # a new array: adapt replaced the worker Slurm ended
    log = d(f"_ = open(os.path.join(c.directory, 'logs', {first + '.out'!r})).read()")
    assert "DUE TO TIME LIMIT" in log
    counters = d("_ = c.status()['counters']")
    assert counters.get("tasks_failed", 0) == 0
