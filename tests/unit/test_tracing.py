"""Trace records without processes: clock alignment, the broker's forwarding, hostile TRACE bodies, exports."""

from __future__ import annotations

import json
from typing import Any

import pytest
from state_outbox import dispatch, outbox

from distfork import protocol, tracing
from distfork.broker_state import BrokerState, PeerInfo
from distfork.config import Config
from distfork.errors import ProtocolError
from distfork.protocol import Flag, ResultEntry, Status, TaskEntry


def _remote(b: tuple[float, float, float], w: tuple[float, float, float], worker: str = "w/0") -> tuple[Any, ...]:
    return (worker, "hostA", 42, *b, 0, *w, 10, "inline", 20, "shm")


def _trace_with(*records: tracing.Record, started: float = 100.0) -> tracing.Trace:
    t = tracing.Trace(capacity=10)
    t.started = started
    for r in records:
        t._add(r)
    return t


def test_remote_times_on_the_same_clock_are_taken_as_they_are() -> None:
    rec = tracing.Record("f", [], 100.0)
    rec.done = 100.010
    rec.remote = _remote((100.001, 100.002, 100.009), (100.003, 100.004, 100.008))
    (info,) = _trace_with(rec).tasks()
    assert info.dispatched == pytest.approx(0.002)
    assert info.started == pytest.approx(0.004) and info.finished == pytest.approx(0.008)
    assert info.run_s == pytest.approx(0.004)


def test_a_worker_clock_an_hour_ahead_is_shifted_into_the_round_trip() -> None:
    rec = tracing.Record("f", [], 100.0)
    rec.done = 100.010
    skew = 3600.0
    # broker in step; the worker's clock is an hour ahead, its task ran 2 ms in the middle of the trip
    rec.remote = _remote((100.001, 100.002, 100.009), (100.004 + skew, 100.0045 + skew, 100.0065 + skew))
    (info,) = _trace_with(rec).tasks()
    assert info.dispatched is not None and info.started is not None and info.finished is not None
    assert 0.002 <= info.started <= info.finished <= 0.009  # causal again, in the driver's clock
    assert info.run_s == pytest.approx(0.002)


def test_nested_records_are_aligned_through_their_parents_worker_clock() -> None:
    skew = -50.0  # the parent's worker runs 50 s behind
    child = tracing.Record("g", [], 100.003 + skew)
    child.gid = "inner#1"
    child.done = 100.005 + skew
    child.remote = _remote((100.0031 + skew, 100.0032 + skew, 100.0048 + skew),
                           (100.0033 + skew, 100.0034 + skew, 100.0046 + skew), worker="w/1")
    parent = tracing.Record("f", [], 100.0)
    parent.gid = "outer#1"
    parent.done = 100.010
    parent.remote = _remote((100.001, 100.002, 100.009), (100.002 + skew, 100.0025 + skew, 100.006 + skew))
    parent.kids().append(child)
    p, c = _trace_with(parent).tasks()
    assert c.parent == p.id == 1 and c.worker == "w/1"
    assert p.started is not None and p.finished is not None and c.started is not None and c.finished is not None
    assert p.started <= c.submitted <= c.started <= c.finished <= p.finished


def test_records_cross_processes_as_json_unchanged() -> None:
    rec = tracing.Record("f", ["d#1"], 1.5)
    rec.gid, rec.done, rec.status, rec.error, rec.held = "d#2", 2.5, "raised", "boom", True
    rec.remote = _remote((1.6, 1.7, 2.4), (1.8, 1.9, 2.3))
    kid = tracing.Record("g", [], 1.85)
    kid.where, kid.start, kid.end = "reclaimed", 1.86, 1.87
    rec.kids().append(kid)
    back = tracing.Record.from_json(json.loads(json.dumps(rec.to_json())))
    assert json.dumps(back.to_json()) == json.dumps(rec.to_json())


