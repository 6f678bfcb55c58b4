"""distfork.trace(): every fork of a run, nested ones too, with where and when it ran and what it took."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import distfork
import tasks
from conftest import cli_env, wait_until
from distfork import tracing

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("shared_cluster")]


def fib_calls(n: int) -> int:
    return 1 if n < 2 else 1 + fib_calls(n - 1) + fib_calls(n - 2)


def test_a_nested_fibonacci_run_is_captured_as_one_tree_with_its_parent_links() -> None:
    with distfork.trace() as t:
        assert distfork.wait(distfork.fork(tasks.fib, 7), timeout=60) == 13
    ts = t.tasks()
    assert len(ts) == fib_calls(7) == 41
    by_id = {x.id: x for x in ts}
    roots = [x for x in ts if x.parent is None]
    assert len(roots) == 1 and roots[0].func == "fib"
    children: dict[int, list[int]] = {}
    for x in ts:
        if x.parent is not None:
            children.setdefault(x.parent, []).append(x.id)
    # fib(n >= 2) forks exactly two children; fib(0), fib(1) none: 20 inner calls, 21 leaves
    assert sorted({len(v) for v in children.values()}) == [2]
    assert len(children) == 20
    for x in ts:
        assert x.status == "ok" and x.func == "fib"
        assert x.worker, f"task {x.id} has no worker"
        assert x.started is not None and x.finished is not None
        assert x.submitted <= x.started <= x.finished
        if x.parent is not None:
            p = by_id[x.parent]
            assert p.started is not None and p.finished is not None
            # forked while its parent ran, and waited for by it
            assert p.started <= x.submitted and x.finished <= p.finished, (x, p)
            assert x.done is not None and x.done <= p.finished
    # The root ran on a worker of the cluster; the ones its waiting parents took back say so.
    assert roots[0].where == "" and roots[0].host
    assert any(x.where == "reclaimed" for x in ts)
    text = str(t.graph)
    assert text.startswith("graph(") and "%1 : Future = fork(fib)" in text
    assert "with %1 = task fib" in text and "    %" in text  # the nested block is indented


def test_futures_taken_as_arguments_are_edges_and_held_values_say_so() -> None:
    with distfork.trace() as t:
        a = distfork.fork(tasks.slow_identity, 3, 0.3)  # still running when b and c name it
        b = distfork.fork(tasks.add, a, 4)
        c = distfork.fork(tasks.add, a, b)
        assert c.result(30) == 10
    ts = t.tasks()
    assert [x.func for x in ts] == ["slow_identity", "add", "add"]
    assert ts[0].deps == [] and ts[1].deps == [1] and ts[2].deps == [1, 2]
    assert (1, 2, "value") in t.graph.edges() and (2, 3, "value") in t.graph.edges()
    assert ts[0].path_out == "held"  # the broker kept it for b and c; the driver got a notice
    assert ts[2].path_out in ("inline", "shm", "frames")
    assert "fork(add, %1, %2)" in str(t.graph)


def test_the_chrome_trace_is_json_with_task_slices_flow_arrows_and_track_names(tmp_path: Path) -> None:
    with distfork.trace() as t:
        a = distfork.fork(tasks.identity, 1)
        b = distfork.fork(tasks.add, a, 1)
        assert distfork.wait(distfork.fork(tasks.fib, 4), timeout=60) == 3
        assert b.result(30) == 2
    t.save(tmp_path / "run.json")
    events = json.loads((tmp_path / "run.json").read_text())["traceEvents"]
    kinds = {e["ph"] for e in events}
    assert {"X", "s", "f", "M", "i"} <= kinds
    slices = [e for e in events if e["ph"] == "X" and e["cat"] == "task"]
    assert len(slices) == len(t.tasks()) == 2 + fib_calls(4), [x for x in t.tasks() if x.started is None]
    assert all(e["dur"] > 0 and isinstance(e["ts"], float | int) for e in slices)
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    assert starts.keys() == ends.keys() and len(starts) == len(slices) + 1  # a fork arrow each, one value arrow
    assert any(e["cat"] == "value" for e in starts.values())
    for i, s in starts.items():
        assert s["ts"] <= ends[i]["ts"] + 1, (s, ends[i])
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {x.worker for x in t.tasks()} <= names
    tracks = {(e["pid"], e["tid"]) for e in slices}
    assert len(tracks) >= 1


def test_a_failure_is_recorded_with_its_remote_traceback() -> None:
    with distfork.trace() as t:
        fut = distfork.fork(tasks.raise_value_error, "no such thing")
        with pytest.raises(ValueError):
            fut.result(30)
    (x,) = t.tasks()
    assert x.status == "raised"
    assert "ValueError: no such thing" in x.error and "raise_value_error" in x.error  # the remote frame
    assert "RAISED: ValueError: no such thing" in str(t.graph)


def test_forks_outside_the_block_are_not_traced() -> None:
    with distfork.trace() as t:
        pass
    assert not tracing.ACTIVE
    assert distfork.fork(tasks.add, 1, 2).result(30) == 3
    assert t.tasks() == []


def test_distfork_trace_runs_a_script_and_writes_the_trace_the_page_and_the_graph(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        "import distfork, tasks\n"
        "print(distfork.wait(distfork.fork(tasks.fib, 4), timeout=60))\n"
    )
    out = tmp_path / "job.json"
    proc = subprocess.run(
        [sys.executable, "-m", "distfork", "trace", "-o", str(out), "--html", str(tmp_path / "job.html"), "--",
         sys.executable, str(script)],
        env=cli_env(), capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "3"
    events = json.loads(out.read_text())["traceEvents"]
    assert sum(1 for e in events if e["ph"] == "X" and e["cat"] == "task") == fib_calls(4)
    assert "<svg" not in (tmp_path / "job.html").read_text()[:200]  # drawn by the page's script, not a CDN
    assert "graph(" in proc.stderr  # the fork graph, printed when the script ends
    assert "job.json" in proc.stderr


def test_a_failing_script_keeps_its_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "distfork", "trace", "-o", str(tmp_path / "x.json"), "--", sys.executable, "-c",
         "raise SystemExit(7)"],
        env=cli_env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 7
    assert not os.path.exists(tmp_path / "x.json")
    assert "never used distfork" in proc.stderr


def test_executor_map_with_progress_draws_a_bar_on_a_terminal_and_returns_the_results(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with distfork.Executor() as ex:
        assert list(ex.map(tasks.add, range(20), range(20), progress=True)) == [2 * i for i in range(20)]
    assert capsys.readouterr().err == ""  # not a terminal: quiet
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then draws as on a terminal
    with distfork.Executor() as ex:
        assert list(ex.map(tasks.add, range(20), range(20), progress=True)) == [2 * i for i in range(20)]
    err = [""]

    def reached() -> bool:  # the last done callback may still be drawing: read until it has
        err[0] += capsys.readouterr().err
        return "20/20" in err[0]

    wait_until(reached, 10.0, what="the bar to reach 20/20")
    assert "add" in err[0]
