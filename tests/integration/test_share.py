"""``distfork.share``: a large value copied into shared memory once, forked with again and again.

Each fork sends a reference, not the bytes; each worker unpickles the value
once and reuses it while it is unchanged; a task's writes never reach the
next task (torch: the version counter; numpy: arrays arrive read-only); the
driver owns the segment and nothing is left in /dev/shm after release, a
killed worker, or exit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import distfork
from conftest import cli_env, wait_until
from distfork import serialize
from distfork import shared as share_mod

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("shared_cluster")]

T = 30.0
THRESHOLD = 64 * 1024


def segment_exists(name: str | None) -> bool:
    return name is not None and os.path.exists(os.path.join("/dev/shm", name))


def ident(obj: Any) -> tuple[int, int]:
    return os.getpid(), id(obj)


def add_one_in_place_and_sum(t: Any) -> float:
    t.add_(1)
    return float(t.sum())


def writeable(a: Any) -> bool:
    return bool(a.flags.writeable)


def write_first(a: Any) -> None:
    a[0] = 5


def cached_on_each(gate_dir: str, n: int) -> tuple[int, list[str]]:
    """On ``n`` different workers at once: after a share lookup, the segments this worker caches."""
    open(os.path.join(gate_dir, str(os.getpid())), "w").close()
    deadline = time.monotonic() + T
    while len(os.listdir(gate_dir)) < n and time.monotonic() < deadline:
        time.sleep(0.005)
    with share_mod._lock:
        share_mod._drop_released()
    return os.getpid(), share_mod.cached_names()


def pickled_call(func: Any, *args: Any) -> list[Any]:
    """The frames ``fork(func, *args)`` sends from here (to workers that share our /dev/shm)."""
    rt = distfork.api._runtime
    assert rt is not None
    serialize._local.share_copy = rt.share_copy()
    assert serialize._local.share_copy is not None, "the shared cluster's workers share our /dev/shm"
    share_mod._forking.driver = rt.driver
    try:
        return serialize.dumps_call(func, args, {}, THRESHOLD)
    finally:
        serialize._local.share_copy = None
        share_mod._forking.driver = None


def test_forks_of_a_shared_value_send_a_reference_not_its_bytes() -> None:
    a = np.arange(200_000, dtype=np.float64)  # 1.6 MB
    with distfork.share(a) as h:
        assert distfork.wait_all([distfork.fork(np.sum, h) for _ in range(6)], timeout=T) == [a.sum()] * 6
        assert segment_exists(h.name) and h.nbytes >= a.nbytes
        frames = pickled_call(np.sum, h)
        assert serialize.oob_bytes(frames) == 0 and len(frames[0]) < 4096
    assert not segment_exists(h.name)


def test_a_shared_callable_runs_as_the_function_of_a_fork() -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    m = torch.nn.Linear(300, 300)
    x = torch.randn(4, 300)
    with distfork.share(m) as h:
        outs = distfork.wait_all([distfork.fork(h, x) for _ in range(4)], timeout=T)
        assert all(torch.allclose(o, m(x)) for o in outs)
        assert torch.allclose(h(x), m(x))  # called here, it is the model itself


def test_each_worker_unpickles_a_shared_value_once_and_reuses_it() -> None:
    with distfork.share(np.ones(100_000)) as h:
        seen = distfork.wait_all([distfork.fork(ident, h) for _ in range(12)], timeout=T)
    ids_by_pid: dict[int, set[int]] = {}
    for pid, obj_id in seen:
        ids_by_pid.setdefault(pid, set()).add(obj_id)
    assert all(len(ids) == 1 for ids in ids_by_pid.values()), ids_by_pid


def test_a_tasks_in_place_write_to_a_shared_tensor_never_reaches_the_next_task() -> None:
    torch = pytest.importorskip("torch")
    t = torch.zeros(100_000)
    with distfork.share(t) as h:
        sums = [distfork.wait(distfork.fork(add_one_in_place_and_sum, h), T) for _ in range(6)]
    assert sums == [100_000.0] * 6
    assert float(t.sum()) == 0.0


def test_numpy_arrays_of_a_shared_value_arrive_read_only() -> None:
    with distfork.share({"w": np.ones(100_000)}) as h:
        assert distfork.wait(distfork.fork(lambda d: writeable(d["w"]), h), T) is False
        with pytest.raises(ValueError, match="read-only"):
            distfork.wait(distfork.fork(lambda d: write_first(d["w"]), h), T)


def test_a_released_value_cannot_be_forked_and_workers_drop_it(tmp_path: Path) -> None:
    h = distfork.share(np.ones(100_000))
    distfork.wait_all([distfork.fork(np.sum, h) for _ in range(6)], timeout=T)
    name = h.name
    h.release()
    assert not segment_exists(name)
    with pytest.raises(distfork.DistforkError, match="was released"):
        distfork.fork(np.sum, h)
    results = distfork.wait_all([distfork.fork(cached_on_each, str(tmp_path), 2) for _ in range(2)], timeout=T)
    assert len({pid for pid, _ in results}) == 2
    assert all(name not in names for _, names in results)


def test_a_small_value_is_passed_by_value() -> None:
    h = distfork.share([1, 2, 3])
    assert distfork.wait(distfork.fork(sum, h), T) == 6
    assert h.name is None and "by value" in repr(h)


SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import distfork
    from distfork.status import query_status

    distfork.init(workers=1)
    rt = distfork.api._runtime
    print("session", rt.cluster.session, flush=True)
    h = distfork.share(np.ones(200_000))
    print("segment", h.name, flush=True)
    assert distfork.wait(distfork.fork(np.sum, h), 30) == 200_000
    victim = query_status(rt.cluster.address)["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)  # a worker of the cluster this script started, holding the value
    assert distfork.wait(distfork.fork(np.sum, h), 30) == 200_000  # its replacement maps it anew
    print("segment still there", os.path.exists("/dev/shm/" + h.name), flush=True)
    # exit without release: the handle is released at exit, the cluster sweeps its session
""")


