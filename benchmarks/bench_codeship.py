"""One-time cost of shipping a driver's project to the workers, and the per-fork cost afterwards.

    python benchmarks/bench_codeship.py [--mb 5] [--workers 2]

Starts ``distfork broker`` and N ``distfork worker`` processes (each with a
code cache of its own, as N hosts), writes a project of about ``--mb`` MB of
Python source next to a driver, and times in the driver: building the
package (zip + sha256), the first wave of one task per worker (upload to the
broker, every worker fetches, unzips, imports), and a second wave (cached:
only the hash travels). Noisy machine: compare the waves of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import string
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

DRIVER = """
import json, sys, time
t0 = time.perf_counter()
import bigproj  # noqa: E402  (the project: about MB of source)
import distfork
from distfork import codeship

distfork.init(sys.argv[1])
n = int(sys.argv[2])
shipper = distfork.api._runtime.driver.shipper
t = time.perf_counter(); shipper.ref(); build = time.perf_counter() - t
def wave():
    t = time.perf_counter()
    pids = {f.result(timeout=120) for f in [distfork.fork(bigproj.slow_pid, 0.3) for _ in range(n)]}
    return time.perf_counter() - t, len(pids)
first, hit1 = wave()
second, hit2 = wave()
print(json.dumps({"bytes": len(shipper.package.data), "build": build, "first": first, "second": second,
                  "workers_hit": [hit1, hit2]}))
distfork.shutdown()
"""


def write_project(root: Path, mb: float) -> None:
    pkg = root / "bigproj"
    pkg.mkdir(parents=True)
    rng = random.Random(1)
    size, i = 0, 0
    while size < mb * 1e6:
        lines = [f"def f{j}_{''.join(rng.choices(string.ascii_lowercase, k=8))}(x):\n    return x + {j}\n"
                 for j in range(1000)]
        text = "".join(lines)
        (pkg / f"mod{i}.py").write_text(text)
        size += len(text)
        i += 1
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import os, time
        def slow_pid(s):
            time.sleep(s)
            return os.getpid()
    """))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_project(root / "project", a.mb)
        (root / "project" / "driver.py").write_text(DRIVER)
        (root / "elsewhere").mkdir()
        env = dict(os.environ)
        procs = [subprocess.Popen([sys.executable, "-m", "distfork", "broker", "--bind", address], env=env,
                                  cwd=root / "elsewhere")]
        try:
            for i in range(a.workers):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "distfork", "worker", "--connect", address, "--no-nanny"],
                    env={**env, "DISTFORK_CODE_CACHE_DIR": str(root / f"cache{i}")}, cwd=root / "elsewhere"))
            time.sleep(1.0)
            done = subprocess.run([sys.executable, "driver.py", address, str(a.workers)], cwd=root / "project",
                                  env=env, capture_output=True, text=True, timeout=300)
            if done.returncode:
                raise SystemExit(done.stderr)
            r = json.loads(done.stdout)
        finally:
            for p in reversed(procs):  # workers first: they say goodbye to the broker
                p.terminate()
            for p in procs:
                p.wait(10)
    print(f"code shipping: {a.mb:g} MB project -> {r['bytes'] / 1e6:.2f} MB package, built in {r['build']:.3f} s; "
          f"first wave (one 0.3 s task per worker, {a.workers} workers: upload, fetch, unzip, import) "
          f"{r['first']:.3f} s, second wave (cached) {r['second']:.3f} s: one-time cost "
          f"{r['build'] + r['first'] - r['second']:.3f} s; workers hit {r['workers_hit']}")


if __name__ == "__main__":
    main()
