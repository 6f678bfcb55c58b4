"""Why a worker was lost, as a driver reads it; the OOM counter of the memory cgroup; and where the
broker sends segments a driver gives back (never to a same-pid worker of another /dev/shm)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from state_outbox import dispatch, outbox

from distfork import protocol
from distfork.broker import Broker
from distfork.broker_state import BrokerState
from distfork.cluster import oom_kill_count
from distfork.config import Config
from distfork.protocol import Keepalive, Msg, Status, TaskEntry


def _lost_text(code: int, oom: bool = False, rss: int | None = 300 * 2**20) -> str:
    state = BrokerState(Config(), now=0.0)
    d = state.hello(b"D", {"role": "driver", "name": "d", "host": "h", "pid": 7}, 0.0)
    w = state.hello(b"W", {"role": "worker", "name": "w", "host": "h", "pid": 42, "slots": 1}, 0.0)
    state.keepalive(b"C", Keepalive([b"W"], rss_bytes=rss), 0.0)
    state.submit(d, [TaskEntry(1, 0, 0.0, [b"call"])], 0.0)
    assert dispatch(state, 0.0)[w.id]
    state.exited("h", 42, code, 1.0, oom=oom)
    (entry,) = outbox(state)[0][d.id]
    assert entry.status == Status.LOST
    return bytes(entry.frames[0]).decode()


def test_a_sigkilled_worker_is_possibly_out_of_memory_and_its_last_rss_is_named() -> None:
    text = _lost_text(-signal.SIGKILL)
    assert "SIGKILL" in text and "possibly out of memory, its last RSS 300.0 MiB" in text


def test_when_the_cgroup_saw_the_oom_killer_act_the_driver_is_told_so() -> None:
    assert "by the kernel's OOM killer (out of memory, its last RSS 300.0 MiB)" in _lost_text(-signal.SIGKILL, oom=True)


def test_other_exits_do_not_mention_memory() -> None:
    assert "memory" not in _lost_text(1) and "memory" not in _lost_text(-signal.SIGSEGV)


def test_oom_kill_count_reads_the_memory_cgroup_v1_or_v2(tmp_path: Path) -> None:
    with open("/proc/self/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    v1 = next((path for _, ctl, path in lines if "memory" in ctl.split(",")), None)
    v2 = next((path for _, ctl, path in lines if ctl == ""), None)
    if v1 is not None:
        where = tmp_path / "memory" / v1.lstrip("/")
        where.mkdir(parents=True)
        (where / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    elif v2 is not None:
        where = tmp_path / v2.lstrip("/")
        where.mkdir(parents=True, exist_ok=True)
        (where / "memory.events").write_text("low 0\nhigh 0\nmax 5\noom 2\noom_kill 3\n")
    else:
        pytest.skip("no memory cgroup here")
    assert oom_kill_count(str(tmp_path)) == 3
    assert oom_kill_count(str(tmp_path / "nowhere")) is None


def test_recycled_segments_never_go_to_a_worker_of_another_dev_shm_with_the_same_pid(tmp_path: Path,
                                                                                         monkeypatch: Any) -> None:
    broker = Broker(f"ipc://{tmp_path}/b", Config())
    sent: list[tuple[bytes, list[Any]]] = []
    monkeypatch.setattr(broker, "_send", lambda peer, frames: sent.append((peer, frames)))
    try:
        state = broker.state
        d = state.hello(b"D", {"role": "driver", "name": "d", "host": "h", "pid": 7, "shm_domain": "here"}, 0.0)
        # Same pid, another container: listed first, so a lookup by pid alone would pick it.
        state.hello(b"W-there", {"role": "worker", "name": "x", "host": "h2", "pid": 42, "slots": 1,
                                 "shm_domain": "there"}, 0.0)
        state.hello(b"W-here", {"role": "worker", "name": "y", "host": "h", "pid": 42, "slots": 1,
                                "shm_domain": "here"}, 0.0)
        name = f"df-abc-42-99-{os.urandom(8).hex()}-7-5"
        state.recycle(d, [name], now=0.0)
        broker._execute(state.take_instructions())
        recycles = [(peer, protocol.decode_json(protocol.decode(frames)[1])) for peer, frames in sent
                    if protocol.decode(frames)[0] is Msg.RECYCLE]
        assert recycles == [(b"W-here", {"names": [name]})]
    finally:
        broker.sock.close(linger=0)
        broker._ctx.term()
