"""Progress bars for batches of futures: drawn on a terminal, silent elsewhere, never in the way."""

from __future__ import annotations

import concurrent.futures
import io
import threading

import pytest
from rich.console import Console

import distfork
from distfork.progressbar import ProgressBar


def _terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=100), out


def test_the_bar_counts_finished_and_failed_futures_and_returns_them_in_order() -> None:
    futs: list[concurrent.futures.Future[int]] = [concurrent.futures.Future() for _ in range(3)]
    console, out = _terminal()
    threading.Timer(0.05, lambda: [futs[0].set_result(1), futs[2].set_exception(ValueError("x")),
                                   futs[1].set_result(2)]).start()
    assert distfork.progress(futs, "squares", console=console) == futs
    text = out.getvalue()
    assert "squares" in text and "3/3" in text and "1 failed" in text


def test_nothing_is_drawn_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    fut: concurrent.futures.Future[int] = concurrent.futures.Future()
    fut.set_result(1)
    assert distfork.progress([fut]) == [fut]
    assert capsys.readouterr() == ("", "")


def test_an_empty_batch_is_done_at_once() -> None:
    console, out = _terminal()
    assert distfork.progress([], console=console) == []
    assert ProgressBar([], console=console).wait(0)
