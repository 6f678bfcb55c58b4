"""Tasks pick their hardware, for real: ``distfork worker --resources/--label`` and ``options(resources=...)``.

One worker process with two slots and ``gpu=1`` (for scheduling: this
machine has no GPU), so that only the broker's accounting keeps two GPU
tasks from running at once on it; one worker without; a broker started with a short ``resource_grace_s``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import cli_env, free_port, stop_processes
from distfork.status import query_status

from .codeproj import result_line
from .support import wait_for_workers, write_script

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster() -> Iterator[tuple[str, dict[str, str], list[int]]]:
    address = f"tcp://127.0.0.1:{free_port()}"
    env = cli_env(DISTFORK_HEARTBEAT_S="0.2", DISTFORK_RESOURCE_GRACE_S="1")
    procs = [subprocess.Popen([sys.executable, "-m", "distfork", "broker", "--bind", address], env=env)]
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "distfork", "worker", "--connect", address, "--no-nanny",
                                       "--slots", "2", "--resources", "gpu=1,ssd=1", "--label", "zone=a"],
                                      env=env))
        procs.append(subprocess.Popen([sys.executable, "-m", "distfork", "worker", "--connect", address, "--no-nanny",
                                       "--label", "zone=b"], env=env))
        wait_for_workers(address, 2)
        yield address, env, [procs[1].pid, procs[2].pid]
    finally:
        stop_processes(procs)


GPU_TASKS = """
    import json, os, sys, time
    import distfork

    def on_gpu(i):
        t0 = time.time()
        time.sleep(0.02)
        return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES"), t0, time.time()

    def anywhere():
        return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")

    distfork.init(sys.argv[1])
    gpu = distfork.options(resources={"gpu": 1})
    futs = [gpu.fork(on_gpu, i) for i in range(20)]
    plain = [distfork.fork(anywhere) for _ in range(20)]
    zone_b = distfork.options(labels={"zone": "b"}).fork(anywhere)
    runs = [f.result(timeout=60) for f in futs]
    t0 = time.monotonic()
    try:
        distfork.options(resources={"gpu": 4}).fork(on_gpu, 0).result(timeout=30)
        error = None
    except distfork.DistforkError as exc:
        error = str(exc)
    failed_after_s = time.monotonic() - t0
    print("RESULT " + json.dumps({"runs": runs, "plain": [f.result(timeout=60) for f in plain],
                                  "zone_b": zone_b.result(timeout=60), "error": error,
                                  "failed_after_s": failed_after_s}), flush=True)
"""


def test_gpu_tasks_run_only_on_the_gpu_worker_one_at_a_time_and_too_big_a_task_fails_fast(
    cluster: tuple[str, dict[str, str], list[int]], tmp_path: Path
) -> None:
    address, env, (gpu_pid, cpu_pid) = cluster
    script = write_script(tmp_path, GPU_TASKS)
    done = subprocess.run([sys.executable, str(script), address], env=env, capture_output=True, text=True,
                          timeout=100)
    assert done.returncode == 0, done.stderr
    out = result_line(done.stdout)
    runs = out["runs"]
    assert {pid for pid, _, _, _ in runs} == {gpu_pid}  # all 20 on the worker with the GPU
    assert {dev for _, dev, _, _ in runs} == {"0"}  # each saw only its device
    spans = sorted((start, end) for _, _, start, end in runs)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))  # never two
    # Tasks that ask nothing see no device set, on a process without GPU tasks (the variable is
    # process-wide: a slot beside a GPU task's sees it; docs/ARCHITECTURE.md).
    assert {dev for pid, dev in out["plain"] if pid == cpu_pid} == {None}
    assert out["zone_b"][0] == cpu_pid
    error = out["error"]
    assert error is not None and "it asks for gpu=4" in error
    assert f"-{gpu_pid}: cpu=" in error and "gpu=1" in error and "ssd=1" in error and "[zone=a]" in error
    assert out["failed_after_s"] < 10  # the grace is 1 s: fails fast, not at the result timeout

    snap = query_status(address)
    by_pid = {w["pid"]: w["resources"] for w in snap["workers"]}
    assert by_pid[gpu_pid]["total"]["gpu"] == 1 and by_pid[gpu_pid]["free"]["gpu"] == 1
    assert by_pid[gpu_pid]["labels"] == {"zone": "a"} and "gpu" not in by_pid[cpu_pid]["total"]
    assert json.dumps(snap)  # what `distfork status --json` prints


def test_a_bad_resource_spec_is_refused_at_start_with_the_reason(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "distfork", "worker", "--no-nanny", "--resources", "gpu=two"],
                          env=cli_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "resource 'gpu=two'" in done.stderr