def _receive(note: bytes) -> tracing.Record:
    rec = tracing.Record("f", [], 0.0)
    tracing.note_received(rec, note)  # on the I/O thread: kept as it came
    rec.resolve()
    return rec


def test_a_malformed_note_is_left_out_of_the_export_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    rec = tracing.Record("f", [], 100.0)
    tracing.note_received(rec, b"garbage")
    (info,) = _trace_with(rec).tasks()
    assert info.worker == "" and info.started is None
    assert "1 trace notes were malformed" in caplog.text


_BROKER = (1.0, 2.0, 3.0, 0)
_WORKER = (2.2, 2.9, 10, 20, 1, 2)
_WHO = b'{"name":"w/0","host":"h","pid":9}'


@pytest.mark.parametrize("who,kids", [
    (b"{}", b""), (b"5", b""), (b'{"name":"w","host":"h"}', b""), (b'{"name":"w","host":"h","pid":"x"}', b""),
    (b'["w","h",1]', b""), (_WHO, b'[{"f":"x"}]'),
    (_WHO, b"[[[[]]]]"), (_WHO, b"not json"), (_WHO, b"{}"), (b"\xff", b""),
])
def test_a_malformed_trace_note_is_a_protocol_error_for_the_driver(who: bytes, kids: bytes) -> None:
    note = protocol.encode_driver_note(_BROKER, who, protocol.encode_worker_note(*_WORKER, kids))
    with pytest.raises(ProtocolError):
        _receive(note)


@pytest.mark.parametrize("cut", [1, 10, 40])
def test_a_truncated_trace_note_is_a_protocol_error(cut: int) -> None:
    note = protocol.encode_driver_note(_BROKER, _WHO, protocol.encode_worker_note(*_WORKER))
    with pytest.raises(ProtocolError):
        _receive(note[:-cut])
    with pytest.raises(ProtocolError):
        protocol.decode_worker_note(protocol.encode_worker_note(*_WORKER)[:-cut])


def test_a_deeply_nested_record_is_refused_not_a_recursion_error() -> None:
    d: dict[str, Any] = {"f": "x", "d": [], "s": 0, "g": "", "e": 0, "a": 0, "b": 0, "w": "", "o": "ok", "h": False,
                         "x": "", "r": None, "c": []}
    for _ in range(300):
        d = {**d, "c": [d]}
    note = protocol.encode_driver_note(_BROKER, _WHO, protocol.encode_worker_note(*_WORKER, json.dumps([d]).encode()))
    with pytest.raises(ProtocolError):
        _receive(note)


def _broker_with_a_traced_task() -> tuple[BrokerState, PeerInfo, PeerInfo]:
    state = BrokerState(Config(), 0.0)
    driver = state.hello(b"D1", {"role": "driver", "pid": 7}, 0.0)
    worker = state.hello(b"W1", {"role": "worker", "slots": 2, "name": "w/0", "host": "h", "pid": 9}, 0.0)
    state.submit(driver, [TaskEntry(5, 255, 0.0, [b"call"], Flag.TRACE), TaskEntry(6, 255, 0.0, [b"call"])], 1.0)
    out = dispatch(state, 2.0)
    assert [t.task_id for t in out[b"W1"]] == [5, 6]
    assert out[b"W1"][0].wire()[1] & Flag.TRACE and not out[b"W1"][1].wire()[1] & Flag.TRACE
    return state, driver, worker


