"""Resources without sockets: what workers advertise, what tasks ask, where the broker places them (fake clock)."""

from __future__ import annotations

from typing import Any

import pytest
from state_outbox import dispatch, outbox

from distfork import protocol, resources
from distfork.broker_state import BrokerState, PeerInfo
from distfork.config import Config
from distfork.protocol import DEFAULT_RETRIES, Flag, ResultEntry, Status, TaskEntry

D = b"D-one"


def make_state(**overrides: Any) -> BrokerState:
    return BrokerState(Config(**{"heartbeat_s": 1.0, "resource_grace_s": 2.0, **overrides}), now=0.0)


def worker(state: BrokerState, peer: bytes, pid: int, res: dict[str, float], labels: dict[str, str] | None = None,
           slot: int = 0, gpu_ids: list[int] | None = None) -> PeerInfo:
    info = {"role": "worker", "name": f"w{pid}/{slot}", "host": "h", "pid": pid, "slots": 1,
            "resources": res, "labels": labels or {}, "gpu_ids": gpu_ids if gpu_ids is not None else
            list(range(int(res.get("gpu", 0))))}
    return state.hello(peer, info, 0.0)


def ask(state: BrokerState, d: PeerInfo, task_id: int, needs: dict[str, float] | None,
        labels: dict[str, str] | None = None, now: float = 0.0) -> None:
    frames: list[Any] = [b"call"]
    flags = 0
    if needs or labels:
        frames = [protocol.encode_request(needs, labels), *frames]
        flags = Flag.RESOURCES
    state.submit(d, [TaskEntry(task_id, DEFAULT_RETRIES, 0.0, frames, flags)], now)


def finish(state: BrokerState, w: PeerInfo) -> None:
    (task,) = list(w.assigned.values())
    state.results(w, [ResultEntry(task.key, Status.OK, 0.1, [b"v"])], now=state.last_now)


def test_specs_parse_and_bad_ones_name_the_entry() -> None:
    assert resources.parse_resources("gpu=2, ram_gb=64,ssd") == {"gpu": 2.0, "ram_gb": 64.0, "ssd": 1.0}
    assert resources.parse_labels("zone=a,rack=3") == {"zone": "a", "rack": "3"}
    for bad in ("gpu=-1", "gpu=x", "2=gpu", "gpu=inf"):
        with pytest.raises(ValueError, match="resource"):
            resources.parse_resources(bad)
    with pytest.raises(ValueError, match="label 'zone'"):
        resources.parse_labels("zone")
    with pytest.raises(ValueError, match="non-negative"):
        resources.validate_request({"gpu": -1}, None)
    assert resources.validate_request({"gpu": 0}, None) == (None, None)


def test_a_worker_finds_its_slots_cores_and_memory_and_takes_custom_resources_on_top() -> None:
    found, ids = resources.detect(2, "gpu=2,ssd=1")
    assert found["slots"] == 2 and found["cpu"] >= 1 and found["memory_gb"] > 0
    assert found["gpu"] == 2 and found["ssd"] == 1 and ids == [0, 1]


def test_gpu_tasks_go_only_where_a_gpu_is_free_and_one_at_a_time() -> None:
    state = make_state()
    d = state.hello(D, {"role": "driver", "name": "d", "host": "h", "pid": 1}, 0.0)
    gpu = worker(state, b"W-gpu", 100, {"slots": 1, "gpu": 1})
    cpu = worker(state, b"W-cpu", 200, {"slots": 1})
    for i in range(3):
        ask(state, d, i + 1, {"gpu": 1})
    sent = dispatch(state, 0.1)
    assert list(sent) == [b"W-gpu"] and len(sent[b"W-gpu"]) == 1  # one at a time, never on the CPU worker
    (task,) = sent[b"W-gpu"]
    frames, flags = task.wire()
    assert flags & Flag.RESOURCES and protocol.decode_devices(frames[0]) == [0] and frames[1:] == [b"call"]
    assert dispatch(state, 0.2) == {}  # the GPU is held: the others wait, they do not fail
    ask(state, d, 9, None)  # a task that asks nothing still runs, on the free worker
    assert [t.task_id for t in dispatch(state, 0.3)[b"W-cpu"]] == [9]
    finish(state, gpu)
    assert [t.task_id for t in dispatch(state, 5.0)[b"W-gpu"]] == [2]  # the next one, after the grace: still waits
    snap = {w["name"]: w["resources"] for w in state.status(5.0)["workers"]}
    assert snap["w100/0"]["held"] == {"gpu": 1.0} and snap["w100/0"]["free"] == {"slots": 1.0, "gpu": 0.0}
    assert snap["w200/0"]["held"] == {}
    del cpu


