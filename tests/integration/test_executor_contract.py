"""The generic ``concurrent.futures`` executor contract, run against ``distfork.Executor``.

Our own adaptation of what CPython's test_concurrent_futures checks for every
executor (submit, map, wait, as_completed, the states of a cancelled future,
shutdown), plus the points of issue 14: ``map`` keeps no result alive,
pending forks finish at interpreter exit (Ctrl-C cancels them), tracebacks of
tasks pickled by value show their source. One embedded cluster of two
workers serves the module.
"""

from __future__ import annotations

import concurrent.futures
import gc
import linecache
import os
import signal
import subprocess
import sys
import textwrap
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import distfork
import tasks
from conftest import cli_env, wait_until

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("shared_cluster")]

T = 30.0


@pytest.fixture
def ex() -> Iterator[distfork.Executor]:
    executor = distfork.Executor()
    yield executor
    executor.shutdown(wait=True)


# -- submit -----------------------------------------------------------------------


def test_submit_returns_a_future_of_the_call(ex: distfork.Executor) -> None:
    fut = ex.submit(pow, 2, 8)
    assert isinstance(fut, concurrent.futures.Future)
    assert fut.result(T) == 256
    assert ex.submit(tasks.echo_kwargs, fn=1, self=2).result(T) == {"fn": 1, "self": 2}


def test_submit_of_a_failing_call_raises_its_exception_from_result(ex: distfork.Executor) -> None:
    fut = ex.submit(tasks.raise_value_error, "bad")
    with pytest.raises(ValueError, match="bad"):
        fut.result(T)
    assert isinstance(fut.exception(T), ValueError) and fut.done() and not fut.cancelled()


# -- map --------------------------------------------------------------------------


def test_map_yields_results_in_order(ex: distfork.Executor) -> None:
    assert list(ex.map(pow, range(10), range(10))) == [pow(i, i) for i in range(10)]
    assert list(ex.map(tasks.identity, range(7), chunksize=3)) == list(range(7))


def test_map_raises_the_failed_items_exception_when_it_is_reached(ex: distfork.Executor) -> None:
    it = ex.map(tasks.add_or_fail, [1, 28, 1], [1, 1, 1])
    assert next(it) == 2
    with pytest.raises(tasks.CustomError, match="multiple of 29"):
        next(it)


def test_map_keeps_no_reference_to_a_result_the_caller_dropped(ex: distfork.Executor) -> None:
    """CPython's test_free_reference: the iterator must not keep the last result alive.

    The driver's I/O thread, which set the result, may still hold it for the
    microseconds it takes to return from ``set_result``: the test waits for
    that, without advancing the iterator (which, when it kept the value,
    let go only at the next ``next()``).
    """
    seen = 0
    for obj in ex.map(tasks.Adder, range(10)):
        ref = weakref.ref(obj)
        del obj
        wait_until(lambda r=ref: gc.collect() is not None and r() is None, 5.0,  # type: ignore[misc]
                   what="the dropped result to be freed")
        seen += 1
    assert seen == 10


# -- wait and as_completed -----------------------------------------------------------


