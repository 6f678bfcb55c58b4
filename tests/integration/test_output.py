"""Output comes back: what tasks print and log reaches the driver, prefixed with where it ran.

A broker and two ``distfork worker`` processes through the CLI (their own
stdout and stderr in files, as an operator's log), drivers as scripts whose
terminal (stdout, stderr) the test reads.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import cli_env, free_port, stop_processes

from .codeproj import result_line
from .support import wait_for_workers, write_script

pytestmark = pytest.mark.timeout(120)


class Cluster:
    def __init__(self, address: str, env: dict[str, str], logs: list[Path]) -> None:
        self.address, self.env, self.logs = address, env, logs

    def run(self, tmp_path: Path, body: str, **env: str) -> subprocess.CompletedProcess[str]:
        script = write_script(tmp_path, body)
        return subprocess.run([sys.executable, str(script), self.address], env={**self.env, **env}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=100)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    address = f"tcp://127.0.0.1:{free_port()}"
    env = cli_env(DISTFORK_HEARTBEAT_S="0.2")
    procs = [subprocess.Popen([sys.executable, "-m", "distfork", "broker", "--bind", address], env=env)]
    logs = []
    try:
        for i in range(2):
            log = tmp_path / f"worker{i}.log"
            logs.append(log)
            with open(log, "w") as f:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "distfork", "worker", "--connect", address, "--no-nanny"],
                    env=env, stdout=f, stderr=subprocess.STDOUT,
                ))
        wait_for_workers(address, 2)
        yield Cluster(address, env, logs)
    finally:
        stop_processes(procs)


CHATTY = """
    import json, logging, os, socket, sys
    import distfork

    def chatty(n):
        for i in range(n):
            print("line", i)
            if i % 50 == 0:
                print("to stderr", i, file=sys.stderr)
        logging.getLogger("user.task").warning("a warning from the task")
        sys.stdout.write("no newline at the end")
        return os.getpid(), socket.gethostname()

    distfork.init(sys.argv[1])
    futs = [distfork.fork(chatty, 300) for _ in range(4)]
    ran = [f.result(timeout=60) for f in futs]
    print("RESULT " + json.dumps({"ran": ran, "ids": [f.task_id for f in futs], "outputs": [f.output for f in futs]}),
          flush=True)
"""


def test_prints_and_logs_of_tasks_reach_the_driver_prefixed_with_where_they_ran_in_order(
    cluster: Cluster, tmp_path: Path
) -> None:
    done = cluster.run(tmp_path, CHATTY)
    assert done.returncode == 0, done.stderr
    out = result_line(done.stdout)
    for task_id, (pid, host), text in zip(out["ids"], out["ran"], out["outputs"], strict=True):
        head = f"(task {task_id} {host}-{pid} host {host} pid {pid}) "
        mine = [x.removeprefix(head) for x in done.stdout.splitlines() if x.startswith(head)]
        assert mine == [f"line {i}" for i in range(300)] + ["no newline at the end"]  # all, in order
        errs = [x.removeprefix(head) for x in done.stderr.splitlines() if x.startswith(head)]
        assert errs == [f"to stderr {i}" for i in range(0, 300, 50)] + ["WARNING user.task: a warning from the task"]
        # The future keeps its task's lines (stdout, stderr and logging, in the order written).
        lines = text.splitlines()
        assert [x for x in lines if x.startswith("line ")] == [f"line {i}" for i in range(300)]
        assert "WARNING user.task: a warning from the task" in lines and lines[-1] == "no newline at the end"
        assert lines.index("to stderr 50") == lines.index("line 50") + 1
    # The workers' own logs stay theirs: the task's warning is there for operators, its prints are not.
    logs = "".join(p.read_text() for p in cluster.logs)
    assert "a warning from the task" in logs
    assert "line 1" not in logs and "to stderr" not in logs


CRASH = """
    import os, signal, sys, time
    import distfork

    def last_words():
        print("last words before the crash", flush=True)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    distfork.init(sys.argv[1])
    fut = distfork.options(max_retries=0).fork(last_words)
    try:
        fut.result(timeout=60)
    except distfork.WorkerLostError as exc:
        print("RESULT " + __import__("json").dumps({"lost": str(exc)[:80], "output": fut.output}), flush=True)
"""


def test_lines_of_a_task_that_kills_its_worker_still_arrive(cluster: Cluster, tmp_path: Path) -> None:
    done = cluster.run(tmp_path, CRASH)
    assert done.returncode == 0, done.stderr
    out = result_line(done.stdout)
    assert out["output"] == "last words before the crash\n"
    assert re.search(r"^\(task 1 \S+ host \S+ pid \d+\) last words before the crash$", done.stdout, re.M)


FLOOD = """
    import json, os, resource, sys, time
    import distfork

    def flood(mb):
        line = "x" * 999
        for _ in range(mb * 1000):
            print(line)
        return "flooded"

    def noop():
        return 1

    distfork.init(sys.argv[1])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    big = distfork.fork(flood, 100)
    t0 = time.monotonic()
    small = [distfork.fork(noop) for _ in range(200)]
    assert sum(f.result(timeout=60) for f in small) == 200
    small_s = time.monotonic() - t0
    assert big.result(timeout=100) == "flooded"
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    print("RESULT " + json.dumps({"small_s": small_s, "grew_mb": grew_mb, "kept": len(big.output),
                                  "tail": big.output[-200:]}), flush=True)
"""


def test_a_task_printing_100_mb_neither_stalls_the_cluster_nor_fills_the_driver(
    cluster: Cluster, tmp_path: Path
) -> None:
    shown = tmp_path / "tasks.log"
    done = cluster.run(tmp_path, FLOOD, DISTFORK_OUTPUT=str(shown))
    assert done.returncode == 0, done.stderr
    out = result_line(done.stdout)
    assert out["small_s"] < 30  # 200 other tasks went through while it printed
    assert out["grew_mb"] < 100, out  # the driver got at most output_task_bytes (8 MiB) of it
    assert out["kept"] <= 8 * 1024 * 1024 + 200
    dropped = re.findall(r"\[(\d+) lines dropped: over output_task_bytes\]", out["tail"])
    assert len(dropped) == 1 and int(dropped[0]) > 90_000, out["tail"]  # one notice, at the end
    # To a file (DISTFORK_OUTPUT=path), private to the user, nothing on the terminal.
    assert "lines dropped" in shown.read_text()[-300:] and shown.stat().st_mode & 0o777 == 0o600
    assert not re.search(r"^\(task ", done.stdout + done.stderr, re.M)


OFF = """
    import json, sys
    import distfork

    def hello():
        print("hello")

    distfork.init(sys.argv[1])
    fut = distfork.fork(hello)
    fut.result(timeout=60)
    print("RESULT " + json.dumps(fut.output), flush=True)
"""


def test_output_off_shows_nothing_but_the_future_keeps_it(cluster: Cluster, tmp_path: Path) -> None:
    done = cluster.run(tmp_path, OFF, DISTFORK_OUTPUT="off")
    assert done.returncode == 0, done.stderr
    assert result_line(done.stdout) == "hello\n"
    assert "hello" not in done.stdout.replace('RESULT "hello\\n"', "") and "hello" not in done.stderr
