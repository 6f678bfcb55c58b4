"""``distfork.Shared`` without a cluster: by value when no worker shares our /dev/shm, and the worker cache."""

from __future__ import annotations

import numpy as np
import pytest

from distfork import serialize, shared

pytestmark = pytest.mark.timeout(30)


def test_without_shared_memory_a_handle_pickles_its_value() -> None:
    a = np.arange(100_000.0)
    h = shared.Shared(a, None, 64 * 1024)
    assert h.name is None
    frames = serialize.dumps(h, 64 * 1024)
    assert serialize.oob_bytes(frames) == a.nbytes  # the array itself travels, out of band
    assert np.array_equal(serialize.loads(frames), a)


def test_the_worker_cache_reloads_a_tensor_a_task_changed_and_keeps_an_unchanged_one() -> None:
    torch = pytest.importorskip("torch")
    h = shared.Shared(torch.zeros(50_000), "0badc0de", 64 * 1024)
    try:
        assert h.name is not None
        first = serialize.loads(serialize.dumps(h, 64 * 1024))
        assert serialize.loads(serialize.dumps(h, 64 * 1024)) is first  # cached, unchanged
        first.add_(1)  # a task writes in place: the version counter moves
        again = serialize.loads(serialize.dumps(h, 64 * 1024))
        assert again is not first and float(again.sum()) == 0.0
    finally:
        h.release()
