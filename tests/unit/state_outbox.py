"""Read a BrokerState's instructions the way its older tests were written.

``BrokerState.take_instructions`` hands over everything decided at once; the
table tests ask about one kind at a time (what was dispatched, then what went
to the drivers). These helpers take the instructions, answer with one kind and
keep the rest for the next question about another kind, so no instruction is
lost or seen twice.
"""

from __future__ import annotations

import weakref
from typing import Any

from distfork.broker_instructions import (
    Abort,
    Cancel,
    Discard,
    Instruction,
    Reclaimed,
    Recycle,
    SendResults,
    SendTasks,
    UnlinkOrphan,
)
from distfork.broker_state import BrokerState, Task
from distfork.protocol import Entry

_kept: weakref.WeakKeyDictionary[BrokerState, list[Instruction]] = weakref.WeakKeyDictionary()


def take(state: BrokerState, *kinds: type) -> list[Any]:
    """The instructions of these kinds, in order; the others stay for later."""
    pending = _kept.pop(state, []) + state.take_instructions()
    mine = [i for i in pending if isinstance(i, kinds)]
    rest = [i for i in pending if not isinstance(i, kinds)]
    if rest:
        _kept[state] = rest
    return mine


def dispatch(state: BrokerState, now: float | None = None) -> dict[bytes, list[Task]]:
    """Dispatch at ``now`` (default: the latest time the state was told); the tasks sent, per worker."""
    state.dispatch(state.last_now if now is None else now)
    out: dict[bytes, list[Task]] = {}
    for ins in take(state, SendTasks):
        out.setdefault(ins.worker, []).extend(ins.tasks)
    return out


def outbox(state: BrokerState) -> tuple[dict[bytes, list[Entry]], dict[bytes, list[int]]]:
    """Results per driver and cancels per worker slot, sent since last asked."""
    results: dict[bytes, list[Entry]] = {}
    cancels: dict[bytes, list[int]] = {}
    for ins in take(state, SendResults, Cancel):
        if isinstance(ins, SendResults):
            results.setdefault(ins.driver, []).extend(ins.entries)
        else:
            cancels.setdefault(ins.worker, []).extend(ins.keys)
    return results, cancels


def aborts(state: BrokerState) -> dict[bytes, list[int]]:
    """Running tasks to stop, per worker process control socket."""
    out: dict[bytes, list[int]] = {}
    for ins in take(state, Abort):
        out.setdefault(ins.control, []).extend(ins.keys)
    return out


def discards(state: BrokerState) -> dict[bytes, list[Entry]]:
    out: dict[bytes, list[Entry]] = {}
    for ins in take(state, Discard):
        out.setdefault(ins.worker, []).extend(ins.entries)
    return out


def recycles(state: BrokerState) -> tuple[dict[bytes, list[str]], list[str]]:
    """Segments sent back per worker, and the orphans the broker unlinks itself."""
    out: dict[bytes, list[str]] = {}
    orphans: list[str] = []
    for ins in take(state, Recycle, UnlinkOrphan):
        if isinstance(ins, Recycle):
            out.setdefault(ins.worker, []).extend(ins.names)
        else:
            orphans.append(ins.name)
    return out, orphans


def reclaimed(state: BrokerState, now: float | None = None) -> list[int]:
    """Dispatch, then what the reclaims asked since were granted (all drivers)."""
    state.dispatch(state.last_now if now is None else now)
    return [task_id for ins in take(state, Reclaimed) for task_id in ins.granted]
