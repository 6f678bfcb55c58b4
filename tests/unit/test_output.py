"""distfork.output without processes: a task's capture, its bounds, and how the driver shows lines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distfork import output


@pytest.fixture(autouse=True)
def no_wake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output._router, "wake", None)  # no control thread here
    monkeypatch.setattr(output._router, "pending", {})


def test_writes_become_lines_across_calls_and_streams_stay_apart() -> None:
    cap = output.Capture(7, "ab", 0)
    cap.write("out", "hel")
    cap.write("err", "oops\n")
    cap.write("out", "lo\nwor")
    cap.write("out", "ld")
    cap.close()
    body = cap.take()
    assert body is not None
    assert body["lines"] == [["err", "oops"], ["out", "hello"], ["out", "world"]]
    assert body["final"] and body["key"] == 7 and body["peer"] == "ab"
    assert cap.take() is None  # the final chunk goes once


def test_a_task_over_its_byte_limit_has_its_further_lines_counted_once_at_the_end() -> None:
    cap = output.Capture(1, "ab", max_bytes=100)
    for i in range(50):
        cap.write("out", f"line {i:03d}\n")  # 9 bytes each
    first = cap.take()
    assert first is not None and len(first["lines"]) == 11 and first["dropped"] == 0
    cap.write("out", "more\n")
    assert cap.take() is None  # nothing sent, nothing told yet
    cap.close()
    last = cap.take()
    assert last is not None and last["lines"] == [] and last["dropped"] == 40


def test_a_line_without_end_is_cut_and_the_pending_buffer_is_bounded() -> None:
    cap = output.Capture(1, "ab", 0)
    cap.write("out", "y" * (output._LINE_MAX * 2 + 5))
    body = cap.take()
    assert body is not None and [len(t) for _, t in body["lines"]] == [output._LINE_MAX] * 2
    for _ in range(output._PENDING_MAX // 1000 + 10):  # the control thread never drains it
        cap.write("out", "z" * 999 + "\n")
    assert cap.pending <= output._PENDING_MAX and cap.dropped > 0


def test_only_the_thread_running_a_task_is_captured() -> None:
    assert output._router.current() is None
    output.begin(3, "cd", 0)
    cap = output._router.current()
    assert cap is not None and cap.key == 3
    assert output.end() is True
    assert output._router.current() is None
    output.begin(4, "cd", 0)
    assert output.end() is False  # a task that wrote nothing made no capture


def test_the_driver_shows_lines_with_where_they_ran_to_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    shown = output.Display(str(path))
    body = {"worker": "worker-a-12", "host": "worker-a", "pid": 12}
    shown.show(body, 5, [("out", "hi"), ("log", "WARNING x: y")], 3)
    shown.close()
    assert path.read_text().splitlines() == [
        "(task 5 worker-a-12 host worker-a pid 12) hi",
        "(task 5 worker-a-12 host worker-a pid 12) WARNING x: y",
        "(task 5 worker-a-12 host worker-a pid 12) [3 lines dropped: over output_task_bytes]",
    ]
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_the_terminal_gets_stdout_lines_on_stdout_and_the_rest_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    output.Display("terminal").show({"worker": "w", "host": "h", "pid": 1}, 2, [("out", "a"), ("err", "b")], 0)
    output.Display("off").show({"worker": "w", "host": "h", "pid": 1}, 2, [("out", "c")], 0)
    got = capsys.readouterr()
    assert got.out == "(task 2 w host h pid 1) a\n" and got.err == "(task 2 w host h pid 1) b\n"
