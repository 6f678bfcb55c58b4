"""``Trace.report("run.html")``: one self-contained HTML page about a traced run.

The page embeds the tasks as JSON and draws everything with its own small
script into inline SVG: no CDN, no font, no request of any kind, so it opens
on an offline machine (tests/integration/test_trace_browser.py loads it in
headless Chromium with the network cut). Sections: the task stream (a row
per worker slot), the fork graph, a histogram of run times, throughput over
time, bytes by path, and the failures with their remote tracebacks.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tracing import TaskInfo

__all__ = ["render_report", "write_report"]

#: The page and its script (ours, inlined into every report).
_STATIC = Path(__file__).with_name("static")


def render_report(tasks: list[TaskInfo], title: str = "distfork run", dropped: int = 0) -> str:
    """The page as a string."""
    data = {"title": title, "dropped": dropped, "tasks": [dataclasses.asdict(t) for t in tasks]}
    # "</" would end the <script> element early; "<\\/" is the same string to JSON.
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    page = (_STATIC / "report.html").read_text(encoding="utf-8")
    script = (_STATIC / "report.js").read_text(encoding="utf-8")
    return page.replace("__TITLE__", html.escape(title)).replace("__SCRIPT__", script).replace("__DATA__", blob)


def write_report(tasks: list[TaskInfo], path: str | os.PathLike[str], title: str = "distfork run",
                 dropped: int = 0) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_report(tasks, title, dropped))