def test_a_shared_value_survives_a_killed_worker_and_nothing_is_left_after_exit(tmp_path: Path) -> None:
    script = tmp_path / "share_script.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script)], env=cli_env(), capture_output=True, text=True, timeout=T * 2)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert "segment still there True" in out.stdout
    session = lines["session"].strip()
    wait_until(lambda: not [n for n in os.listdir("/dev/shm") if n.startswith(f"df-{session}-")], 10.0,
               what="the script's segments to go")
    assert not segment_exists(lines["segment"].strip())


# -- forks of the same parameters again and again, without share() ----------------------


def copies() -> set[str]:
    """The driver's copies of parameters / read-only arrays that exist in /dev/shm."""
    rt = distfork.api._runtime
    assert rt is not None
    return {n for n in (rt.copies.names() if rt.copies else set()) if segment_exists(n)}


def forward_and_ident(m: Any, x: Any) -> tuple[Any, int, list[int]]:
    return m(x), os.getpid(), [id(p) for p in m.parameters()]


def test_forking_an_unchanged_model_again_copies_its_weights_once() -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    m = torch.nn.Linear(800, 800)  # 2.5 MB of weights: above share_min_bytes
    x = torch.randn(2, 800)
    before = copies()
    distfork.wait(distfork.fork(forward_and_ident, m, x), T)
    assert copies() == before  # first sight: the usual path
    first = distfork.wait(distfork.fork(forward_and_ident, m, x), T)
    made = copies() - before
    assert len(made) == 1, made  # the weight, unchanged since (the bias is small: it travels as before)
    rt = distfork.api._runtime
    assert rt is not None and rt.copies is not None
    frames = pickled_call(forward_and_ident, m, x)
    assert serialize.oob_bytes(frames) == 0  # a reference, not the 2.5 MB
    outs = [distfork.wait(distfork.fork(forward_and_ident, m, x), T) for _ in range(6)]
    assert copies() - before == made  # no new copy
    assert all(torch.allclose(o[0], m(x)) for o in [first, *outs])
    weight_ids: dict[int, set[int]] = {}
    for _, pid, ids in [first, *outs]:
        weight_ids.setdefault(pid, set()).add(ids[0])
    assert all(len(ids) == 1 for ids in weight_ids.values())  # each worker reused its tensor


def test_a_model_changed_between_forks_is_copied_again_and_the_task_sees_the_change() -> None:
    torch = pytest.importorskip("torch")
    m = torch.nn.Linear(800, 800, bias=False)
    x = torch.ones(1, 800)
    before = copies()
    distfork.wait(distfork.fork(m, x), T)
    a = distfork.wait(distfork.fork(m, x), T)
    first = copies() - before
    assert len(first) == 1
    with torch.no_grad():
        m.weight.add_(1.0)  # bumps the version counter
    b = distfork.wait(distfork.fork(m, x), T)
    assert torch.allclose(b, m(x)) and not torch.allclose(a, b)
    assert copies() - before == set()  # the old copy was unlinked; a changed weight takes the usual path
    distfork.wait(distfork.fork(m, x), T)
    second = copies() - before
    assert len(second) == 1 and second != first  # unchanged again: a new copy
    m.weight.data.mul_(2.0)  # bypasses the version counter: the byte sample catches it
    c = distfork.wait(distfork.fork(m, x), T)
    assert torch.allclose(c, m(x))
    assert copies() - before == set()
    del m
    import gc

    gc.collect()
    assert copies() - before == set()  # the copy went with the parameter


