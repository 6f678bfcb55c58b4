"""``distfork.Shared`` without a cluster: by value when no worker shares our /dev/shm, and the worker cache."""

from __future__ import annotations

import numpy as np
import pytest

from distfork import serialize, shared

pytestmark = pytest.mark.timeout(30)


def test_without_shared_memory_a_handle_pickles_its_value() -> None:
    a = np.arange(100_000.0)
    h = shared.Shared(a, 64 * 1024)
    assert h.name is None
    frames = serialize.dumps(h, 64 * 1024)
    assert serialize.oob_bytes(frames) == a.nbytes  # the array itself travels, out of band
    assert np.array_equal(serialize.loads(frames), a)
    assert h.name is None and "not copied yet" in repr(h)  # no fork to workers sharing our /dev/shm


def test_the_worker_cache_reloads_a_tensor_a_task_changed_and_keeps_an_unchanged_one() -> None:
    torch = pytest.importorskip("torch")
    cache = shared.ParamCache("0badc0de", 1 << 20)
    h = shared.Shared(torch.zeros(50_000), 64 * 1024)
    serialize._local.share_copy = cache.reduce  # as api._fork sets it for a cluster on our host
    try:
        before = shared.pins()
        frames = serialize.dumps(h, 64 * 1024)
        assert shared.pins() == before + 1 and serialize.oob_bytes(frames) == 0
        assert h.name is not None
        first = serialize.loads(frames)
        assert serialize.loads(serialize.dumps(h, 64 * 1024)) is first  # cached, unchanged
        first.add_(1)  # a task writes in place: the version counter moves
        again = serialize.loads(serialize.dumps(h, 64 * 1024))
        assert again is not first and float(again.sum()) == 0.0
    finally:
        serialize._local.share_copy = None
        h.release()
        cache.close()
