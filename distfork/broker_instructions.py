"""What :class:`~distfork.broker_state.BrokerState` decided, for the broker's socket loop to carry out.

The state machine never sends: each of its methods records decisions, and
:meth:`BrokerState.take_instructions` hands them over as one list of these
typed instructions, in the order the loop must carry them out (the way
dask's ``worker_state_machine`` returns ``Instructions``). ``broker.py``
turns each into one or more messages (or an ``shm.unlink`` call); it decides
nothing itself.

Peers are routing ids (``bytes``). Entries are ready to encode: task entries
already carry their wire payload and flags (``Flag.RESULT_SHM`` included).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Union

from .protocol import ResultEntry, TaskEntry

if TYPE_CHECKING:
    from .broker_state import Task

__all__ = [
    "Abort",
    "Cancel",
    "ClusterNotice",
    "Discard",
    "Instruction",
    "Recycle",
    "Reclaimed",
    "Reject",
    "SendResults",
    "SendTasks",
    "UnlinkOrphan",
]


class SendTasks(NamedTuple):
    """TASKS to a worker slot: ``tasks`` (the table's records) as their wire ``entries``."""

    worker: bytes
    tasks: list[Task]
    entries: list[TaskEntry]


class SendResults(NamedTuple):
    """RESULTS to a driver (trace notes, if any, first)."""

    driver: bytes
    entries: list[ResultEntry]


class Cancel(NamedTuple):
    """CANCEL to a worker slot: drop these task keys (queued there, or their results when they come)."""

    worker: bytes
    keys: list[int]


class Abort(NamedTuple):
    """CANCEL to a worker process's control socket: stop these running tasks (the process ends)."""

    control: bytes
    keys: list[int]


class Discard(NamedTuple):
    """DISCARD to a worker: results nobody takes, back to their maker to free their shared memory."""

    worker: bytes
    entries: list[ResultEntry]


class Recycle(NamedTuple):
    """RECYCLE to a worker: result segments to reuse (its own) or unlink (orphans of its /dev/shm)."""

    worker: bytes
    names: list[str]


class UnlinkOrphan(NamedTuple):
    """A segment in the broker's own /dev/shm whose maker is gone and no worker there can unlink it."""

    name: str


class ClusterNotice(NamedTuple):
    """CLUSTER to a driver: the set of workers changed."""

    driver: bytes
    facts: dict[str, Any]


class Reclaimed(NamedTuple):
    """RECLAIMED to a driver: which of the queued tasks it asked back it may run itself."""

    driver: bytes
    granted: list[int]
    asked: Sequence[int]


class Reject(NamedTuple):
    """REJECT to a peer we do not know (typically: we restarted): it says hello again."""

    peer: bytes
    reason: str


Instruction = Union[  # noqa: UP007 - a runtime alias; isinstance() needs the members
    SendTasks, SendResults, Cancel, Abort, Discard, Recycle, UnlinkOrphan, ClusterNotice, Reclaimed, Reject
]
