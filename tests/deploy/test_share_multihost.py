"""``distfork.share`` across hosts: network namespaces (tests/deploy/netns.py).

A broker host runs the broker and the driver; a worker host (its own
address and /dev/shm) runs one ``distfork worker`` with two processes. The
driver shares an 8 MB array and forks with the handle: the bytes cross to
the worker host once (the broker counts what it relays), whichever of its
processes runs the tasks, and the results are right; ``release()`` frees the
host's copy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env, wait_until

from .netns import Lan

pytestmark = pytest.mark.timeout(60)

DRIVER = """
import json, os, sys, time
import numpy as np
import distfork
from distfork.status import query_status


def total(a):
    from distfork import sharecache
    return float(a.sum()), os.getpid(), sharecache.stats()["fetches"], a.flags.writeable


def host_copies(suffix):
    from distfork import shared
    names = sorted(n for n in os.listdir("/dev/shm") if n.endswith(suffix))
    return os.getpid(), names, [k for k in shared.cached_names() if k.startswith("k:")]


address = sys.argv[1]
distfork.init(address)
a = np.arange(1_000_000, dtype=np.float64)  # 8 MB
h = distfork.share(a)
first = distfork.wait_all([distfork.fork(total, h) for _ in range(2)], timeout=30)  # at once, both processes
more = distfork.wait_all([distfork.fork(total, h) for _ in range(4)], timeout=30)
counters = query_status(address)["counters"]
suffix = "-" + h.key[:16]
held = distfork.wait(distfork.fork(host_copies, suffix), 30)
local_segment = h.name
h.release()
deadline = time.monotonic() + 10
while True:
    after = [distfork.wait(distfork.fork(host_copies, suffix), 30) for _ in range(2)]
    if all(not names and not keys for _, names, keys in after) or time.monotonic() > deadline:
        break
    time.sleep(0.05)
out = {"results": first + more, "expected": float(a.sum()), "nbytes": h.nbytes, "counters": counters,
       "held": held, "after": after, "local_segment_left": os.path.exists("/dev/shm/" + local_segment)}
distfork.shutdown()
print(json.dumps(out), flush=True)
"""


CRASHING_DRIVER = """
import json, os, sys
import numpy as np
import distfork

distfork.init(sys.argv[1])
h = distfork.share(np.ones(500_000))
assert distfork.wait(distfork.fork(np.sum, h), 30) == 500_000
print(json.dumps({"suffix": "-" + h.key[:16], "segment": h.name}), flush=True)
os._exit(0)  # no release, no goodbye: as if killed
"""

PROBE = """
import json, os, sys, time
import distfork


def host_copies(suffix):
    from distfork import shared
    names = sorted(n for n in os.listdir("/dev/shm") if n.endswith(suffix))
    return names, [k for k in shared.cached_names() if k.startswith("k:" + suffix[1:])]


distfork.init(sys.argv[1])
deadline = time.monotonic() + 10
while True:
    left = distfork.wait_all([distfork.fork(host_copies, sys.argv[2]) for _ in range(2)], timeout=30)
    if not any(names or keys for names, keys in left) or time.monotonic() > deadline:
        break
    time.sleep(0.05)
print(json.dumps(left), flush=True)
"""


def test_a_shared_array_crosses_to_another_host_once_and_its_release_frees_the_copy_there(tmp_path: Path) -> None:
    lan = Lan(workers=1, hostnames=False)
    reason = lan.unavailable()
    if reason:
        pytest.skip(reason)
    script = tmp_path / "share_driver.py"
    script.write_text(DRIVER)
    with lan:
        address = f"tcp://{lan.broker.ip}:7340"
        env = cli_env(DISTFORK_HEARTBEAT_S="0.2", DISTFORK_INSECURE="1")  # a private test network: no keys
        lan.start(lan.broker, sys.executable, "-m", "distfork", "broker", "--bind", address, "--insecure", env=env,
                  stderr=subprocess.DEVNULL)
        (host,) = lan.worker_hosts
        lan.start(host, sys.executable, "-m", "distfork", "worker", "--connect", address, "--processes", "2",
                  env=env)

        def workers() -> int:
            done = lan.run(lan.broker, sys.executable, "-m", "distfork", "status", "--address", address, "--json",
                           "--timeout", "2", env=env, timeout_s=30)
            return len(json.loads(done.stdout)["workers"]) if done.returncode == 0 else 0

        wait_until(lambda: workers() == 2, 30, interval_s=0.2, what="both worker processes to register")
        done = lan.run(lan.broker, sys.executable, str(script), address, env=env, timeout_s=45)
        # A driver that dies without a word: when the broker sees it gone, the host's copy goes too.
        crash, probe = tmp_path / "crash.py", tmp_path / "probe.py"
        crash.write_text(CRASHING_DRIVER)
        probe.write_text(PROBE)
        crashed = lan.run(lan.broker, sys.executable, str(crash), address, env=env, timeout_s=45)
        assert crashed.returncode == 0, crashed.stderr
        suffix = json.loads(crashed.stdout.strip().splitlines()[-1])["suffix"]
        probed = lan.run(lan.broker, sys.executable, str(probe), address, suffix, env=env, timeout_s=45)
        assert probed.returncode == 0, probed.stderr
        assert json.loads(probed.stdout.strip().splitlines()[-1]) == [[[], []], [[], []]]
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])

    assert [r[0] for r in out["results"]] == [out["expected"]] * 6
    assert not any(r[3] for r in out["results"])  # read-only by contract, on this host too
    # The 8 MB crossed once: one fetch relayed by the broker, by one process of the host.
    assert out["counters"]["share_fetches"] == 1
    assert out["counters"]["share_bytes"] == out["nbytes"] >= 8_000_000
    fetches = {pid: n for _, pid, n, _ in out["results"]}
    assert sum(fetches.values()) == 1, fetches
    _, names, keys = out["held"]
    assert len(names) == 1 and len(keys) == 1  # the host's one copy, and the object built on it
    # release(): the host's copy and the workers' objects go; so does the driver's segment.
    for _, names, keys in out["after"]:
        assert names == [] and keys == []
    assert not out["local_segment_left"]
