"""The pages, in a real browser: the broker's live dashboard during a run, and a trace's offline report.

Headless Chromium (Debian's ``chromium``, installed by .ci/run) driven by
Playwright with ``executable_path``; the tests that need it skip with the
reason when it is missing. Screenshots go to the test's tmp_path (and to
``$DISTFORK_SCREENSHOTS`` when set, to look at them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import distfork
import tasks
from conftest import CliCluster, cli_env, free_port, wait_until

pytestmark = pytest.mark.timeout(120)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SECRET = "an-argument-the-page-must-never-show-4711"


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium for one test: closed before the test's leak check (its renderers are our children)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Python playwright is missing: pip install playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def _keep(path: Path) -> None:
    out = os.environ.get("DISTFORK_SCREENSHOTS")
    if out:
        os.makedirs(out, exist_ok=True)
        shutil.copy(path, os.path.join(out, path.name))


@pytest.fixture
def cluster() -> Iterator[tuple[CliCluster, str]]:
    """``distfork broker --metrics-port`` and two workers; yields the cluster and the dashboard's URL."""
    address, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    env = cli_env(DISTFORK_HEARTBEAT_S="0.2")
    broker = subprocess.Popen([sys.executable, "-m", "distfork", "broker", "--bind", address, "--metrics-port",
                               str(port)], env=env)
    c = CliCluster(address, broker, env=env)
    try:
        c.start_worker("--resources", "gpu=2,ssd=1", "--label", "zone=a")  # gpu=2: for scheduling only
        c.start_worker()
        c.wait_for_workers(2)
        yield c, f"http://127.0.0.1:{port}/"
    finally:
        c.stop()


class Load:
    """Forks short tasks (and one failure) from a thread of this process until stopped."""

    def __init__(self, address: str) -> None:
        distfork.init(address)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with pytest.raises(ValueError):
            distfork.fork(tasks.raise_value_error, "a failure for the dashboard").result(30)
        while not self.stop.is_set():
            distfork.wait_all([distfork.fork(tasks.slow_identity, SECRET, 0.02) for _ in range(8)], timeout=30)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)
        distfork.shutdown()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - our own loopback server
        return r.read()  # type: ignore[no-any-return]


def test_the_metrics_port_serves_the_page_its_data_and_still_the_metrics(cluster: tuple[CliCluster, str]) -> None:
    c, url = cluster
    load = Load(c.address)
    try:
        page = _get(url).decode()
        assert "<script>" in page and "src=" not in page and "https://" not in page  # nothing from elsewhere
        data = wait_until(lambda: d if (d := json.loads(_get(url + "dashboard.json")))["finished"] >= 9 else None,
                          30.0, what="the dashboard to count finished tasks")
        assert len(data["workers"]) == 2 and {"slots", "running", "done", "rss_bytes"} <= set(data["workers"][0])
        # each worker's resources (free/total; slots have their own column) and labels, from the broker's status
        res = sorted((w["resources"] for w in data["workers"]), key=lambda r: "ssd" in r["total"])
        assert set(res[0]["total"]) == {"cpu", "memory_gb"} and res[0]["labels"] == {}
        assert res[1]["total"]["gpu"] == 2 and res[1]["total"]["ssd"] == 1 and res[1]["labels"] == {"zone": "a"}
        assert all(r["free"] == r["total"] for r in res)  # the load asks for nothing: nothing held
        assert [d["unfinished"] >= 0 for d in data["drivers"]] == [True]
        assert any(f["status"] == "raised" for f in data["failures"])
        assert SECRET not in json.dumps(data)  # the broker cannot read arguments, and the page shows none
        assert b"distfork_tasks" in _get(url + "metrics")
    finally:
        load.close()


def test_the_live_page_shows_the_workers_and_a_task_count_that_rises(browser: Any,
                                                                     cluster: tuple[CliCluster, str],
                                                                     tmp_path: Path) -> None:
    c, url = cluster
    load = Load(c.address)
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(url)
        page.wait_for_selector("tr.worker-row", timeout=20_000)
        wait_until(lambda: page.locator("tr.worker-row").count() == 2, 20.0, what="two worker rows")
        # a task holding the ssd: the page shows it taken (free/total), then given back
        gate = tmp_path / "gate"
        held = distfork.options(resources={"ssd": 1}).fork(tasks.wait_for_path, str(gate), 60)
        ssd = page.locator("span.res[data-resource=ssd]")
        wait_until(lambda: ssd.inner_text() == "ssd 0/1", 20.0, what="the page to show the ssd held")
        row = page.locator("tr.worker-row", has=ssd).inner_text()
        assert "gpu 2/2" in row and "zone=a" in row and "cpu " in row and "memory_gb " in row
        first = int(page.get_attribute("body", "data-finished") or 0)
        wait_until(lambda: int(page.get_attribute("body", "data-finished") or 0) > first + 8, 30.0,
                   what="the finished count to rise on the page")
        page.wait_for_selector("#rate-line", timeout=20_000)  # the tasks/s chart has a line
        text = page.inner_text("body")
        assert "raised" in text and SECRET not in text
        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        _keep(shot)
        gate.touch()
        assert held.result(timeout=30) == "released"
        wait_until(lambda: ssd.inner_text() == "ssd 1/1", 20.0, what="the page to show the ssd free again")
        assert not errors, errors
    finally:
        page.close()
        load.close()


@pytest.mark.usefixtures("local_cluster")
def test_the_report_opens_offline_and_draws_every_task_on_its_worker_track(browser: Any, tmp_path: Path) -> None:
    with distfork.trace() as t:
        assert distfork.wait(distfork.fork(tasks.fib, 6), timeout=60) == 8
        futs = [distfork.fork(tasks.slow_identity, i, 0.01) for i in range(12)]
        assert distfork.wait_all(futs, timeout=60) == list(range(12))
        with pytest.raises(ValueError):
            distfork.fork(tasks.raise_value_error, "shown with its traceback").result(30)
    report = tmp_path / "run.html"
    t.report(report)
    n = len(t.tasks())
    workers = {x.worker for x in t.tasks()}
    context = browser.new_context(offline=True, viewport={"width": 1200, "height": 900})
    requests: list[str] = []
    context.on("request", lambda r: requests.append(r.url))
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(report.as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=20_000)
        tracks = page.eval_on_selector_all("#stream g.track", "gs => gs.map(g => g.dataset.worker)")
        assert tracks[0] == "driver" and set(tracks[1:]) == workers and len(workers) >= 2
        assert page.locator("#stream rect.task").count() == n
        assert page.locator("#graph g.node").count() == n
        assert page.locator("#graph line.fork-edge").count() == n - 13 - 1  # fib(6) forks 24 children; 12 + 1 roots
        assert "shown with its traceback" in page.inner_text("#failure-table")
        assert "raise_value_error" in page.inner_text("#failure-table")  # the remote frame
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        _keep(shot)
        assert not errors, errors
        assert [u for u in requests if not u.startswith("file:")] == []
    finally:
        context.close()
