"""``distfork.Shared`` without a cluster: by value outside a fork, and the worker cache."""

from __future__ import annotations

import numpy as np
import pytest

from distfork import serialize, sharecache, shared, shm

pytestmark = pytest.mark.timeout(30)


def test_without_shared_memory_a_handle_pickles_its_value() -> None:
    a = np.arange(100_000.0)
    h = shared.Shared(a, 64 * 1024)
    assert h.name is None
    frames = serialize.dumps(h, 64 * 1024)
    assert serialize.oob_bytes(frames) == a.nbytes  # the array itself travels, out of band
    assert np.array_equal(serialize.loads(frames), a)
    assert h.name is None and "not copied yet" in repr(h)  # not pickled by a fork through a cluster


class FakeDriver:
    """What a handle reads of the driver a fork goes through."""

    _session = "0badc0de"
    shm_domain = shm.domain()
    identity = b"D12345678"

    def __init__(self) -> None:
        self.shares = sharecache.Server(lambda: None)


def test_the_worker_cache_reloads_a_tensor_a_task_changed_and_keeps_an_unchanged_one() -> None:
    torch = pytest.importorskip("torch")
    h = shared.Shared(torch.zeros(50_000), 64 * 1024)
    shared._forking.driver = FakeDriver()  # as api._fork sets it
    try:
        before = shared.pins()
        frames = serialize.dumps(h, 64 * 1024)
        assert serialize.oob_bytes(frames) == 0
        assert shared.pins() == before  # a handle is not pinned to our host: other hosts fetch it
        assert h.name is not None and h.key is not None
        first = serialize.loads(frames)
        assert serialize.loads(serialize.dumps(h, 64 * 1024)) is first  # cached, unchanged
        first.add_(1)  # a task writes in place: the version counter moves
        again = serialize.loads(serialize.dumps(h, 64 * 1024))
        assert again is not first and float(again.sum()) == 0.0
    finally:
        shared._forking.driver = None
        h.release()
