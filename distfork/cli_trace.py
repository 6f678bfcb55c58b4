"""``distfork trace -- python script.py``: run a program with every fork it makes traced.

The program runs as a child process with ``DISTFORK_TRACE_OUT`` (and
``DISTFORK_TRACE_HTML``, ``DISTFORK_TRACE_GRAPH``) in its environment; the
first ``distfork`` runtime it starts opens a :func:`distfork.trace` for the
whole process and writes the files when it exits (``tracing.from_env``).
The child's exit code is ours.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import click

__all__ = ["trace_command"]

_GRAPH_LINES = 60  # of the fork graph printed at the end; the files have everything


@click.command("trace", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-o", "--output", default="distfork-trace.json", show_default=True, type=click.Path(dir_okay=False),
              help="Chrome trace to write (open it in https://ui.perfetto.dev or chrome://tracing).")
@click.option("--html", "html_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the self-contained HTML report here.")
@click.option("--graph/--no-graph", default=True, show_default=True, help="Print the fork graph when it ends.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def trace_command(output: str, html_path: str | None, graph: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND (after --) and record every fork it makes: distfork trace -- python script.py"""
    env = dict(os.environ)
    env["DISTFORK_TRACE_OUT"] = os.path.abspath(output)
    if html_path:
        env["DISTFORK_TRACE_HTML"] = os.path.abspath(html_path)
    with tempfile.TemporaryDirectory(prefix="distfork-trace-") as tmp:
        graph_path = os.path.join(tmp, "graph.txt")
        env["DISTFORK_TRACE_GRAPH"] = graph_path
        try:
            code = subprocess.call(list(command), env=env)
        except OSError as exc:
            raise click.ClickException(f"cannot run {command[0]!r}: {exc.strerror or exc}") from None
        if graph and os.path.exists(graph_path):
            with open(graph_path, encoding="utf-8") as f:
                lines = f.read().splitlines()
            more = len(lines) - _GRAPH_LINES
            click.echo("\n".join(lines[:_GRAPH_LINES]) + (f"\n  ... {more} more lines" if more > 0 else ""), err=True)
    if os.path.exists(env["DISTFORK_TRACE_OUT"]):
        click.echo(f"trace written to {output}" + (f" and {html_path}" if html_path else ""), err=True)
    else:
        click.echo("no trace written: the command never used distfork", err=True)
    sys.exit(code)