def test_the_broker_passes_a_traced_tasks_note_to_its_driver_with_its_own_times() -> None:
    state, driver, worker = _broker_with_a_traced_task()
    k5, k6 = list(worker.assigned)
    kid = json.dumps([tracing.Record("g", [], 1.5).to_json()]).encode()
    results = [protocol.encode_notes([(k5, protocol.encode_worker_note(*_WORKER, kid))]),
               ResultEntry(k5, 0, 0.1, [b"value5"]), ResultEntry(k6, 0, 0.1, [b"value6"])]
    entries = tracing.take_notes(worker, results, 3.0)
    assert [(e.id, e.frames, e.flags) for e in entries] == [(k5, [b"value5"], 0), (k6, [b"value6"], 0)]
    state.results(worker, entries, now=state.last_now)
    sent, _ = outbox(state)
    head, e5, e6 = sent[b"D1"]
    assert (e5.id, e5.frames, e6.id, e6.frames) == (5, [b"value5"], 6, [b"value6"])
    notes, rest = protocol.decode_notes([head, e5, e6])
    assert list(rest) == [e5, e6] and [i for i, _ in notes] == [5]  # the untraced task has none
    rec = tracing.Record("f", [], 0.0)
    tracing.note_received(rec, notes[0][1])
    rec.resolve()
    assert rec.remote is not None
    assert rec.remote[:3] == ("w/0", "h", 9) and rec.remote[7:] == (2.2, 2.2, 2.9, 10, "inline", 20, "shm")
    assert rec.remote[4] - rec.remote[3] == pytest.approx(1.0)  # dispatched 1 s after it arrived (monotonic -> wall)
    assert rec.remote[5] - rec.remote[4] == pytest.approx(1.0)  # its result came back 1 s later
    assert [c.func for c in rec.children] == ["g"]


def test_the_broker_forwards_notes_without_nested_forks_in_one_pack_each_the_same_bytes() -> None:
    quick, slow = (_broker_with_a_traced_task() for _ in range(2))
    sent = []
    for (state, _, worker), fast in ((quick, True), (slow, False)):
        k5, k6 = list(worker.assigned)
        note = tracing.worker_note(k5, 2.2, 2.9, [b"x" * 10], [b"y" * 20], [])
        head = protocol.notes_entry([note])
        if not fast:  # the same note, the batch's length not a multiple of the fixed size: the general path
            head = head._replace(pid=2)
        assert (protocol.fixed_worker_notes(head.frames[0], head.pid) is not None) is fast
        entries = tracing.take_notes(worker, [head, ResultEntry(k5, 0, 0.1, [b"v5"])], 3.0)
        state.results(worker, entries, now=state.last_now)
        sent.append(outbox(state)[0][b"D1"][0])
    fast_bytes, slow_bytes = (bytes(e.frames[0]) for e in sent)  # alike but for the broker's wall-clock stamps
    assert (fast_bytes[:12], fast_bytes[36:]) == (slow_bytes[:12], slow_bytes[36:])
    ((task_id, note),) = protocol.split_notes(sent[0].frames[0])
    rec = tracing.Record("f", [], 0.0)
    tracing.note_received(rec, note)
    rec.resolve()
    assert task_id == 5 and rec.remote is not None and rec.remote[7:] == (2.2, 2.2, 2.9, 10, "inline", 20, "inline")


def test_a_workers_traced_task_pays_for_a_scope_only_when_it_forks() -> None:
    tracing.open_task()
    try:
        assert tracing._local.scope is tracing._LAZY  # nothing made until it forks
        note = tracing.close_task(5, 1.0, 2.0, [b"x"], [b"y"])
        assert len(note) == protocol.fixed_driver_note_packer(0)[1] - protocol.driver_note_packer()[1] + 12
        tracing.open_task()
        rec = tracing.begin(len, ([],), {})
        assert isinstance(rec, tracing.Record) and tracing._local.scope == [rec]
        note = tracing.close_task(6, 1.0, 2.0, [b"x"], [b"y"])
        assert tracing._local.scope is None
        ((key, body),) = protocol.split_notes(note)
        fields, kids = protocol.decode_worker_note(body)
        assert key == 6 and fields[2:] == (1, 1, 1, 1) and json.loads(bytes(kids))[0]["f"] == "len"
        assert fields[1] - fields[0] == pytest.approx(1.0)  # perf_counter stamps, now wall-clock
    finally:
        tracing._local.scope = None
        tracing._scoped = False  # as a process that never ran a traced task
        tracing._refresh()


