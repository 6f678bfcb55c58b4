"""The data plane: what a task receives and returns is what was sent, bit for bit, through shared memory.

One embedded cluster of two workers serves the whole module, with the
out-of-band threshold lowered to 1 KiB (``init(oob_threshold_bytes=1024)``)
so that the small arrays hypothesis draws still leave the pickle stream and
travel through /dev/shm segments. Tasks describe what they received with
``tasks.describe_data``: dtype, layout, a sha256 of the exact bits, and which
mapping of /proc/self/maps holds the data (a ``/dev/shm/df-<session>-<pid>-<n>``
segment, or anonymous memory).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import distfork
import tasks
from conftest import _alive, _shm_segments, wait_until
from distfork import shm

from .support import embedded_cluster, embedded_ready

pytestmark = pytest.mark.timeout(150)

THRESHOLD = 1024  # bytes: buffers at least this large go out of band
N_WORKERS = 2
PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def named_for_us(path: str) -> bool:
    """A segment handed over to this process (its name ends with our pid and start time)."""
    n = shm.parse(os.path.basename(path))
    return n is not None and n.owner == os.getpid()


class Cluster:
    """Facts about the module's embedded cluster."""

    def __init__(self, session: str, worker_pids: list[int]) -> None:
        self.session = session
        self.worker_pids = worker_pids
        self.driver_prefix = f"/dev/shm/df-{session}-{os.getpid()}-"

    def segment_of(self, pid: int) -> str:
        return f"/dev/shm/df-{self.session}-{pid}-"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    distfork.init(workers=N_WORKERS, oob_threshold_bytes=THRESHOLD)
    lc = embedded_cluster()
    procs = [psutil.Process(pid) for pid in lc.pids]
    session = lc.session
    try:
        worker_pids = embedded_ready(N_WORKERS)
        facts = Cluster(session, worker_pids)
        # The driver learns that workers share its /dev/shm from the broker, a
        # moment after they registered: until then arguments go as frames.
        probe = np.arange(THRESHOLD, dtype=np.uint8)
        wait_until(lambda: remote(probe)["backing"].startswith(facts.driver_prefix), 20,
                   what="arguments to travel through shared memory")
        yield facts
    finally:
        distfork.shutdown()
    left = [p.pid for p in procs if _alive(p)]
    assert not left, f"the module's cluster left processes running: {left}"
    left_shm = sorted(n for n in _shm_segments() if n.startswith(f"df-{session}-"))
    assert not left_shm, f"the module's cluster left shared-memory segments: {left_shm}"


def remote(x: Any) -> dict[str, Any]:
    """``describe_data`` of ``x`` as a worker received it."""
    return distfork.wait(distfork.fork(tasks.describe_data, x), timeout=30)


def echo(x: Any) -> Any:
    return distfork.wait(distfork.fork(tasks.identity, x), timeout=30)


def same_data(got: dict[str, Any], sent: dict[str, Any]) -> None:
    """Type, dtype, shape, strides (tensors), requires_grad and every bit agree."""
    keys = ("type", "dtype", "shape", "stride", "requires_grad", "sha256")
    assert {k: got.get(k) for k in keys} == {k: sent.get(k) for k in keys}


# -- numpy ---------------------------------------------------------------------

STRUCTURED = [
    np.dtype([("a", "<i4"), ("b", "<f8"), ("c", "u1", (3,))]),
    np.dtype([("x", ">u2"), ("y", "<c8")], align=True),
]
DTYPES = st.one_of(
    hnp.integer_dtypes(),
    hnp.unsigned_integer_dtypes(),
    hnp.floating_dtypes(),
    hnp.complex_number_dtypes(),
    hnp.boolean_dtypes(),
    hnp.datetime64_dtypes(),
    st.sampled_from(STRUCTURED),
)
LAYOUTS = ["C", "F", "transpose", "step", "reverse"]


