"""The driver's project on a cluster of other hosts: network namespaces (tests/deploy/netns.py).

A broker host runs the broker and the drivers; two worker hosts (worker-a,
worker-b: own hostname, address and /dev/shm) run ``distfork worker`` in a
directory that has none of the drivers' code (it holds a decoy ``mylib`` of
its own), each with its own code cache. The drivers' ``mylib`` (a package
of two modules: a relative import, a class, a dataclass result) reaches
them only by code shipping.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from integration.codeproj import result_line, write_project

from conftest import cli_env, wait_until

from .netns import Lan

pytestmark = pytest.mark.timeout(120)


def test_a_local_package_reaches_two_worker_hosts_and_two_versions_never_mix(tmp_path: Path) -> None:
    lan = Lan(workers=2)
    reason = lan.unavailable()
    if reason:
        pytest.skip(reason)
    elsewhere = tmp_path / "elsewhere"
    write_project(elsewhere, 99)  # the workers' directory: a decoy mylib they would import by themselves
    with lan:
        address = f"tcp://{lan.broker.ip}:7340"
        # a private test network: the broker runs --insecure, so its clients use no keys either
        env = cli_env(DISTFORK_HEARTBEAT_S="0.2", DISTFORK_INSECURE="1")
        lan.start(lan.broker, sys.executable, "-m", "distfork", "broker", "--bind", address, "--insecure", env=env,
                  cwd=elsewhere, stderr=subprocess.DEVNULL)
        caches = []
        for host in lan.worker_hosts:
            cache = tmp_path / f"cache-{host.hostname}"
            caches.append(cache)
            lan.start(host, sys.executable, "-m", "distfork", "worker", "--connect", address, "--no-nanny",
                      env={**env, "DISTFORK_CODE_CACHE_DIR": str(cache)}, cwd=elsewhere)

        def workers() -> int:
            done = lan.run(lan.broker, sys.executable, "-m", "distfork", "status", "--address", address, "--json",
                           "--timeout", "2", env=env, timeout_s=30)
            return len(json.loads(done.stdout)["workers"]) if done.returncode == 0 else 0

        wait_until(lambda: workers() == 2, 30, interval_s=0.2, what="both worker hosts to register")

        v1 = write_project(tmp_path / "one", 1)
        v2 = write_project(tmp_path / "two", 2)
        drivers = [lan.start(lan.broker, sys.executable, str(script), address, "60", env=env, cwd=script.parent,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for script in (v1, v2)]
        outs, shown = [], []
        for p in drivers:
            out, err = p.communicate(timeout=100)
            assert p.returncode == 0, err
            outs.append(result_line(out))
            shown.append(out)
        one, two = outs

    assert one["versions"] == [1] and two["versions"] == [2]  # neither the other driver's nor the decoy
    for out in (one, two):
        assert out["all_areas"]  # the dataclass came back as the driver's own class
        assert out["values"] == [i * i for i in range(60)]
        assert out["doubled"] == [2 * i * i for i in range(60)]
        assert {host for host, _ in out["ran_on"]} == {"worker-a", "worker-b"}
    # What the tasks printed on the worker hosts is on each driver's terminal, prefixed with where it ran.
    for version, out, text in ((1, one, shown[0]), (2, two, shown[1])):
        for host, pid in out["ran_on"]:
            assert re.search(rf"^\(task \d+ {host}-{pid} host {host} pid {pid}\) area of \d+ by mylib v{version}$",
                             text, re.M), text[:2000]
        assert len([x for x in text.splitlines() if x.endswith(f"by mylib v{version}")]) == 120  # square, twice
        assert f"by mylib v{3 - version}" not in text
    for cache in caches:  # each host fetched each package once and keeps it by hash
        assert sorted(os.listdir(cache)) == sorted([one["package"], two["package"]])