def test_results_without_trace_notes_pass_the_broker_untouched() -> None:
    _, _, worker = _broker_with_a_traced_task()
    results = [ResultEntry(k, 0, 0.1, [b"value"]) for k in worker.assigned]
    assert tracing.take_notes(worker, results, 3.0) is results


@pytest.mark.parametrize("frames", [[], [b"a", b"b"], [b"short"], [b"\0" * 8 + b"\x00\x00\x00\x09x"],
                                    [b"\0" * 8 + b"\x00\x00\x00\x02xx"]])
def test_malformed_trace_notes_are_dropped_and_their_results_go_on(frames: list[bytes]) -> None:
    state, _, worker = _broker_with_a_traced_task()
    k5, k6 = list(worker.assigned)
    if frames and len(frames[0]) > 8:  # name a task we hold
        frames = [k5.to_bytes(8, "big") + frames[0][8:]]
    results = [ResultEntry(0, 0, 0.0, frames, Flag.TRACE), ResultEntry(k5, 0, 0.1, [b"v5"]),
               ResultEntry(k6, 0, 0.1, [b"v6"])]
    entries = tracing.take_notes(worker, results, 3.0)
    assert [e.id for e in entries] == [k5, k6]
    state.results(worker, entries, now=state.last_now)
    sent, _ = outbox(state)
    assert [e.id for e in sent[b"D1"]] == [5, 6]  # no notes, both results


def test_the_ring_keeps_the_latest_forks_and_counts_the_rest() -> None:
    t = tracing.Trace(capacity=3)
    for i in range(5):
        rec = tracing.Record(f"f{i}", [], float(i))
        t._add(rec)
        rec.finish(0, 0, None)
    assert [x.func for x in t.tasks()] == ["f2", "f3", "f4"] and t.dropped == 2
    assert "2 earlier forks dropped" in str(t.graph)
    with pytest.raises(ValueError, match="capacity"):
        tracing.Trace(capacity=0)


def test_the_chrome_trace_of_a_producer_and_a_taker_has_slices_flows_and_names() -> None:
    a = tracing.Record("make", [], 100.0)
    a.gid, a.done, a.status = "d#1", 100.01, "ok"
    a.remote = _remote((100.001, 100.002, 100.009), (100.003, 100.004, 100.005), worker="w/0")
    b = tracing.Record("take", ["d#1"], 100.0005)
    b.gid, b.done, b.status = "d#2", 100.02, "ok"
    b.remote = _remote((100.001, 100.006, 100.019), (100.007, 100.008, 100.009), worker="w/1")
    ev = _trace_with(a, b, started=100.0).chrome()["traceEvents"]
    tasks = [e for e in ev if e["ph"] == "X" and e["cat"] == "task"]
    assert [(e["name"], e["ts"], e["dur"]) for e in tasks] == [("take", 8000.0, 1000.0), ("make", 4000.0, 1000.0)][::-1]
    flows = [(e["ph"], e["cat"]) for e in ev if e["ph"] in "sf"]
    assert flows.count(("s", "value")) == 1 and flows.count(("f", "fork")) == 2
    names = {e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"w/0", "w/1"} <= names
    assert json.loads(json.dumps(ev)) == ev


def test_inline_mode_forks_are_traced_as_run_in_the_caller() -> None:
    import distfork

    distfork.init(mode="inline")
    try:
        with distfork.trace() as t:
            a = distfork.fork(sum, [1, 2])
            assert distfork.fork(pow, a.result(), 2).result() == 9
            with pytest.raises(ZeroDivisionError):
                distfork.fork(divmod, 1, 0).result()
    finally:
        distfork.shutdown()
    x, y, z = t.tasks()
    assert [x.func, y.func, z.func] == ["sum", "pow", "divmod"]
    assert {x.where, y.worker, z.status} == {"inline", "raised"}
    assert x.started is not None and x.finished is not None and x.submitted <= x.started <= x.finished
    assert "ZeroDivisionError" in z.error
    assert not tracing.ACTIVE  # untraced forks pay the flag test again, nothing more


