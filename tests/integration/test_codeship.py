"""The driver's code travels: a package next to the driver script reaches workers that run elsewhere.

Real processes through the CLI (``distfork broker``, ``distfork worker``) on
loopback; the workers run in another directory, each with a code cache of its
own (as two hosts would have), and that directory holds a *different*
``mylib`` of its own. The multi-host version (network namespaces, own
hostnames) is tests/deploy/test_codeship_multihost.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import cli_env, free_port, stop_processes
from distfork.status import query_status

from .codeproj import result_line, write_project
from .support import LineReader, start_script, wait_for_workers, write_script

pytestmark = pytest.mark.timeout(120)


class Cluster:
    def __init__(self, address: str, env: dict[str, str], procs: list[subprocess.Popen[bytes]],
                 caches: list[Path]) -> None:
        self.address, self.env, self.procs, self.caches = address, env, procs, caches


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A broker and two one-slot workers started in ``elsewhere/``, whose own mylib says version 99."""
    address = f"tcp://127.0.0.1:{free_port()}"
    env = cli_env(DISTFORK_HEARTBEAT_S="0.2")
    elsewhere = tmp_path / "elsewhere"
    write_project(elsewhere, 99)  # the worker's cwd is on its sys.path: a decoy mylib
    procs = [subprocess.Popen([sys.executable, "-m", "distfork", "broker", "--bind", address], env=env,
                              cwd=elsewhere)]
    caches = [tmp_path / f"cache-{i}" for i in range(2)]
    try:
        for cache in caches:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distfork", "worker", "--connect", address, "--no-nanny"],
                env={**env, "DISTFORK_CODE_CACHE_DIR": str(cache)}, cwd=elsewhere,
            ))
        wait_for_workers(address, 2)
        yield Cluster(address, env, procs, caches)
    finally:
        stop_processes(procs)


def run_driver(script: Path, address: str, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(script), address, *args], env=env, cwd=script.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result_of(p: subprocess.Popen[str]) -> dict:  # type: ignore[type-arg]
    out, err = p.communicate(timeout=100)
    assert p.returncode == 0, err
    return result_line(out)


def test_a_package_next_to_the_driver_runs_on_workers_that_do_not_have_it(cluster: Cluster, tmp_path: Path) -> None:
    script = write_project(tmp_path / "project", 1)
    out = result_of(run_driver(script, cluster.address, cluster.env))
    assert out["all_areas"]  # the dataclass made on the worker came back as the driver's class
    assert out["values"] == [i * i for i in range(20)]
    assert out["doubled"] == [2 * i * i for i in range(20)]
    assert out["versions"] == [1]  # never the worker's own mylib (99)
    assert out["package_names"] == ["mylib"]
    # Each "host" fetched the package once and keeps it by hash.
    for cache in cluster.caches:
        assert sorted(os.listdir(cache)) == [out["package"]]
        assert (cache / out["package"] / "mylib" / "shapes.py").exists()
        assert os.stat(cache).st_mode & 0o777 == 0o700


def test_two_drivers_with_two_versions_of_one_module_each_get_their_own(cluster: Cluster, tmp_path: Path) -> None:
    v1 = write_project(tmp_path / "one", 1)
    v2 = write_project(tmp_path / "two", 2)
    drivers = [run_driver(v1, cluster.address, cluster.env, "60"), run_driver(v2, cluster.address, cluster.env, "60")]
    one, two = (result_of(p) for p in drivers)
    assert one["versions"] == [1] and two["versions"] == [2]
    assert one["values"] == two["values"] == [i * i for i in range(60)]
    assert one["package"] != two["package"]
    # The isolation was exercised: a worker process ran tasks of both drivers.
    pids_one = {pid for _, pid in one["ran_on"]}
    pids_two = {pid for _, pid in two["ran_on"]}
    assert pids_one & pids_two, (one["ran_on"], two["ran_on"])
    for cache in cluster.caches:
        assert set(os.listdir(cache)) <= {one["package"], two["package"]}


def test_a_driver_that_ships_nothing_never_gets_the_package_another_driver_left_in_a_worker(
    cluster: Cluster, tmp_path: Path
) -> None:
    shipped = result_of(run_driver(write_project(tmp_path / "one", 1), cluster.address, cluster.env))
    assert shipped["versions"] == [1]
    # Shipping off: this driver's mylib (v2) is not sent; the workers' own (v99, in their directory) is
    # what its tasks must import, although every worker process still has v1 imported.
    off = run_driver(write_project(tmp_path / "two", 2), cluster.address, {**cluster.env, "DISTFORK_CODE_SHIP": "0"})
    out = result_of(off)
    assert out["versions"] == [99] and out["package"] is None
    assert {pid for _, pid in out["ran_on"]} & {pid for _, pid in shipped["ran_on"]}


