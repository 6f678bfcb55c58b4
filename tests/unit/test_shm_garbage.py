"""Segment names and sweeps in one process: unguessable names, garbage judged by pid *and* start time,
other users' segments skipped, and a sweep that never raises.

Real files in /dev/shm, no cluster. Planted names use a session of their own
(``feed...``), so a sweep here never touches another test run's segments
except garbage, which any distfork process may remove.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from distfork import shm

SESSION = "feedbeef"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _my_start() -> int:
    with open(f"/proc/{os.getpid()}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])


@pytest.fixture
def planted() -> Iterator[list[str]]:
    """Names of segments a test plants; whatever the sweep left is removed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        try:
            os.unlink(os.path.join(shm.SHM_DIR, name))
        except FileNotFoundError:
            pass


def plant(names: list[str], name: str, uid: int | None = None) -> str:
    fd = os.open(os.path.join(shm.SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        if uid is not None:
            os.fchown(fd, uid, uid)
    finally:
        os.close(fd)
    names.append(name)
    return name


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(shm.SHM_DIR, name))


def test_segment_names_have_a_random_part_and_name_their_creator_with_its_start_time() -> None:
    a, b = shm.Segment(SESSION, 100), shm.Segment(SESSION, 100)
    try:
        na, nb = shm.parse(a.name), shm.parse(b.name)
        assert na is not None and nb is not None
        assert (na.pid, na.start) == (nb.pid, nb.start) == (os.getpid(), _my_start())
        assert a.name.split("-")[4] != b.name.split("-")[4] and len(a.name.split("-")[4]) == 16
    finally:
        for s in (a, b):
            s.release()
            s.unlink()


def test_a_taken_name_is_retried_with_another(planted: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    taken = plant(planted, f"df-{SESSION}-{os.getpid()}-{_my_start()}-{'0' * 16}")
    parts = iter(["0" * 16, "1" * 16])
    monkeypatch.setattr(shm, "_random_part", lambda: next(parts))
    seg = shm.Segment(SESSION, 4096)
    try:
        assert seg.name != taken and seg.name.endswith("1" * 16) and exists(taken)
    finally:
        seg.release()
        seg.unlink()


def test_every_try_taken_gives_shm_unavailable_not_a_crash(monkeypatch: pytest.MonkeyPatch,
                                                             planted: list[str]) -> None:
    taken = plant(planted, f"df-{SESSION}-{os.getpid()}-{_my_start()}-{'0' * 16}")
    monkeypatch.setattr(shm, "_random_part", lambda: "0" * 16)
    with pytest.raises(shm.ShmUnavailable, match="taken"):
        shm.Segment(SESSION, 4096)
    assert exists(taken)


def test_sweep_removes_garbage_of_any_session_judged_by_pid_and_start_time(planted: list[str]) -> None:
    me, start, dead = os.getpid(), _my_start(), _dead_pid()
    rnd = os.urandom(8).hex
    garbage = [
        plant(planted, f"df-{SESSION}-{dead}-123-{rnd()}"),  # its creator died before handing it out
        plant(planted, f"df-{SESSION}-{me}-{start + 1}-{rnd()}"),  # our pid, but made by an earlier process
        plant(planted, f"df-{SESSION}-{me}-{start}-{rnd()}-{dead}-77"),  # handed to a driver that died
        plant(planted, f"df-{SESSION}-{me}-{start}-{rnd()}-{me}-{start + 1}"),  # to a pid now reused
    ]
    kept = [
        plant(planted, f"df-{SESSION}-{me}-{start}-{rnd()}"),  # ours, not handed out yet
        plant(planted, f"df-{SESSION}-{dead}-123-{rnd()}-{me}-{start}"),  # its maker died, its driver lives
        plant(planted, f"df-{SESSION}-{dead}-0"),  # not a name of ours: never touched
    ]
    assert shm.sweep() >= len(garbage)  # any session: other garbage on this host may go too
    assert [n for n in garbage if exists(n)] == []
    assert [n for n in kept if exists(n)] == kept


def test_sweep_of_one_session_leaves_other_sessions_alone(planted: list[str]) -> None:
    dead = _dead_pid()
    other = plant(planted, f"df-abcdef01-{dead}-1-{os.urandom(8).hex()}")
    mine = plant(planted, f"df-{SESSION}-{os.getpid()}-{_my_start()}-{os.urandom(8).hex()}")
    assert shm.sweep(SESSION, dead_only=False) >= 1
    assert exists(other) and not exists(mine)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_sweep_skips_and_logs_segments_of_another_user(planted: list[str], caplog: pytest.LogCaptureFixture) -> None:
    dead = _dead_pid()
    foreign = plant(planted, f"df-{SESSION}-{dead}-1-{os.urandom(8).hex()}", uid=65534)
    legacy = plant(planted, f"df-{SESSION}-999999-0", uid=65534)  # the planted name of the old attack
    with caplog.at_level(logging.WARNING, logger="distfork.shm"):
        shm.sweep()
        shm.sweep(SESSION, dead_only=False)
    assert exists(foreign) and exists(legacy)
    assert sum(foreign in r.getMessage() and "uid 65534" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("error", [FileNotFoundError, PermissionError, OSError])
def test_sweep_never_raises_when_a_segment_vanishes_or_cannot_be_removed(
    error: type[OSError], planted: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = plant(planted, f"df-{SESSION}-{_dead_pid()}-1-{os.urandom(8).hex()}")
    real_unlink = os.unlink

    def unlink(path: str) -> None:
        if path.endswith(name):
            raise error(1, "planted failure")
        real_unlink(path)

    monkeypatch.setattr(os, "unlink", unlink)
    shm.sweep()
    shm.unlink(name)
    assert exists(name)


def test_a_result_is_named_after_its_driver_only_when_handed_over() -> None:
    pool = shm.SegmentPool(SESSION, 0)
    seg = pool.take(1000, owner=os.getpid())
    try:
        n = shm.parse(seg.name)
        assert n is not None and n.owner == os.getpid() and n.owner_start == _my_start()
        assert not exists(seg.name) and exists(seg.file)  # still ours: swept with us if we die now
        shm.hand_over(seg.name)
        assert exists(seg.name) and not exists(seg.file)
    finally:
        seg.release()
        shm.unlink(seg.name)
        pool.close()


def test_release_own_unlinks_what_we_made_and_never_handed_over(planted: list[str]) -> None:
    pool = shm.SegmentPool(SESSION, 0)
    unsent = pool.take(1000, owner=os.getpid())
    sent = pool.take(1000, owner=os.getpid())
    shm.hand_over(sent.name)
    planted.append(sent.name)
    other = plant(planted, f"df-{SESSION}-{_dead_pid()}-1-{os.urandom(8).hex()}-{os.getpid()}-{_my_start()}")
    for s in (unsent, sent):
        s.release()
    shm.release_own()
    assert not exists(unsent.file) and exists(sent.name) and exists(other)
    pool.close()