@st.composite
def numpy_arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays of many dtypes, 0-d and empty included, in C or Fortran order or as strided views."""
    dtype = draw(DTYPES)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=24))
    base = draw(hnp.arrays(dtype, shape, unique=False))
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "F":
        return np.asfortranarray(base)
    if layout == "transpose":
        return base.T
    if layout == "step":
        return base[::2] if base.ndim else base
    if layout == "reverse":
        return base[..., ::-1] if base.ndim else base
    return base


def goes_out_of_band(a: np.ndarray) -> bool:
    """Whether this array's bytes must leave the pickle stream (and so travel through /dev/shm here).

    Large enough, and no Python objects in it. datetime64 arrays are the
    exception numpy makes: its pickle keeps them in band whatever their size.
    """
    return a.nbytes >= THRESHOLD and not a.dtype.hasobject and a.dtype.kind not in "mM"


def same_array(got: dict[str, Any], a: np.ndarray) -> None:
    """``got`` describes ``a`` exactly; datetime64 values may come in native byte order.

    numpy's own pickle of a datetime64 array (always in band) rebuilds it in
    native byte order: the same values, not the same bytes.
    """
    if a.dtype.kind in "mM" and not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    same_data(got, tasks.describe_data(a))


@PROPERTY
@given(a=numpy_arrays())
def test_numpy_array_arrives_as_sent(cluster: Cluster, a: np.ndarray) -> None:
    got = remote(a)
    same_array(got, a)
    assert got["writeable"]
    if goes_out_of_band(a):
        assert got["backing"].startswith(cluster.driver_prefix), got["backing"]
    if a.flags.c_contiguous or a.flags.f_contiguous:
        assert (got["c"], got["f"]) == (a.flags.c_contiguous, a.flags.f_contiguous)


@PROPERTY
@given(a=numpy_arrays())
def test_numpy_array_comes_back_as_sent(cluster: Cluster, a: np.ndarray) -> None:
    back = echo(a)
    got = tasks.describe_data(back)
    same_array(got, a)
    assert back.flags.writeable
    if goes_out_of_band(a):
        # A worker's segment, named for this driver (swept if we die) until we drop the array.
        assert named_for_us(got["backing"]), got["backing"]
        assert any(got["backing"].startswith(cluster.segment_of(pid)) for pid in cluster.worker_pids), got["backing"]
    if a.flags.c_contiguous or a.flags.f_contiguous:
        assert (back.flags.c_contiguous, back.flags.f_contiguous) == (a.flags.c_contiguous, a.flags.f_contiguous)


def test_object_arrays_are_pickled_in_band_and_round_trip(cluster: Cluster) -> None:
    a = np.empty(3000, dtype=object)  # far above the threshold in pointers alone
    a[:] = [(i, f"item {i}", [i] * (i % 4)) for i in range(3000)]
    got = remote(a)
    assert got["type"] == "ndarray" and got["dtype"] == "|O" and got["shape"] == (3000,)
    assert got["backing"] is not None and not got["backing"].startswith("/dev/shm/")  # built by unpickling
    back = echo(a)
    assert back.dtype == object and back.shape == a.shape
    assert back.tolist() == a.tolist()
    back[0] = "mine"  # writable


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview"])
def test_large_bytes_like_arguments_round_trip(cluster: Cluster, kind: str) -> None:
    raw = np.random.default_rng(7).bytes(3 * 1024 * 1024 + 5)
    arg = {"bytes": raw, "bytearray": bytearray(raw), "memoryview": memoryview(raw)}[kind]
    got = remote(arg)
    assert got["nbytes"] == len(raw) and got["sha256"] == tasks.describe_data(raw)["sha256"]
    back = echo(arg)
    assert bytes(back) == raw
    assert type(back) is (bytearray if kind == "bytearray" else bytes)  # a memoryview comes back as bytes


def test_large_buffers_nested_in_small_looking_containers_travel_through_shared_memory(cluster: Cluster) -> None:
    # The driver skips its walk for large bytes when a call looks small: this one does not.
    arr = np.arange(1 << 17, dtype=np.float64)  # 1 MiB
    raw = np.random.default_rng(3).bytes(1 << 20)
    got = distfork.wait(distfork.fork(tasks.describe_at, {"k": (1, "x", arr), "n": None}, "k", 2))
    assert got["sha256"] == tasks.describe_data(arr)["sha256"]
    assert got["backing"].startswith(cluster.driver_prefix), got["backing"]
    # bytes are rebuilt as a copy, off the segment: their trip through it is test_serialize's to see
    got = distfork.wait(distfork.fork(tasks.describe_at, {"b": (2, raw)}, "b", 1))
    assert got["type"] == "bytes" and got["sha256"] == tasks.describe_data(raw)["sha256"]


# -- torch ---------------------------------------------------------------------

TORCH_DTYPES = ["float32", "float64", "int64", "bool", "bfloat16", "float16"]


@st.composite
def torch_tensors(draw: st.DrawFn) -> Any:
    """CPU tensors of several dtypes, contiguous, transposed, sliced, offset or expanded; some requiring grad."""
    torch = pytest.importorskip("torch")
    name = draw(st.sampled_from(TORCH_DTYPES))
    source = {"bfloat16": "float32", "bool": "bool"}.get(name, name)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=24))
    values = draw(hnp.arrays(np.dtype(source), shape))
    t = torch.from_numpy(values.copy()).to(getattr(torch, name))
    if t.is_floating_point() and draw(st.booleans()):
        t.requires_grad_(True)
    layout = draw(st.sampled_from(["contiguous", "transpose", "step", "offset", "expand"]))
    if layout == "transpose" and t.dim() >= 2:
        t = t.transpose(0, t.dim() - 1)
    elif layout == "step" and t.dim() >= 1:
        t = t[::2]
    elif layout == "offset" and t.dim() >= 1:
        t = t[1:]
    elif layout == "expand":
        t = t.unsqueeze(0).expand(3, *t.shape)
    return t


@PROPERTY
@given(t=torch_tensors())
def test_torch_tensor_arrives_and_comes_back_as_sent(cluster: Cluster, t: Any) -> None:
    sent = tasks.describe_data(t)
    got = remote(t)
    same_data(got, sent)  # dtype, shape, strides, requires_grad and bits
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    if t.numel() and t.element_size() * span >= THRESHOLD:
        assert got["backing"].startswith(cluster.driver_prefix), got["backing"]
    back = echo(t)
    back_desc = tasks.describe_data(back)
    same_data(back_desc, sent)
    if got["backing"] is not None and got["backing"].startswith("/dev/shm/"):
        assert named_for_us(back_desc["backing"]), back_desc["backing"]  # a result segment, ours


def test_torch_bfloat16_result_made_in_the_worker(cluster: Cluster) -> None:
    torch = pytest.importorskip("torch")
    t = torch.linspace(-3, 3, 300_000, dtype=torch.float32).to(torch.bfloat16).reshape(600, 500).t()
    t.requires_grad_(True)
    back = echo(t)
    assert back.dtype == torch.bfloat16 and back.shape == t.shape and back.stride() == t.stride() == (1, 500)
    assert back.requires_grad and back.is_leaf
    assert torch.equal(back.detach(), t.detach())
    back.detach().mul_(2)  # writable in place
    assert torch.equal(back.detach(), 2 * t.detach())


# -- ownership: the worker's writes, returned arrays, retained arguments --------

def test_a_worker_writing_to_its_argument_does_not_change_the_drivers_array(cluster: Cluster) -> None:
    a = np.arange(1_000_000, dtype=np.float64)  # 8 MB: through shared memory
    before = tasks.describe_data(a)
    assert distfork.wait(distfork.fork(tasks.fill_and_sum, a, 7.0), timeout=30) == 7.0 * a.size
    assert tasks.describe_data(a) == before
    assert remote(a)["sha256"] == before["sha256"]  # and the next task gets it as it is


def test_a_returned_array_is_writable_and_its_segment_goes_back_when_dropped(cluster: Cluster) -> None:
    back = distfork.wait(distfork.fork(tasks.ones, 2_000_000), timeout=30)  # 16 MB made in a worker
    mapping = tasks.mapping_of(back.ctypes.data)
    assert mapping is not None and named_for_us(mapping), mapping  # named for us while we map it
    assert any(mapping.startswith(cluster.segment_of(pid)) for pid in cluster.worker_pids), mapping
    assert back.flags.writeable
    back[::1000] = 5.0  # the array is ours to read and write
    assert back.sum() == 2_000_000 + 4.0 * 2000
    view = back[10:20]
    del back
    assert (view == 1.0).all()  # a view keeps the mapping
    assert os.path.exists(mapping)
    del view
    # Nothing maps it here any more: it goes back to its worker (a warm spare) or is unlinked.
    wait_until(lambda: not os.path.exists(mapping), 10, what=f"{mapping} to leave this driver")


def test_results_in_reused_segments_are_intact_and_never_share_bytes_while_alive(cluster: Cluster) -> None:
    n = 2_500_000  # 20 MB: copied into its segment by several threads

    def results(first: int) -> list[Any]:
        return [distfork.wait(distfork.fork(tasks.pattern, n, float(k)), timeout=30) for k in range(first, first + 4)]

    def segments_of(arrays: list[Any]) -> list[str]:
        paths = [tasks.mapping_of(a.ctypes.data) for a in arrays]
        assert all(p is not None and named_for_us(p) for p in paths), paths
        return [shm._unowned(os.path.basename(p)) for p in paths if p is not None]

    def intact(arrays: list[Any], first: int) -> bool:
        return all(a[0] == first + i and a[-1] == n - 1 + first + i and (np.diff(a) == 1).all()
                   for i, a in enumerate(arrays))

    old = results(0)
    before = segments_of(old)
    assert len(set(before)) == len(before) and intact(old, 0)
    old[0][:] = -1.0  # ours to write: no other result sees it
    assert intact(old[1:], 1)
    paths = [tasks.mapping_of(a.ctypes.data) for a in old]
    del old
    wait_until(lambda: not any(p is not None and os.path.exists(p) for p in paths), 10,
               what="the first results to go back to their workers")
    new = results(10)
    after = segments_of(new)
    assert len(set(after)) == len(after) and intact(new, 10)
    assert set(after) & set(before), (before, after)  # the workers took their segments back and reused them


def test_an_argument_the_worker_keeps_is_not_overwritten_by_a_later_fork(cluster: Cluster, tmp_path: Path) -> None:
    key = uuid.uuid4().hex
    first = np.full(1_000_000, 1.0)  # 8 MB: an argument segment of this size
    sent = tasks.describe_data(first)
    keeper = distfork.wait(distfork.fork(tasks.keep, first, key), timeout=30)
    assert keeper in cluster.worker_pids
    # Same size: had the driver taken the kept segment back as a spare, one of
    # these would be written into it, and the worker's private (copy-on-write)
    # mapping would show the new bytes.
    for value in (2.0, 3.0, 4.0):
        later = np.full(1_000_000, value)
        assert distfork.wait(distfork.fork(tasks.sum_slowly, later, 0.0), timeout=30) == value * later.size
    gate = tmp_path / "gate"
    gate.mkdir()
    found = distfork.wait_all(
        [distfork.fork(tasks.kept_on_every_worker, key, str(gate), N_WORKERS) for _ in range(N_WORKERS)], timeout=30
    )
    kept = [k for k in found if k is not None]
    assert len(kept) == 1 and kept[0]["pid"] == keeper
    same_data(kept[0], sent)
    assert kept[0]["backing"].startswith(cluster.driver_prefix) and kept[0]["backing"].endswith(" (deleted)")
