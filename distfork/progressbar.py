"""Progress bars for batches of futures: ``distfork.progress(futures)``, ``Executor.map(..., progress=True)``.

A bar advances from the futures' done callbacks (rich's ``Progress`` is
thread-safe and redraws from its own thread), so it follows completions, not
the order in which results are asked for. On anything but a terminal it
draws nothing: logs and pipes stay clean.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterable
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["ProgressBar", "progress"]

F = TypeVar("F", bound=concurrent.futures.Future[Any])


class ProgressBar:
    """A bar over some futures that closes itself when the last one is done."""

    def __init__(self, futures: list[Any], description: str = "tasks", console: Console | None = None) -> None:
        self.total = len(futures)
        self._left = self.total
        self._lock = threading.Lock()
        self._closed = threading.Event()
        console = console or Console(stderr=True)
        self._bar: Progress | None = None
        if console.is_terminal and self.total:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[failed]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console)
            self._task = self._bar.add_task(description, total=self.total, failed="")
            self._bar.start()
        self.failed = 0
        if not self.total:
            self._closed.set()
        for fut in futures:
            fut.add_done_callback(self._done)

    def _done(self, fut: concurrent.futures.Future[Any]) -> None:
        failed = fut.cancelled() or fut.exception() is not None
        with self._lock:
            self._left -= 1
            self.failed += failed
            last = self._left == 0
        if self._bar is not None:
            self._bar.update(self._task, advance=1, failed=f"[red]{self.failed} failed" if self.failed else "")
        if last:
            self.close()

    def close(self) -> None:
        if self._bar is not None and not self._closed.is_set():
            self._bar.stop()
        self._closed.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._closed.wait(timeout)


def progress(futures: Iterable[F], description: str = "tasks", console: Console | None = None) -> list[F]:
    """Show a progress bar until every future is done; return them (a list, in the order given).

    Failed and cancelled futures count as done (and are counted apart); their
    exceptions stay with them. Quiet when stderr is not a terminal.
    """
    futs = list(futures)
    bar = ProgressBar(futs, description, console)
    try:
        concurrent.futures.wait(futs)
        bar.wait(5.0)  # the last done callback may still be drawing
    finally:
        bar.close()
    return futs
