"""The broker side of the direct path (its loop thread): DIRECT notices and Flag.DIRECT results.

A driver's notice makes a task it sent straight to a slot an ordinary task
of that driver, ASSIGNED to that slot; the slot's result header completes
it. The whole path: ``distfork/direct.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import protocol
from .errors import ProtocolError
from .protocol import DIRECT_KEY_BASE, Flag, ResultEntry, Status, TaskEntry

if TYPE_CHECKING:
    from .broker_state import BrokerState, PeerInfo

__all__ = ["Adopter"]


class Adopter:
    """The broker's part (its loop thread): DIRECT notices from drivers, Flag.DIRECT results from slots."""

    def __init__(self) -> None:
        # Results of direct tasks that came before their driver's notice: key -> (status, run_s, frames,
        # flags). Only a header (Flag.DIRECT), unless the slot could not reach the driver.
        self.early: dict[int, tuple[int, float, Sequence[Any], int]] = {}
        # Keys of the tasks adopted lately: a task that forked has two notices, its driver's and the one
        # its slot's process relayed (see relay()); the second is ignored.
        self.seen: dict[int, None] = {}

    def results(self, state: BrokerState, worker: PeerInfo, entries: list[ResultEntry]) -> list[ResultEntry]:
        """Before ``BrokerState.results``: keep the direct results whose notice has not come yet
        (the driver batches its notices: usually the result comes first); the others go on."""
        if not any(e.id >= DIRECT_KEY_BASE for e in entries):
            return entries
        rest = []
        for e in entries:
            task = worker.assigned.get(e.id) if e.flags & Flag.DIRECT else None
            if task is not None and task.dependents:
                # Calls name it, but its value went straight to the driver (it answered before its
                # slot heard of them, see DirectClient.route): the driver sends them again with it.
                self._resubmit(state, task.dependents)
                task.dependents = None
            if e.id >= DIRECT_KEY_BASE and e.id not in worker.assigned:
                if len(self.early) > 100_000:  # notices that never came (their driver left)
                    self.early.clear()
                self.early[e.id] = (e.status, e.run_s, e.frames, e.flags)
            else:
                rest.append(e)
        return rest

    @staticmethod
    def _resubmit(state: BrokerState, dependents: Sequence[Any]) -> None:
        from .broker_state import TaskState

        for d in dependents:
            if d.state is TaskState.WAITING:
                state.counters["tasks_resubmitted"] += 1
                state._finish(d, Status.RESUBMIT, 0.0, [])

    def adopt(self, state: BrokerState, driver: PeerInfo, entries: Sequence[TaskEntry], now: float) -> None:
        """A driver sent these tasks straight to slots: they are its tasks, assigned to those slots."""
        from .broker_state import Task  # here: broker_state does not import us

        state._now = now
        for e in entries:
            if not e.frames:
                raise ProtocolError("a direct task without its origin")
            slot_id, task_id = protocol.decode_origin(e.frames[0])
            payload = e.frames[1:]
            owner: PeerInfo | None = driver
            if e.flags & Flag.NESTED:  # relayed by the slot's process: the driver is named next
                if len(e.frames) < 2:
                    raise ProtocolError("a relayed direct task without its driver")
                owner, payload = state.peers.get(bytes(e.frames[1])), e.frames[2:]
            if e.id in self.seen:
                del self.seen[e.id]
                continue
            if owner is None or task_id in owner.tasks:
                continue
            self.seen[e.id] = None
            if len(self.seen) > 10_000:  # the other notice of most never comes: forget the oldest
                for key in list(self.seen)[:5_000]:
                    del self.seen[key]
            driver = owner
            task = Task(e.id, driver.id, task_id, e.max_retries, e.timeout_s, payload, driver.domain,
                        submitted=now)
            driver.tasks[task_id] = task
            state.counters["tasks_submitted"] += 1
            state.counters["tasks_direct"] += 1
            early = self.early.pop(e.id, None)
            worker = state.workers.get(slot_id)
            if early is not None:  # it ran already
                status, run_s, frames, flags = early
                state._finish(task, status, run_s, frames, flags)
            elif worker is not None:
                # Handed to the slot before we heard of this task (children it forked from a thread of
                # its own, not relayed): they wait behind it there, and it may wait for them. Take them
                # back. Not direct tasks: the slot has those already (their results are on the way).
                waiting = [t for t in worker.assigned.values() if t.key < DIRECT_KEY_BASE]
                if waiting:
                    state._cancels.setdefault(worker.id, []).extend(t.key for t in waiting)
                    for t in reversed(waiting):
                        del worker.assigned[t.key]
                        state._requeue(t)
                    state.counters["tasks_stolen"] += len(waiting)
                state._give(worker, task, {})
            else:  # the slot was lost before we heard of this task: run it again elsewhere
                state._requeue(task)