MISSING = """
    import sys
    import distfork
    from ourlib import square

    distfork.init(sys.argv[1])
    try:
        distfork.wait(distfork.fork(square, 3), timeout=60)
    except distfork.SerializationError as exc:
        print(exc, flush=True)
"""


def test_with_shipping_off_a_missing_module_is_named_with_how_to_ship_or_install_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    (project / "ourlib").mkdir(parents=True)
    (project / "ourlib" / "__init__.py").write_text("def square(x):\n    return x * x\n")
    script = write_script(project, MISSING)
    p = subprocess.run([sys.executable, str(script), cluster.address], env={**cluster.env, "DISTFORK_CODE_SHIP": "0"},
                       cwd=project, capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stderr
    text = p.stdout
    assert "No module named 'ourlib'" in text
    assert "code=['ourlib']" in text and "DISTFORK_CODE=ourlib" in text and "pip install ourlib" in text
    for cache in cluster.caches:
        assert not cache.exists() or os.listdir(cache) == []  # nothing was shipped


def test_a_code_directory_given_to_init_is_shipped_though_the_driver_never_imported_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    write_project(tmp_path / "lib", 3)
    script = tmp_path / "main" / "run.py"
    script.parent.mkdir()
    script.write_text(
        "import sys, json, distfork\n"
        "def use():\n"
        "    import mylib\n"
        "    return mylib.square(4).value, mylib.VERSION\n"
        f"distfork.init(sys.argv[1], code=[{str(tmp_path / 'lib' / 'mylib')!r}])\n"
        "print('RESULT ' + json.dumps(distfork.wait(distfork.fork(use), timeout=60)))\n"
    )
    p = subprocess.run([sys.executable, str(script), cluster.address], env=cluster.env, cwd=script.parent,
                       capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stderr
    assert result_line(p.stdout) == [16, 3]
    assert re.search(r"^\(task 1 \S+ host \S+ pid \d+\) area of 4 by mylib v3$", p.stdout, re.M), p.stdout
    assert query_status(cluster.address)["workers"]


RESTART = """
    import json, os, sys
    import distfork
    from mylib import VERSION, square

    distfork.init(sys.argv[1])
    print(json.dumps([distfork.fork(square, 3).result(timeout=60).value]), flush=True)
    sys.stdin.readline()  # the broker is restarted, a worker with an empty code cache joins
    fresh = distfork.options(labels={"fresh": "yes"})
    areas = [f.result(timeout=60) for f in [fresh.fork(square, i) for i in range(5)]]
    print(json.dumps([[a.value, a.version, a.pid] for a in areas]), flush=True)
"""


def test_after_a_broker_restart_the_driver_ships_its_package_again(cluster: Cluster, tmp_path: Path) -> None:
    write_project(tmp_path / "project", 1)
    script = write_script(tmp_path / "project", RESTART, "restart.py")
    driver = start_script(script, cluster.address, env=cluster.env, cwd=script.parent)
    try:
        out = LineReader(driver.stdout)
        line = out.next(60)
        while line.startswith("(task"):  # the task's own line, shown with where it ran
            line = out.next(60)
        assert json.loads(line) == [9]
        broker = cluster.procs[0]
        broker.send_signal(signal.SIGKILL)  # the new broker knows no package
        broker.wait(10)
        cluster.procs[0] = subprocess.Popen([sys.executable, "-m", "distfork", "broker", "--bind", cluster.address],
                                            env=cluster.env)
        fresh_cache = tmp_path / "fresh-cache"
        fresh = subprocess.Popen(
            [sys.executable, "-m", "distfork", "worker", "--connect", cluster.address, "--no-nanny", "--label",
             "fresh=yes"], env={**cluster.env, "DISTFORK_CODE_CACHE_DIR": str(fresh_cache)}, cwd=tmp_path)
        cluster.procs.append(fresh)
        wait_for_workers(cluster.address, 3, timeout_s=30)
        assert driver.stdin is not None
        driver.stdin.write("go\n")
        driver.stdin.flush()
        line = out.next(60)
        while line.startswith("(task"):
            line = out.next(60)
        got = json.loads(line)
        assert [(v, ver) for v, ver, _ in got] == [(i * i, 1) for i in range(5)]
        assert {pid for _, _, pid in got} == {fresh.pid}
        assert len(os.listdir(fresh_cache)) == 1  # fetched from the new broker
    finally:
        stop_processes([driver])