def test_a_read_only_array_is_copied_once_and_a_writable_one_every_time() -> None:
    ro = np.arange(300_000, dtype=np.float64)
    ro.flags.writeable = False
    before = copies()
    assert distfork.wait_all([distfork.fork(writeable, ro) for _ in range(4)], timeout=T) == [False] * 4
    assert len(copies() - before) == 1
    rw = np.arange(300_000, dtype=np.float64)
    assert distfork.wait(distfork.fork(np.sum, rw), T) == rw.sum()
    assert len(copies() - before) == 1  # the writable one was not kept
    del ro
    assert copies() - before == set()


def grad_of_weight(m: Any, x: Any) -> tuple[int, Any]:
    m(x).sum().backward()
    return os.getpid(), m.weight.grad


def test_gradients_a_task_computes_on_a_reused_parameter_do_not_accumulate_into_the_next_task() -> None:
    torch = pytest.importorskip("torch")
    m = torch.nn.Linear(800, 800)
    x = torch.ones(1, 800)
    results = [distfork.wait(distfork.fork(grad_of_weight, m, x), T) for _ in range(6)]
    assert all(torch.equal(g, results[0][1]) for _, g in results)
    assert torch.equal(results[0][1], torch.ones(800, 800))


def test_sharing_a_model_forked_before_puts_all_its_bytes_in_the_handles_segment() -> None:
    torch = pytest.importorskip("torch")
    m = torch.nn.Linear(800, 800)  # its weight has a copy of its own once forked
    x = torch.ones(1, 800)
    distfork.wait(distfork.fork(m, x), T)
    with distfork.share(m) as h:
        outs = [distfork.wait(distfork.fork(h, x), T) for _ in range(3)]
        assert h.name is not None and h.nbytes >= 800 * 800 * 4  # not references to the other copy
    assert all(torch.allclose(o, m(x)) for o in outs)


def test_once_a_parameter_is_copied_no_warm_spare_of_its_size_is_kept() -> None:
    torch = pytest.importorskip("torch")
    m = torch.nn.Linear(800, 800, bias=False)  # 2.56 MB: above share_min_bytes
    x = torch.ones(1, 800)
    rt = distfork.api._runtime
    assert rt is not None and rt.driver is not None
    pool = rt.driver._segments
    assert pool is not None
    weight = 800 * 800 * 4
    distfork.wait(distfork.fork(m, x), T)  # first sight: the weight travels in an argument segment
    wait_until(lambda: pool.stats()["largest"] >= weight, 10.0, what="a warm spare the size of the weight")
    before = copies()
    out = distfork.wait(distfork.fork(m, x), T)  # second sight: a copy, and the spares that large retire
    assert torch.allclose(out, m(x))
    assert len(copies() - before) == 1
    wait_until(lambda: pool.stats()["largest"] < weight, 10.0, what="the spares of the weight's size to go")
    distfork.wait(distfork.fork(m, x), T)
    assert pool.stats()["largest"] < weight  # and none comes back while the model goes by reference
    with torch.no_grad():
        m.weight.add_(1.0)  # changed: the argument path again, its spares warm again
    assert torch.allclose(distfork.wait(distfork.fork(m, x), T), m(x))
    wait_until(lambda: pool.stats()["largest"] >= weight, 10.0, what="spares for the changed weight")


# -- a module returned by a task, held in the cluster, taken by many forks ----------------


def build_linear(n: int) -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Linear(n, n)


def forward_ident(m: Any, x: Any) -> tuple[Any, int, int, bool]:
    return m(x), os.getpid(), id(m), m.training


def change_it(m: Any, how: str) -> int:
    import torch

    if how == "weight":
        with torch.no_grad():
            m.weight.add_(1.0)
    else:
        m.eval()
    return os.getpid()


def test_a_held_module_is_built_once_per_worker_and_a_tasks_change_never_reaches_the_next() -> None:
    torch = pytest.importorskip("torch")
    x = torch.ones(2, 600)
    fm = distfork.fork(build_linear, 600)  # 1.4 MB of weights: its result stays in a segment
    outs = distfork.wait_all([distfork.fork(forward_ident, fm, x) for _ in range(4)], timeout=T)
    assert fm.held
    outs += [distfork.wait(distfork.fork(forward_ident, fm, x), T) for _ in range(6)]
    expected = build_linear(600)(x)
    assert all(torch.allclose(o[0], expected) for o in outs)
    ids: dict[int, set[int]] = {}
    for _, pid, obj_id, _ in outs:
        ids.setdefault(pid, set()).add(obj_id)
    assert all(len(s) == 1 for s in ids.values()), ids  # each worker built it once
    for how in ("weight", "mode"):
        distfork.wait(distfork.fork(change_it, fm, how), T)
        later = [distfork.wait(distfork.fork(forward_ident, fm, x), T) for _ in range(4)]
        assert all(torch.allclose(o[0], expected) and o[3] for o in later)  # unchanged, in training mode