def test_wait_first_completed_all_completed_and_first_exception(ex: distfork.Executor, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    slow = ex.submit(tasks.wait_for_path, str(gate), T)
    quick = ex.submit(tasks.identity, 1)
    done, not_done = concurrent.futures.wait([slow, quick], T, return_when=concurrent.futures.FIRST_COMPLETED)
    assert done == {quick} and not_done == {slow}
    failed = ex.submit(tasks.raise_value_error, "x")
    done, not_done = concurrent.futures.wait([slow, failed], T, return_when=concurrent.futures.FIRST_EXCEPTION)
    assert done == {failed} and not_done == {slow}
    gate.touch()
    done, not_done = concurrent.futures.wait([slow, quick, failed], T)
    assert done == {slow, quick, failed} and not not_done


def test_as_completed_yields_each_future_once_then_times_out(ex: distfork.Executor, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    futs = [ex.submit(tasks.identity, i) for i in range(4)]
    assert sorted(f.result() for f in distfork.as_completed(futs + futs[:2], timeout=T)) == [0, 1, 2, 3]
    blocked = ex.submit(tasks.wait_for_path, str(gate), T)
    with pytest.raises(TimeoutError):
        for _ in distfork.as_completed([blocked], timeout=0.2):
            pass
    gate.touch()
    assert blocked.result(T) == "released"


# -- the states of a cancelled future -----------------------------------------------


def test_a_queued_future_cancels_and_a_finished_one_does_not(ex: distfork.Executor, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    started = [tmp_path / f"s{i}" for i in range(2)]
    busy = [ex.submit(tasks.announce_and_wait, str(s), str(gate), T) for s in started]
    wait_until(lambda: all(s.exists() for s in started), T, what="both workers to run a gated task")
    marker = tmp_path / "never"
    queued = ex.submit(tasks.touch, str(marker))
    assert queued.cancel()
    assert queued.cancelled() and queued.done() and not queued.running()
    assert queued.set_running_or_notify_cancel() is False
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result(T)
    done, _ = concurrent.futures.wait([queued], T)
    assert done == {queued}
    gate.touch()
    assert all(isinstance(f.result(T), int) for f in busy)
    finished = ex.submit(tasks.identity, 5)
    assert finished.result(T) == 5
    assert not finished.cancel() and not finished.cancelled()
    assert distfork.wait_all([ex.submit(tasks.identity, i) for i in range(4)], timeout=T) == [0, 1, 2, 3]
    assert not marker.exists()


# -- shutdown ------------------------------------------------------------------------


def test_shutdown_waits_then_refuses_new_work(tmp_path: Path) -> None:
    ex = distfork.Executor()
    futs = [ex.submit(tasks.slow_identity, i, 0.05) for i in range(4)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futs) and [f.result() for f in futs] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(tasks.identity, 1)
    ex.shutdown()  # a second shutdown is harmless


def test_the_context_manager_shuts_down_on_exit() -> None:
    with distfork.Executor() as ex:
        fut = ex.submit(tasks.slow_identity, 3, 0.05)
    assert fut.done() and fut.result() == 3
    with pytest.raises(RuntimeError):
        ex.submit(tasks.identity, 1)


# -- tracebacks of tasks pickled by value ---------------------------------------------


def test_a_classmethod_tasks_traceback_shows_the_source_line_only_the_driver_has() -> None:
    """A class made in a notebook cell: the worker has no file for it, the driver's linecache has."""
    filename = "<cell-issue-14>"
    source = textwrap.dedent("""\
        class Model:
            @classmethod
            def build(cls, n):
                raise ValueError(f"cannot build {n}")  # the line the traceback must show
        """)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    try:
        namespace: dict[str, Any] = {"__name__": "__main__"}
        exec(compile(source, filename, "exec"), namespace)
        with pytest.raises(ValueError, match="cannot build 3") as info:
            distfork.wait(distfork.fork(namespace["Model"].build, 3), T)
    finally:
        del linecache.cache[filename]
    remote = str(info.value.__cause__)
    assert f'File "{filename}", line 4, in build' in remote
    assert "the line the traceback must show" in remote


# -- interpreter exit ------------------------------------------------------------------

EXIT_SCRIPT = """
import logging, sys
import distfork
import tasks

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
distfork.init(workers=1)
distfork.fork(tasks.slow_identity, None, float(sys.argv[2]))
distfork.fork(tasks.touch, sys.argv[1])  # queued behind the first: still pending at exit
print("main done", flush=True)
"""


def run_exit_script(tmp_path: Path, delay_s: float) -> tuple[subprocess.Popen[str], Path]:
    script = tmp_path / "exit_script.py"
    script.write_text(EXIT_SCRIPT)
    marker = tmp_path / "ran"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(marker), str(delay_s)],
        env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    return proc, marker


def test_forks_pending_at_normal_exit_complete_before_the_cluster_stops(tmp_path: Path) -> None:
    proc, marker = run_exit_script(tmp_path, 0.5)
    try:
        out, err = proc.communicate(timeout=T)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "main done" in out
    assert marker.exists(), f"the pending fork did not run before exit:\n{err}"
    assert "waiting at exit for" in err


def test_ctrl_c_at_exit_cancels_the_pending_forks(tmp_path: Path) -> None:
    proc, marker = run_exit_script(tmp_path, 60.0)
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "waiting at exit for" in line:
                break
        else:
            pytest.fail("the script never waited at exit:\n" + "".join(lines))
        cluster = cluster_of(proc)
        assert cluster, "the script runs an embedded cluster"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=T)
        assert time.monotonic() - t0 < 20
    finally:
        proc.kill()
        proc.wait()
    assert "interrupted at exit: cancelling" in err
    assert not marker.exists()
    assert_gone(cluster)


def cluster_of(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def assert_gone(procs: list[psutil.Process]) -> None:
    """The script's embedded cluster stopped with it: no process, no segment of theirs."""
    wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs), T,
               what="the script's cluster to stop")
    pids = {str(p.pid) for p in procs}
    left = [n for n in os.listdir("/dev/shm") if n.startswith("df-") and n.split("-")[2] in pids]
    assert not left, f"the script's cluster left segments: {left}"


LOST_BROKER_SCRIPT = """
import logging, sys
import distfork
import tasks

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
distfork.init(sys.argv[1])
distfork.fork(tasks.slow_identity, None, 60.0)
print("main done", flush=True)
"""


def test_exit_does_not_wait_for_ever_on_a_broker_that_is_gone(tmp_path: Path, cli_cluster: Any) -> None:
    """The driver waits for a lost broker to come back; at exit it gives up once none answers."""
    script = tmp_path / "lost_broker.py"
    script.write_text(LOST_BROKER_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), cli_cluster.address], env=cli_cluster.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if "waiting at exit for" in line:
                break
        else:
            pytest.fail("the script never waited at exit")
        cli_cluster.kill_broker()
        _, err = proc.communicate(timeout=T)
    finally:
        proc.kill()
        proc.wait()
    assert "does not answer: cancelling 1 unfinished forks at exit" in err
