"""Result segments reused in one process: what a pool hands out again, and the parallel copy into it.

Real files in /dev/shm, no cluster (``feed...`` session, as test_shm_garbage.py).
A segment handed over comes back only through :meth:`SegmentPool.take_back`
(the driver's RECYCLE, sent once nothing maps it there); until then the pool
never hands it out again, so no two live results share bytes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import numpy as np
import pytest

from distfork import shm

SESSION = "feedcafe"
N = shm.PARALLEL_COPY_BYTES + 12_345  # copied in parallel chunks, the last one short


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(shm.SHM_DIR, name))


def wait_until(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def pool() -> Iterator[shm.SegmentPool]:
    p = shm.SegmentPool(SESSION, 4 * N)
    yield p
    p.close()
    shm.release_own()


@pytest.mark.parametrize("size", [0, 1, 4097, shm.PARALLEL_COPY_BYTES - 1, N, 3 * shm.PARALLEL_COPY_BYTES + 7])
def test_copy_into_copies_every_byte_whatever_the_size(size: int) -> None:
    src = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    dst = bytearray(size + 2)
    shm.copy_into(memoryview(dst)[1 : size + 1], memoryview(src))
    assert dst[0] == 0 and dst[-1] == 0 and bytes(dst[1 : size + 1]) == src.tobytes()


def test_copy_into_refuses_a_buffer_of_another_size() -> None:
    with pytest.raises(ValueError):
        shm.copy_into(memoryview(bytearray(N)), memoryview(bytearray(N - 1)))


def hand_out(pool: shm.SegmentPool, fill: int) -> tuple[shm.Segment, memoryview]:
    """Write a result of ``fill`` bytes, hand it over to ourselves and map it as its driver would."""
    seg = pool.take(N, owner=os.getpid())
    shm.copy_into(seg.view[:N], memoryview(np.full(N, fill, np.uint8)))
    shm.hand_over(seg.name)
    pool.let_go(seg)  # the worker's mapping goes in the background
    return seg, shm.attach(seg.name, N, private=False)


def unmap(view: memoryview) -> None:
    mm = view.obj
    view.release()
    mm.close()  # type: ignore[union-attr]


def test_a_segment_comes_back_only_when_its_driver_is_done_and_then_carries_the_next_result(
    pool: shm.SegmentPool,
) -> None:
    first, first_view = hand_out(pool, 1)
    second, second_view = hand_out(pool, 2)  # while the driver maps the first one
    assert second.file != first.file
    assert bytes(first_view[:: 1 << 20]) == b"\x01" * len(first_view[:: 1 << 20])
    unmap(first_view)
    handed, file = first.name, first.file
    pool.take_back(handed)  # the driver's RECYCLE
    wait_until(lambda: exists(file) and not exists(handed))  # ours again
    taken = [pool.take(N, owner=os.getpid()) for _ in range(2)]  # the warmer's fresh spare and the returned one
    assert file in [s.file for s in taken] and second.file not in [s.file for s in taken]
    reused = next(s for s in taken if s.file == file)
    shm.copy_into(reused.view[:N], memoryview(np.full(N, 3, np.uint8)))
    assert np.all(np.frombuffer(second_view, np.uint8) == 2)  # the live result is untouched
    unmap(second_view)
    for s in taken:
        s.release()
        s.unlink()
    shm.unlink(second.name)


def test_close_unlinks_returned_segments_whether_mapped_again_or_not(pool: shm.SegmentPool) -> None:
    segs = [hand_out(pool, i) for i in range(3)]
    for seg, view in segs:
        unmap(view)
        pool.take_back(seg.name)
    pool.close()
    pool.take_back(segs[0][0].name)  # a RECYCLE after close: unlinked at once
    wait_until(lambda: not any(exists(s.name) or exists(s.file) for s, _ in segs))


def mapped_here(file: str) -> bool:
    with open("/proc/self/maps") as f:
        return any(file in line for line in f)


def test_our_mapping_of_a_result_its_driver_unlinked_goes_at_the_next_prune(pool: shm.SegmentPool) -> None:
    seg, view = hand_out(pool, 1)
    unmap(view)
    assert mapped_here(seg.file)  # kept for its return
    shm.unlink(seg.name)  # the driver unlinks instead (it is closing)
    pool.prune()
    wait_until(lambda: not mapped_here(seg.file))  # its memory is free


def test_a_file_planted_under_a_returned_name_is_never_handed_out(pool: shm.SegmentPool) -> None:
    seg, view = hand_out(pool, 1)
    unmap(view)
    handed, file = seg.name, seg.file
    shm.unlink(handed)
    os.close(os.open(os.path.join(shm.SHM_DIR, handed), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    pool.take_back(handed)
    assert not exists(handed) and not exists(file)
    wait_until(lambda: not mapped_here(file))
    taken = [pool.take(N, owner=os.getpid()) for _ in range(3)]
    assert file not in [s.file for s in taken]
    for s in taken:
        s.release()
        s.unlink()