def test_resources_belong_to_the_process_and_its_slots_share_them() -> None:
    state = make_state()
    d = state.hello(D, {"role": "driver", "name": "d", "host": "h", "pid": 1}, 0.0)
    res = {"slots": 2, "gpu": 2, "memory_gb": 10}
    worker(state, b"W-a0", 100, res, slot=0)
    worker(state, b"W-a1", 100, res, slot=1)
    ask(state, d, 1, {"gpu": 1, "memory_gb": 6})
    ask(state, d, 2, {"gpu": 1, "memory_gb": 6})  # the GPUs would do, the memory is taken
    ask(state, d, 3, {"gpu": 1, "memory_gb": 4})
    sent = dispatch(state, 0.1)
    placed = sorted((t.task_id, tuple(t.devices or ())) for ts in sent.values() for t in ts)
    assert placed == [(1, (0,)), (3, (1,))]  # each its own device


def test_labels_select_workers() -> None:
    state = make_state()
    d = state.hello(D, {"role": "driver", "name": "d", "host": "h", "pid": 1}, 0.0)
    worker(state, b"W-a", 100, {"slots": 1}, {"zone": "a"})
    worker(state, b"W-b", 200, {"slots": 1}, {"zone": "b"})
    ask(state, d, 1, None, {"zone": "b"})
    assert list(dispatch(state, 0.1)) == [b"W-b"]


def test_a_task_that_fits_no_worker_fails_after_the_grace_naming_what_the_cluster_has() -> None:
    state = make_state()
    d = state.hello(D, {"role": "driver", "name": "d", "host": "h", "pid": 1}, 0.0)
    worker(state, b"W-gpu", 100, {"slots": 1, "gpu": 1}, {"zone": "a"})
    worker(state, b"W-cpu", 200, {"slots": 1})
    ask(state, d, 1, {"gpu": 4}, now=0.5)
    assert dispatch(state, 1.0) == {} and outbox(state) == ({}, {})  # workers may still join
    dispatch(state, 2.6)  # grace (2 s) over
    results, _ = outbox(state)
    (entry,) = results[D]
    text = bytes(entry.frames[0]).decode()
    assert entry.status == Status.FAILED and entry.id == 1
    assert "it asks for gpu=4" in text and "w100: gpu=1, slots=1 [zone=a]" in text and "w200: slots=1" in text
    assert state.status(3.0)["queued"] == 0 and state.counters["tasks_unplaceable"] == 1


def test_a_worker_that_joins_within_the_grace_gets_the_task() -> None:
    state = make_state()
    d = state.hello(D, {"role": "driver", "name": "d", "host": "h", "pid": 1}, 0.0)
    ask(state, d, 1, {"gpu": 2})
    assert dispatch(state, 1.0) == {}
    worker(state, b"W-big", 300, {"slots": 1, "gpu": 2})
    sent = dispatch(state, 1.5)
    assert [t.devices for t in sent[b"W-big"]] == [[0, 1]]


def test_a_cancelled_waiting_task_is_dropped_and_a_lost_worker_gives_its_gpu_task_back() -> None:
    state = make_state()
    d = state.hello(D, {"role": "driver", "name": "d", "host": "h", "pid": 1}, 0.0)
    worker(state, b"W-gpu", 100, {"slots": 1, "gpu": 1})
    ask(state, d, 1, {"gpu": 1})
    ask(state, d, 2, {"gpu": 1})
    dispatch(state, 0.1)
    state.cancel(d, [2], now=state.last_now)
    state.exited("h", 100, -9, 0.2)  # the worker ran task 1 and died
    worker(state, b"W-gpu2", 101, {"slots": 1, "gpu": 1})
    sent = dispatch(state, 0.3)
    assert [(t.task_id, t.devices) for t in sent[b"W-gpu2"]] == [(1, [0])]
    assert state.status(0.3)["queued"] == 0


def test_resource_frames_round_trip_and_hostile_ones_raise() -> None:
    frame = protocol.encode_request({"gpu": 1.0}, {"zone": "a"})
    assert protocol.decode_request(frame) == ({"gpu": 1.0}, {"zone": "a"})
    for bad in (b"[]", b'{"resources": {"gpu": -1}, "labels": {}}', b'{"resources": {}, "labels": {"a": 1}}',
                b"\xff"):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode_request(bad)
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_devices(b'["x"]')


def test_status_and_metrics_show_each_process_resources_total_held_and_free() -> None:
    from distfork.metrics import BrokerMetrics, _Collector
    from distfork.status import format_resources

    state = make_state()
    d = state.hello(D, {"role": "driver", "name": "d", "host": "h", "pid": 1}, 0.0)
    worker(state, b"W-gpu", 100, {"slots": 1, "gpu": 2, "cpu": 4}, {"zone": "a"})
    ask(state, d, 1, {"gpu": 1})
    dispatch(state, 0.1)
    (row,) = state.status(0.2)["workers"]
    assert format_resources(row["resources"]) == "cpu 4/4 · gpu 1/2 · zone=a"
    samples = {
        (s.labels["resource"], s.labels["state"]): s.value
        for family in _Collector(BrokerMetrics(state)).collect() if family.name == "distfork_worker_resources"
        for s in family.samples
    }
    assert samples[("gpu", "total")] == 2 and samples[("gpu", "held")] == 1 and samples[("cpu", "held")] == 0