def test_a_traced_tasks_scope_belongs_to_the_thread_that_entered_it() -> None:
    import threading

    scope: list[tracing.Record] = []
    prev = tracing.enter(scope, sticky=False)
    try:
        seen: list[object] = []
        other = threading.Thread(target=lambda: seen.append((tracing._local.scope, tracing.begin(len, (), {}))))
        other.start()
        other.join(10)
        assert seen == [(None, None)]  # another thread: no scope, and no open trace: not recorded
        rec = tracing.begin(len, (), {})
        assert scope == [rec] and rec is not None and rec.func == "len"
    finally:
        tracing.leave(prev, sticky=False)
    assert tracing._local.scope is None


def test_finish_reads_status_held_and_failure_from_the_wire_codes() -> None:
    import concurrent.futures

    from distfork.protocol import Status

    t = tracing.Trace(capacity=10)
    recs = [tracing.Record(f"f{i}", [], float(i)) for i in range(3)]
    for rec in recs:
        t._add(rec)
    failed: concurrent.futures.Future[Any] = concurrent.futures.Future()
    failed.set_exception(ValueError("no good"))
    recs[0].finish(int(Status.OK), int(Flag.HELD), None)
    recs[1].finish(int(Status.RAISED), 0, failed)
    fine: concurrent.futures.Future[Any] = concurrent.futures.Future()
    fine.set_result(None)
    recs[2].finish(250, 0, fine)  # a code this version does not know: named by its number
    got = {x.func: (x.status, x.path_out, x.error) for x in t.tasks()}
    assert got == {"f0": ("ok", "held", ""), "f1": ("raised", "", "ValueError: no good"), "f2": ("250", "", "")}


