"""Memory stays bounded: a driver that forks many large arguments holds at most its window of them.

The bound (see ``Config.window_bytes``): ``fork`` blocks while the large
arguments of the driver's unfinished tasks would pass ``window_bytes`` (one
task is always let through, whatever its size). In /dev/shm the driver then
holds at most the arguments in flight plus its warm spares
(``Config.shm_spare_bytes``), and one more task while a spare is being made:

    segments of the session <= window_bytes + one task + shm_spare_bytes

Scaled down for a 2-core machine: 30 forks of 20 MB each (600 MB in all)
against a 60 MB window and 50 MB of spares. A thread in the driver samples
its bytes in flight and the session's segments in /dev/shm while it forks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env

from .support import write_script

pytestmark = pytest.mark.timeout(120)

FORKS = 30
TASK_BYTES = 20_000_000
WINDOW_BYTES = 60_000_000
SPARE_BYTES = 50_000_000

DRIVER = """
    import json, os, sys, threading, time
    import numpy as np
    import distfork, tasks

    forks, task_bytes = int(sys.argv[1]), int(sys.argv[2])
    distfork.init(workers=2)
    driver = distfork.api._runtime.driver
    deadline = time.monotonic() + 30
    while True:  # until the driver knows its workers share its /dev/shm
        probe = distfork.wait(distfork.fork(tasks.describe_data, np.ones(20_000)), timeout=60)
        if probe["backing"].startswith("/dev/shm/") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    prefix = f"df-{driver.welcome['session']}-"

    def shm_bytes():
        total = 0
        for name in os.listdir("/dev/shm"):
            if name.startswith(prefix):
                try:
                    total += os.stat(os.path.join("/dev/shm", name)).st_size
                except FileNotFoundError:
                    pass
        return total

    peak = {"inflight": 0, "shm": 0, "samples": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["inflight"] = max(peak["inflight"], driver._bytes_inflight)
            peak["shm"] = max(peak["shm"], shm_bytes())
            peak["samples"] += 1
            stop.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    futures = []
    for i in range(forks):
        a = np.full(task_bytes // 8, float(i))  # a different 20 MB array each time, dropped after the fork
        futures.append(distfork.fork(tasks.sum_slowly, a, 0.05))
        del a
    forked_s = time.monotonic() - started
    sums = distfork.wait_all(futures, timeout=120)
    stop.set()
    sampler.join()
    print(json.dumps({
        "ok": sums == [float(i) * (task_bytes // 8) for i in range(forks)],
        "window_bytes": distfork.api._runtime.config.window_bytes,
        "spare_bytes": distfork.api._runtime.config.shm_spare_bytes,
        "probe_backing": probe["backing"],
        "forked_s": forked_s,
        "total_s": time.monotonic() - started,
        **{f"peak_{k}": v for k, v in peak.items()},
    }), flush=True)
"""


def test_forking_many_large_arguments_holds_at_most_the_window(tmp_path: Path) -> None:
    script = write_script(tmp_path, DRIVER)
    env = cli_env(DISTFORK_WINDOW_BYTES=str(WINDOW_BYTES), DISTFORK_SHM_SPARE_BYTES=str(SPARE_BYTES))
    done = subprocess.run([sys.executable, str(script), str(FORKS), str(TASK_BYTES)], env=env,
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["ok"], "a task saw the wrong argument"
    assert (out["window_bytes"], out["spare_bytes"]) == (WINDOW_BYTES, SPARE_BYTES)
    assert out["probe_backing"].startswith("/dev/shm/"), "arguments did not go through shared memory"
    assert out["peak_samples"] > 10

    # The window was the limit: it filled up, and never overflowed.
    assert out["peak_inflight"] > WINDOW_BYTES - TASK_BYTES, (
        f"the driver never had more than {out['peak_inflight']} bytes in flight: the test did not fill "
        f"the {WINDOW_BYTES}-byte window, so it shows nothing")
    assert out["peak_inflight"] <= WINDOW_BYTES, (
        f"{out['peak_inflight']} bytes of large arguments were in flight at once, "
        f"more than window_bytes={WINDOW_BYTES}")
    bound = WINDOW_BYTES + TASK_BYTES + SPARE_BYTES
    assert out["peak_shm"] <= bound, (
        f"the session held {out['peak_shm']} bytes in /dev/shm at once, more than "
        f"window_bytes ({WINDOW_BYTES}) + one task ({TASK_BYTES}) + shm_spare_bytes ({SPARE_BYTES}) = {bound}; "
        f"without the window it could reach {FORKS * TASK_BYTES}")