class _Driver:
    """What a trace reads of a driver: its name and its traced forks awaiting results."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._traced: dict[int, tracing.Pending] = {}


def _open_trace_fork(capacity: int = 10) -> tuple[tracing.Trace, tracing.Pending]:
    t = tracing.Trace(capacity=capacity).__enter__()
    try:
        pending = tracing.begin(len, ("d#1",), {}, light=True)
    finally:
        t.close()  # closed before the result arrives: the fork is still reported
    assert pending is not None
    return t, pending


def test_a_drivers_fork_is_plain_values_the_collector_skips_until_one_ring_entry_with_its_batchs_notes() -> None:
    import gc

    driver = _Driver("drv")
    tracing.DRIVERS.add(driver)
    t, pending = _open_trace_fork()
    assert isinstance(pending, complex)  # no futures among its arguments: one number, not even a tuple
    driver._traced[7] = pending
    gc.collect()
    assert not gc.is_tracked(pending)  # thousands in flight cost the garbage collector nothing
    (info,) = t.tasks()
    assert (info.func, info.status, info.worker) == ("len", "pending", "")
    note = protocol.encode_driver_note(_BROKER, _WHO, protocol.encode_worker_note(*_WORKER))
    batch = protocol.encode_notes([(6, b"another task's"), (7, note)]).frames[0]
    tracing.finish(driver._traced.pop(7), 0, int(Flag.HELD), None, "drv", 7, batch)
    gc.collect()
    assert not gc.is_tracked(t._done[0])
    (info,) = t.tasks()
    assert (info.func, info.status, info.worker, info.host, info.pid) == ("len", "ok", "w/0", "h", 9)
    assert info.started is not None and info.finished is not None
    assert info.run_s == pytest.approx(0.7) and (info.bytes_in, info.path_in, info.path_out) == (10, "inline", "held")


def test_a_fork_sent_again_keeps_its_first_id_for_the_forks_that_took_it_and_a_bad_batch_is_counted() -> None:
    t, first = _open_trace_fork()
    tracing.finish(tracing.again(first, 1), 0, 0, None, "d", 2, b"\0\0\0")  # RESUBMIT: task 1 went again as 2
    expanded = tracing._expand(first) if isinstance(first, (tuple, complex)) else None
    assert expanded is not None and expanded[:2] == ("len", ())
    taker = tracing.Record("sum", ["d#1"], expanded[2] + 1)  # took the future of task 1
    taker.gid = "d#3"
    t._add(taker)
    taker.finish(0, 0, None)
    a, b = t.tasks()
    assert (a.func, b.func, b.deps) == ("len", "sum", [a.id])
    assert a.worker == "" and t.bad_notes == 1  # its batch's notes were cut short: left out, counted


def test_a_batchs_forks_are_two_appends_each_and_one_ring_entry_that_drops_its_oldest_when_full() -> None:
    driver = _Driver("drv")
    t = tracing.Trace(capacity=5).__enter__()
    try:
        forks = {i: tracing.begin(len, (), {}, light=True) for i in range(1, 9)}
    finally:
        t.close()
    note = protocol.encode_driver_note(_BROKER, _WHO, protocol.encode_worker_note(*_WORKER))
    blob = protocol.encode_notes([(i, note) for i in range(1, 9)])
    for ids in ((1, 2, 3), (4, 5, 6, 7, 8)):
        batch, rest = tracing.notes_of([blob, *(ResultEntry(i, 0, 0.0, [b""]) for i in ids)], driver._traced)
        assert isinstance(batch, tracing._Batch) and [e.id for e in rest] == list(ids)
        for i in ids:
            pending = forks[i]
            assert pending is not None
            tracing.finish(pending, 0, int(Flag.HELD) if i == 8 else 0, None, "drv", i, batch)
        assert batch.ids == list(ids)
    tracing.finish(forks[1], int(Status.CANCELLED), 0, None, "drv", 9)  # one more, alone: the batches settle
    got = [(x.func, x.worker, x.path_out, x.status) for x in t.tasks()]
    assert got == [("len", "", "", "cancelled")] + [("len", "w/0", "shm", "ok")] * 3 + [("len", "w/0", "held", "ok")]
    assert t.dropped == 4 and len(t._done) == 2  # batch 1 dropped whole, batch 2 cut to its last 4


def test_the_ring_of_driver_forks_keeps_the_latest_and_counts_the_rest() -> None:
    t, pending = _open_trace_fork(capacity=2)
    for i in range(5):
        tracing.finish(pending, 0, 0, None, "d", i + 1)
    assert [x.func for x in t.tasks()] == ["len", "len"] and t.dropped == 3


def test_a_workers_note_has_one_layout_on_its_quick_path_and_with_forks_or_many_frames() -> None:
    quick = tracing.worker_note(5, 2.0, 3.0, [b"x" * 40], [b"y" * 4], [])
    assert quick == protocol.encode_framed_worker_note(5, 2.0, 3.0, 40, 4, 1, 1)
    kid = tracing.Record("g", [], 1.5)
    full = tracing.worker_note(5, 2.0, 3.0, [b"x" * 40], [b"a", b"b", b"c"], [kid])
    ((key, note),) = protocol.split_notes(full)
    fields, kids = protocol.decode_worker_note(note)
    assert key == 5 and fields == (2.0, 3.0, 40, 3, 1, 3) and json.loads(bytes(kids))[0]["f"] == "g"


def test_the_names_behind_pending_numbers_go_with_the_last_trace_that_could_read_them() -> None:
    import gc

    t = tracing.Trace(capacity=10).__enter__()
    try:
        a, b = tracing.begin(len, (), {}, light=True), tracing.begin(len, (), {}, light=True)
    finally:
        t.close()
    assert isinstance(a, complex) and isinstance(b, complex) and a.imag == b.imag  # one number per name
    kid = int(a.imag)
    assert tracing._expand(a) == ("len", (), a.real, tracing._kinds[kid][1], ())
    del t
    gc.collect()
    with tracing.Trace(capacity=10):  # the next change of traces prunes what nobody can read
        pass
    assert kid not in tracing._kinds and tracing._expand(a) is None
