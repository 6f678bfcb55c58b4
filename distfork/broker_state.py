"""The broker's task table and scheduling, as plain Python without sockets.

Every method takes ``now`` (monotonic seconds) instead of reading a clock, so
the whole state machine is unit-tested with a fake clock
(tests/unit/test_broker_state.py). ``broker.py`` wraps it in a socket loop:
it decodes messages, calls the matching method here, calls
:meth:`BrokerState.dispatch`, then carries out the instructions
:meth:`BrokerState.take_instructions` returns (distfork/broker_instructions.py):
every decision is made here, every send and unlink there.

A task's life::

    submit ──▶ QUEUED ──dispatch──▶ ASSIGNED(worker W) ──result──▶ (gone: result sent to driver)
      │          ▲                        │
      │          └── W lost, retry left ──┘── W lost, no retry left ──▶ LOST result
      └─▶ WAITING (for the tasks whose futures its arguments name) ──all done──▶ QUEUED
    cancel: QUEUED, WAITING ──▶ gone;  ASSIGNED ──▶ CANCEL sent to W, gone

Futures as arguments: a task whose arguments name unfinished futures of its
driver waits here until they finish. A result some waiting task takes is
*held* (:class:`Hold`): the broker keeps its frames and hands them to every
task that takes it, and tells the driver only that the value is ready
(``Flag.HELD``); the driver fetches it when its user asks (FETCH) or lets go
of it (RELEASE). So a large intermediate value goes from worker to worker
through the broker (or by name through shared memory) and never through the
driver. A failed dependency fails its dependents with its own outcome,
unrun.

Payload frames are opaque: they are stored and forwarded, never unpickled.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import logging
import random
import signal
from collections.abc import Sequence
from typing import Any

from . import resources
from .broker_instructions import (
    Abort,
    Cancel,
    ClusterNotice,
    Discard,
    Instruction,
    Reclaimed,
    Recycle,
    Reject,
    SendResults,
    SendTasks,
    UnlinkOrphan,
)
from .config import REBALANCE_ANY_S, STALL_S, STARVED_STALL_S, Config
from .errors import ProtocolError
from .protocol import (
    DEFAULT_RETRIES,
    DIRECT_KEY_BASE,
    Flag,
    Frame,
    Keepalive,
    ResultEntry,
    Role,
    Status,
    TaskEntry,
    decode_deps,
    decode_request,
    encode_dep_counts,
    encode_devices,
    notes_entry,
)
from .shm import creator, parse, segment_of

__all__ = ["BrokerState", "Hold", "PeerInfo", "Task", "TaskState"]

log = logging.getLogger(__name__)

#: Counter of failed tasks by their Status (distfork/metrics.py exports them by reason).
_FAILED_COUNTERS: dict[int, str] = {s: f"tasks_failed_{s.name.lower()}" for s in Status if s != Status.OK}


class TaskState(enum.Enum):
    QUEUED = "queued"
    WAITING = "waiting"  # for the results of the futures its arguments name
    ASSIGNED = "assigned"
    CANCELLED = "cancelled"
    DONE = "done"


# Hot paths read these once: reading an enum member (TaskState.QUEUED) costs ~150 ns on Python 3.11.
_QUEUED, _ASSIGNED, _DONE = TaskState.QUEUED, TaskState.ASSIGNED, TaskState.DONE
_OK, _RESUBMIT = int(Status.OK), int(Status.RESUBMIT)


@dataclasses.dataclass(eq=False, slots=True)
class Task:
    key: int  # broker-wide id, what workers see
    driver: bytes
    task_id: int  # the driver's id
    max_retries: int
    timeout_s: float
    frames: Sequence[Frame]
    # /dev/shm domain of the driver: where a result may travel by shared memory,
    # and (if pinned) the only domain whose workers can read the arguments.
    domain: str | None = None
    pinned: bool = False
    owner_pid: int = 0  # the driver's pid (names the owner of a shared-memory result)
    nested: bool = False  # forked by a task: never prefetched (its parent may reclaim it)
    state: TaskState = TaskState.QUEUED
    worker: bytes | None = None
    losses: int = 0  # times a worker died while running it
    # It was on a worker that was lost: it runs alone (never prefetched, nothing
    # prefetched behind it), so that a loss while it runs is blamed on it exactly.
    suspect: bool = False
    submitted: float = 0.0  # when it reached the broker (monotonic s), for the latency metric
    # The futures its arguments name, by index: the producing Task until it is done, then its Hold.
    deps: list[Task | Hold] | None = None
    missing: int = 0  # of those, not done yet (state WAITING while > 0)
    dependents: list[Task] | None = None  # tasks that take this one's result (some may be gone)
    fetch: bool = False  # the driver asked for the value while it ran: send it even if held
    # What it asks of the worker (options(resources=..., labels=...)): distfork/resources.py places it.
    needs: dict[str, float] | None = None
    labels: dict[str, str] | None = None
    devices: list[int] | None = None  # the GPU ids it was given where it runs
    trace: int = 0  # Flag.TRACE if forked inside distfork.trace(): passed on to the worker
    dispatched: float = 0.0  # when it was last handed to a worker (monotonic s), for traces
    note: bytes | None = None  # traced: its driver's trace note with its head, sent with its result (take_notes)

    def wire(self) -> tuple[Sequence[Frame], int]:
        """The payload to hand a worker, and the flags it needs: held dependency values first."""
        if self.devices is not None:  # its GPUs go first (Flag.RESOURCES), then what follows
            frames, flags = self._wire()
            return [encode_devices(self.devices), *frames], flags | Flag.RESOURCES
        return self._wire()

    def _wire(self) -> tuple[Sequence[Frame], int]:
        if not self.deps:
            return self.frames, self.trace
        counts: list[int] = []
        values: list[Frame] = []
        for dep in self.deps:
            if not isinstance(dep, Hold):
                raise RuntimeError(f"task {self.key} dispatched with a dependency not done")
            counts.append(len(dep.frames))
            values.extend(dep.frames)
        return [encode_dep_counts(counts), *values, *self.frames], Flag.DEPS | self.trace


@dataclasses.dataclass(eq=False)
class Hold:
    """A result kept in the broker because tasks take it as an argument."""

    task_id: int  # the driver's id of the task that made it
    driver: bytes
    frames: Sequence[Frame]
    worker: bytes | None  # the slot that made it: its process created the segment
    segment: str | None  # its shared-memory segment, if it has one
    domain: str | None  # the /dev/shm that segment is in
    refs: int = 0  # unfinished tasks that take it
    driver_has: bool = True  # the driver may still fetch it, or maps it now
    retained: bool = False  # a task kept a mapping of the segment: unlink it, never reuse it


@dataclasses.dataclass(eq=False)
class PeerInfo:
    """A registered driver or worker."""

    id: bytes
    role: Role
    info: dict[str, Any]
    last_seen: float
    slots: int = 0
    # worker: tasks handed to it, in the order it will start them.
    assigned: dict[int, Task] = dataclasses.field(default_factory=dict)
    # driver: its unfinished tasks by the driver's task id.
    tasks: dict[int, Task] = dataclasses.field(default_factory=dict)
    done: int = 0
    failed: int = 0
    # worker: moving average of its tasks' run times (None: no task done yet).
    avg_run_s: float | None = None
    # worker: the fastest batch average lately (it may double each batch): a hiccup that lifts the
    # average of a worker of tiny tasks does not make it look overfed (distfork/broker_state.py _overfed).
    fast_run_s: float | None = None
    # worker: the control socket of its process (KEEPALIVE sender), told to end running tasks.
    control: bytes | None = None
    # worker: when it last showed progress (a result, or work handed to it while idle).
    progress_at: float = 0.0
    # worker: handed tasks beyond its slots since it was last idle (some of them may
    # have finished, their results held back by the worker, when it is lost).
    batched: bool = False
    # worker: resident memory of its process in bytes, from its KEEPALIVE (None: not told).
    rss_bytes: int | None = None
    # driver: results held for it, by its task id.
    holds: dict[int, Hold] = dataclasses.field(default_factory=dict)
    # driver: payload bytes of the results sent to it.
    result_bytes: int = 0

    @property
    def domain(self) -> str | None:
        """Which /dev/shm the peer sees (None: it uses no shared memory)."""
        d = self.info.get("shm_domain")
        return d if isinstance(d, str) and d else None


class BrokerState:
    """Task table, queue, workers and drivers of one broker."""

    def __init__(self, config: Config, now: float, domain: str | None = None) -> None:
        """``domain``: the /dev/shm the broker itself sees (it unlinks orphans there); None: none."""
        self.config = config
        self.domain = domain
        self.started = now
        self.queue: collections.deque[Task] = collections.deque()
        # Tasks whose arguments sit in a domain's shared memory wait here for a
        # worker of that domain.
        self.pinned: dict[str, collections.deque[Task]] = {}
        # Tasks that ask for resources or labels: placed by resources.place, never prefetched.
        self.resource_queue: collections.deque[Task] = collections.deque()
        self.peers: dict[bytes, PeerInfo] = {}
        self.workers: dict[bytes, PeerInfo] = {}
        # Keys start at a random point: after a broker restart, a result for a task
        # of the old broker (still running on a worker) must not match a new task.
        self._next_key = random.getrandbits(48) + 1
        self.counters: collections.Counter[str] = collections.Counter()
        # What the socket loop must do next (take_instructions turns these into one list).
        self._tasks_out: dict[bytes, list[Task]] = {}  # handed to each worker by dispatch
        self._reclaims: list[tuple[PeerInfo, list[int]]] = []  # answered after the next dispatch
        self._reclaimed: list[Reclaimed] = []  # those answers
        self._replies: list[Instruction] = []  # to peers we do not know: first, in the order they came
        self._results: dict[bytes, list[ResultEntry]] = {}
        self._notes: dict[bytes, list[bytes]] = {}  # trace notes per driver (with their heads), sent with the results
        self.recent_failures: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)  # for the dashboard
        self._cancels: dict[bytes, list[int]] = {}
        self._discards: dict[bytes, list[ResultEntry]] = {}
        self._aborts: dict[bytes, list[int]] = {}
        # Running tasks to stop on a worker whose control socket we do not know yet (no KEEPALIVE
        # from it since it registered): sent with its first one.
        self._unsent_aborts: dict[bytes, list[int]] = {}
        self._recycles: dict[bytes, list[str]] = {}  # hold segments back to the worker that made them
        self._orphans: list[tuple[str, str | None]] = []  # hold segments (and domain) whose maker is gone
        self.hold_segments: dict[str, Hold] = {}
        # Tasks still in a queue that were cancelled or reclaimed (dropped when a worker reaches them):
        # the queue-depth gauge leaves them out.
        self.stale_queued = 0
        self._now = now  # the latest time we were told, for bookkeeping between calls
        self._cluster_changed = False

    @property
    def last_now(self) -> float:
        """The latest ``now`` a method that records time was given (tests replay calls at that time)."""
        return self._now

    # -- peers ---------------------------------------------------------------

    def hello(self, peer: bytes, info: dict[str, Any], now: float) -> PeerInfo:
        """Register (or re-register) a driver or worker."""
        role = Role(info.get("role"))  # ValueError: not a role
        slots = int(info.get("slots", 1)) if role is Role.WORKER else 0
        if role is Role.WORKER and slots < 1:
            raise ValueError(f"worker announced {slots} slots")
        old = self.peers.get(peer)
        if old is not None and old.role is role:
            # Routing ids are random per process: this is the same peer saying
            # hello again (answering a late REJECT). Keep its tasks: the worker
            # still runs what it was handed, the driver re-submits (ignored).
            old.info, old.last_seen, old.slots = info, now, slots
            return old
        if old is not None:
            self._forget(old, now, reason="re-registered with another role")
        p = PeerInfo(peer, role, info, now, slots=slots)
        self.peers[peer] = p
        if role is Role.WORKER:
            self.workers[peer] = p
            self._cluster_changed = True
            log.info("worker %s joined: host %s pid %s, %d slots",
                     p.info.get("name"), info.get("host"), info.get("pid"), slots)
        return p

    def seen(self, peer: bytes, now: float) -> PeerInfo | None:
        """Note traffic from ``peer``; None if it never said hello."""
        p = self.peers.get(peer)
        if p is not None:
            p.last_seen = now
        return p

    def bye(self, peer: bytes, now: float) -> None:
        p = self.peers.get(peer)
        if p is not None:
            self._forget(p, now, reason="said goodbye")

    def keepalive(self, control: bytes, body: Keepalive, now: float) -> None:
        """A worker process vouches for its slots, or says they end (and why)."""
        slots = [self.workers.get(peer) for peer in body.peers]
        if not body.bye:
            rss_bytes = body.rss_bytes
            for w in slots:
                if w is not None:
                    w.last_seen = now
                    w.control = control
                    w.rss_bytes = rss_bytes
                    unsent = self._unsent_aborts.pop(w.id, None)
                    if unsent:
                        self._aborts.setdefault(control, []).extend(unsent)
            return
        timed_out = body.timed_out
        interrupted = bool(timed_out or body.cancelled)
        for w in slots:
            if w is None:
                continue
            for key in timed_out & set(w.assigned):
                task = w.assigned.pop(key)
                text = (
                    f"the task ran longer than its timeout_s={task.timeout_s:g} on worker {w.info.get('name')} "
                    f"(host {w.info.get('host')}, pid {w.info.get('pid')}), which was ended to stop it"
                )
                self._finish(task, Status.TIMED_OUT, task.timeout_s, [text.encode()])
                self.counters["tasks_timed_out"] += 1
            # A process that ended itself to stop one task blames the others for nothing.
            reason = "ended to stop a task" if interrupted else "said goodbye"
            self._forget(w, now, reason=reason, blame=not interrupted)

    def exited(self, host: str, pid: int, code: int, now: float, oom: bool = False) -> None:
        """A supervisor saw a worker process end: forget its slots at once, naming the exit.

        ``oom``: the supervisor saw the kernel's OOM killer act (cgroup memory.events).
        """
        reason = f"exited with code {code}" if code >= 0 else f"killed by signal {_signal_name(-code)}"
        for w in [w for w in self.workers.values() if w.info.get("host") == host and w.info.get("pid") == pid]:
            self._forget(w, now, reason=f"its process {reason}{_sigkill_hint(code, oom, w.rss_bytes)}")

    def expire(self, now: float) -> list[PeerInfo]:
        """Forget peers silent for longer than the peer timeout; return them.

        A peer configured with a slower heartbeat than ours (it says so in its
        HELLO) gets that much longer: each side may be tuned on its own.
        """
        liveness, ours = self.config.liveness, self.config.heartbeat_s
        gone = [p for p in self.peers.values() if now - p.last_seen > liveness * max(ours, _heartbeat_of(p))]
        for p in gone:
            self._forget(p, now, reason=f"silent for {now - p.last_seen:.1f} s")
        return gone

    def _forget(self, p: PeerInfo, now: float, reason: str, blame: bool = True) -> None:
        del self.peers[p.id]
        if p.role is Role.WORKER:
            del self.workers[p.id]
            self._unsent_aborts.pop(p.id, None)
            self._cluster_changed = True
            self._requeue_from_lost_worker(p, reason, blame)
        else:
            for task in p.tasks.values():
                if task.state is TaskState.ASSIGNED and task.worker is not None:
                    w = self.workers.get(task.worker)
                    if w is not None:
                        w.assigned.pop(task.key, None)
                        self._cancels.setdefault(w.id, []).append(task.key)
                task.state = TaskState.CANCELLED
            dropped = len(p.tasks)
            p.tasks.clear()
            if dropped:  # free the dropped tasks' payloads now, not when a worker would reach them
                self.queue = collections.deque(t for t in self.queue if t.state is TaskState.QUEUED)
                for domain, q in list(self.pinned.items()):
                    self.pinned[domain] = collections.deque(t for t in q if t.state is TaskState.QUEUED)
                self.stale_queued = 0
            self._results.pop(p.id, None)
            for hold in list(p.holds.values()):
                # Tasks that took it were dropped, but may still run: never reuse the segment.
                hold.refs, hold.driver_has, hold.retained = 0, False, True
                self._maybe_free(hold)
            p.holds.clear()
            self.counters["driver_tasks_dropped"] += dropped
            log.info("driver %s left (%s); dropped %d unfinished tasks", p.info.get("name"), reason, dropped)

    def _requeue_from_lost_worker(self, w: PeerInfo, reason: str, blame: bool) -> None:
        """Tasks of a lost worker: the running ones lose a try (if ``blame``), the prefetched ones none."""
        tasks = list(w.assigned.values())
        w.assigned.clear()
        running, waiting = (tasks[: w.slots], tasks[w.slots :]) if blame else ([], tasks)
        # A worker holds finished results back to send a burst together, so with
        # tasks prefetched behind it, the first task may have finished and a later
        # one crashed. Then the loss is counted but fails nothing: all go back as
        # suspects, which run alone, where the next loss is blamed exactly.
        exact = not w.batched or all(t.suspect for t in running)
        requeue: list[Task] = []
        for task in running:
            task.losses += 1
            limit = self.config.max_retries if task.max_retries == DEFAULT_RETRIES else task.max_retries
            if task.losses > limit and exact:
                text = (
                    f"worker {w.info.get('name')} (host {w.info.get('host')}, pid {w.info.get('pid')}) "
                    f"was lost while running this task ({reason}); it was lost {task.losses} times, "
                    f"more than max_retries={limit}"
                )
                self._finish(task, Status.LOST, 0.0, [text.encode()])
                self.counters["tasks_lost"] += 1
            else:
                requeue.append(task)
                self.counters["tasks_retried"] += 1
        requeue += waiting
        for task in reversed(requeue):
            task.suspect = True
            self._requeue(task)
        level = logging.INFO if reason == "said goodbye" and not tasks else logging.WARNING
        log.log(level, "worker %s left (%s): %d tasks re-queued", w.info.get("name"), reason, len(requeue))

    # -- tasks ---------------------------------------------------------------

    def _requeue(self, task: Task) -> None:
        """Back to the front of its queue, under a new key: a worker that was told to
        drop the old key (stolen from it, or it was lost and came back) must not
        drop the task when it is handed to it again."""
        task.key = self._next_key
        self._next_key += 1
        task.state = TaskState.QUEUED
        task.worker = None
        task.devices = None
        self._queue_of(task).appendleft(task)

    def _queue_of(self, task: Task) -> collections.deque[Task]:
        if task.needs is not None or task.labels is not None:
            return self.resource_queue
        if task.pinned and task.domain is not None:
            q = self.pinned.get(task.domain)
            if q is None:
                q = self.pinned[task.domain] = collections.deque()
            return q
        return self.queue

    def submit(self, driver: PeerInfo, entries: Sequence[TaskEntry], now: float) -> None:
        """Queue tasks from a driver (``now``: when they arrived)."""
        self._now = at = now
        tasks = driver.tasks
        domain = driver.domain
        pid = driver.info.get("pid")
        owner_pid = pid if isinstance(pid, int) and 0 < pid < 2**32 else 0
        for e in entries:
            if e.id in tasks or e.id in driver.holds:
                continue  # re-submitted after a reconnect: we still have it
            frames, dep_ids, bad = e.frames, None, None
            needs = labels = None
            if e.flags & Flag.RESOURCES:
                try:
                    needs, labels = decode_request(frames[0]) if frames else (None, None)
                except ProtocolError as exc:
                    bad = str(exc)
                frames = frames[1:]
            if e.flags & Flag.DEPS:
                try:
                    dep_ids = decode_deps(frames[0]) if frames else []
                except ProtocolError as exc:
                    bad = str(exc)
                frames = frames[1:]
            task = Task(self._next_key, driver.id, e.id, e.max_retries, e.timeout_s, frames, domain,
                        bool(e.flags & Flag.PINNED),
                        owner_pid=owner_pid, nested=bool(e.flags & Flag.NESTED), submitted=at,
                        needs=needs, labels=labels, trace=e.flags & Flag.TRACE)
            self._next_key += 1
            tasks[e.id] = task
            if bad is not None or (dep_ids is not None and not dep_ids):
                self._finish(task, Status.FAILED, 0.0, [f"malformed task: {bad or 'no dependencies'}".encode()])
                continue
            if dep_ids is not None:
                if not self._attach(driver, task, dep_ids):
                    # A future it names finished and went to the driver before this task came.
                    self.counters["tasks_resubmitted"] += 1
                    self._finish(task, Status.RESUBMIT, 0.0, [])
                    continue
                if task.missing:
                    task.state = TaskState.WAITING
                    continue
            self._queue_of(task).append(task)
        self.counters["tasks_submitted"] += len(entries)

    def _attach(self, driver: PeerInfo, task: Task, dep_ids: Sequence[int]) -> bool:
        """Link a task to the tasks or holds its arguments name; False if one is not here (any more)."""
        deps: list[Task | Hold] = []
        for dep_id in dep_ids:
            producer = driver.tasks.get(dep_id)
            hold = driver.holds.get(dep_id)
            if producer is not None and producer is not task and producer.state is not TaskState.DONE:
                deps.append(producer)
            elif hold is not None:
                deps.append(hold)
            else:
                return False
        task.deps = deps
        for dep in deps:
            if isinstance(dep, Hold):
                self._take(task, dep)
        for producer in {id(dep): dep for dep in deps if isinstance(dep, Task)}.values():
            assert isinstance(producer, Task)
            task.missing += 1  # once per producer, however often the arguments name it
            if producer.dependents is None:
                producer.dependents = []
            producer.dependents.append(task)
        return True

    def _take(self, task: Task, hold: Hold) -> None:
        hold.refs += 1
        if hold.segment is not None:
            task.pinned = True  # the value is in the driver's /dev/shm: only its workers can map it

    def _resolve(self, driver: PeerInfo, producer: Task, status: int, extra: float, frames: Sequence[Frame],
                 flags: int) -> tuple[Sequence[Frame], int]:
        """``producer`` is done and tasks wait for it: hold its value for them, or fail them the same way.

        Returns the payload and flags to send the driver for the producer.
        """
        waiting = [d for d in producer.dependents or () if d.state is TaskState.WAITING]
        producer.dependents = None
        if not waiting:
            return frames, flags
        if status != Status.OK:
            for d in waiting:
                self._finish(d, status, extra, frames)  # unrun, with the dependency's own outcome
            return frames, flags
        segment = segment_of(frames)
        hold = Hold(producer.task_id, driver.id, frames, producer.worker, segment, producer.domain)
        driver.holds[producer.task_id] = hold
        if segment is not None:
            self.hold_segments[segment] = hold
        self.counters["results_held"] += 1
        # Ready dependents go to the front of their queue, in order: a value is taken (and its
        # hold freed) soon, instead of after every task queued meanwhile. A burst of
        # fork(g, fork(f, x)) then holds a few values at a time, not one per pipeline.
        for d in reversed(waiting):
            assert d.deps is not None
            d.deps = [hold if dep is producer else dep for dep in d.deps]
            for dep in d.deps:
                if dep is hold:
                    self._take(d, hold)
            d.missing -= 1
            if d.missing == 0:
                d.state = TaskState.QUEUED
                self._queue_of(d).appendleft(d)
        if not producer.fetch:
            # The driver fetches it if its user asks; it learns the segment's name, to unlink it
            # if we restart and lose the hold.
            return ([segment.encode()] if segment is not None else []), flags | Flag.HELD
        if segment is None:
            hold.driver_has = False  # it has its own copy of the frames now
        return frames, flags

    def _release_deps(self, task: Task, flags: int = 0) -> None:
        """A task ended (or was dropped): let go of the held values it took."""
        deps, task.deps = task.deps, None
        for dep in deps or ():
            if isinstance(dep, Hold):
                dep.refs -= 1
                if flags & Flag.RETAINED:
                    dep.retained = True
                self._maybe_free(dep)

    def _maybe_free(self, hold: Hold) -> None:
        """Free a hold nobody takes or may fetch any more; its segment goes back to its maker."""
        if hold.refs > 0 or hold.driver_has:
            return
        driver = self.peers.get(hold.driver)
        if driver is not None and driver.holds.get(hold.task_id) is hold:
            del driver.holds[hold.task_id]
        if hold.segment is None or self.hold_segments.pop(hold.segment, None) is None:
            return
        maker = self.workers.get(hold.worker) if hold.worker is not None else None
        if maker is None:
            self._orphaned([hold.segment], hold.domain)
        elif hold.retained:
            self._discards.setdefault(maker.id, []).append(ResultEntry(0, Status.OK, 0.0, hold.frames))  # unlinked
        else:
            self._recycles.setdefault(maker.id, []).append(hold.segment)  # a warm spare for its next result

    def _orphaned(self, names: Sequence[str], domain: str | None) -> None:
        """Segments of ``domain`` whose maker is gone: a worker that sees them unlinks them
        (RECYCLE of names not its own), else the broker if it shares that /dev/shm."""
        if not names:
            return
        other = next((w for w in self.workers.values() if domain is not None and w.domain == domain), None)
        if other is not None:
            self._recycles.setdefault(other.id, []).extend(names)
        else:
            self._orphans.extend((name, domain) for name in names)

    def fetch(self, driver: PeerInfo, ids: Sequence[int], now: float) -> None:
        """The driver wants these values: held ones are sent now, running ones when they finish."""
        self._now = now
        for task_id in ids:
            hold = driver.holds.get(task_id)
            task = driver.tasks.get(task_id)
            if hold is not None and hold.driver_has:
                self._send_result(driver, ResultEntry(task_id, Status.OK, 0.0, hold.frames))
                if hold.segment is None:
                    hold.driver_has = False
                    self._maybe_free(hold)
                # else the driver maps the segment: it stays held until the driver recycles it
            elif task is not None:
                task.fetch = True

    def release(self, driver: PeerInfo, ids: Sequence[int], now: float) -> None:
        """The driver dropped these held values unfetched."""
        self._now = now
        for task_id in ids:
            hold = driver.holds.get(task_id)
            if hold is not None:
                hold.driver_has = False
                self._maybe_free(hold)

    def recycle(self, driver: PeerInfo, names: Sequence[str], now: float) -> None:
        """Result segments ``driver`` no longer maps: a held one is freed when nobody takes it any more;
        the others go back to the worker process that made them (Recycle), or are orphans."""
        self._now = now
        by_pid: dict[int, list[str]] = {}
        for name in names:
            hold = self.hold_segments.get(name)
            if hold is not None:  # a held value: tasks may still take it
                hold.driver_has = False
                self._maybe_free(hold)
                continue
            pid = creator(name)
            if pid is not None:
                by_pid.setdefault(pid, []).append(name)
        for w in self.workers.values():
            if w.domain is None or w.domain != driver.domain:
                continue  # a pid of another /dev/shm (a container) is another process: it must not take them
            mine = by_pid.pop(w.info.get("pid"), None)  # type: ignore[arg-type]
            if mine:
                self._recycles.setdefault(w.id, []).extend(mine)
        # Their maker is gone: nobody reuses them.
        self._orphaned([name for mine in by_pid.values() for name in mine], driver.domain)

    def unknown_peer(self, peer: bytes, now: float, results: Sequence[ResultEntry] = (),
                     recycled: Sequence[str] = ()) -> None:
        """A message from a peer that never said hello (typically: we restarted): REJECT it, and free
        the shared memory it names, or nobody ever will.

        ``results`` (RESULTS of a worker we do not know: we restarted, or it was
        expired while SIGSTOPped): those in a segment go back as DISCARD, their
        maker unlinks them. ``recycled`` (RECYCLE of a driver we do not know):
        nobody maps those any more; we unlink those that are distfork segments.
        """
        self._now = now
        self.counters["unknown_peer_messages"] += 1
        self._replies.append(Reject(peer, "unknown peer: say hello"))
        gone = [e for e in results if segment_of(e.frames) is not None]
        if gone:
            self._replies.append(Discard(peer, gone))
        self._replies.extend(UnlinkOrphan(name) for name in recycled if parse(name) is not None)

    def results(self, worker: PeerInfo, entries: Sequence[ResultEntry], now: float) -> None:
        """Results from a worker: route each to its driver."""
        self._now = now
        assigned = worker.assigned
        worker.progress_at = max(worker.progress_at, self._now)
        if entries:
            batch_avg = sum(e.run_s for e in entries) / len(entries)
            prev = worker.avg_run_s
            if 0.0 <= batch_avg < float("inf"):  # a NaN from a broken peer would break prefetch() for good
                worker.avg_run_s = batch_avg if prev is None else 0.7 * prev + 0.3 * batch_avg
                fast = worker.fast_run_s
                worker.fast_run_s = batch_avg if fast is None else min(batch_avg, 2 * fast)
        for e in entries:
            task = assigned.pop(e.id, None)
            if task is None:
                self.counters["results_stale"] += 1  # cancelled, or re-queued after a loss
                self._discard(worker.id, e)
                continue
            if e.status == _OK:
                worker.done += 1
            else:
                worker.failed += 1
            self._finish(task, e.status, e.run_s, e.frames, e.flags)
        if not assigned:
            worker.batched = False

    def _discard(self, worker: bytes, e: ResultEntry) -> None:
        """A result nobody takes goes back to its worker, to free its shared memory."""
        if len(e.frames) > 1 and worker in self.workers:
            self._discards.setdefault(worker, []).append(e)

    def _finish(self, task: Task, status: int, extra: float, frames: Sequence[Frame], flags: int = 0) -> None:
        task.state = _DONE
        if task.deps is not None:
            self._release_deps(task, flags)
        driver = self.peers.get(task.driver)
        if driver is None or driver.tasks.pop(task.task_id, None) is None:
            if task.worker is not None:
                self._discard(task.worker, ResultEntry(task.key, status, extra, frames))
            return
        if task.dependents is not None:
            frames, flags = self._resolve(driver, task, status, extra, frames, flags)
        if status == _RESUBMIT:  # not an outcome: the driver sends the task again
            self._send_result(driver, ResultEntry(task.task_id, status, extra, frames, flags))
            return
        driver.done += 1
        if status != _OK:
            self._failed(driver, task, status, frames)
        if task.note is not None:  # traced: where and when it ran goes with the result
            self._notes.setdefault(driver.id, []).append(task.note)
        if status == _OK:
            self.counters["tasks_succeeded"] += 1
        else:
            driver.failed += 1
            self.counters["tasks_failed"] += 1
            self.counters[_FAILED_COUNTERS.get(status, "tasks_failed_other")] += 1  # by reason, for the metrics
        self._send_result(driver, ResultEntry(task.task_id, status, extra, frames, flags))

    def _failed(self, driver: PeerInfo, task: Task, status: int, frames: Sequence[Frame]) -> None:
        """Remember a failure for the live dashboard: who, what kind, and its text unless it is a pickle."""
        if status == Status.RAISED:
            text = "the task raised; its exception and remote traceback went to its driver"
        else:
            text = bytes(memoryview(frames[0])[:400]).decode(errors="replace") if frames else ""
        worker = self.workers.get(task.worker) if task.worker is not None else None
        self.recent_failures.append({
            "at_s": round(self._now - self.started, 3), "driver": driver.info.get("name"), "task": task.task_id,
            "status": Status(status).name.lower() if status in _FAILED_COUNTERS else str(status),
            "worker": worker.info.get("name") if worker is not None else None, "text": text,
        })

    def _send_result(self, driver: PeerInfo, entry: ResultEntry) -> None:
        if entry.flags & Flag.DIRECT:
            return  # the slot sent it to the driver itself (distfork/direct.py)
        out = self._results.get(driver.id)
        if out is None:
            out = self._results[driver.id] = []
        out.append(entry)
        driver.result_bytes += sum(map(len, entry.frames))

    def cancel(self, driver: PeerInfo, ids: Sequence[int], now: float) -> None:
        """Cancel tasks: queued ones are dropped, assigned ones are recalled."""
        self._now = now
        for task_id in ids:
            task = driver.tasks.pop(task_id, None)
            if task is None:
                continue
            if task.state is TaskState.ASSIGNED and task.worker is not None:
                w = self.workers.get(task.worker)
                if w is not None:
                    running = task.key in list(w.assigned)[: w.slots]
                    w.assigned.pop(task.key, None)
                    self._cancels.setdefault(w.id, []).append(task.key)
                    if running and w.control is not None:
                        self._aborts.setdefault(w.control, []).append(task.key)
                    elif running:
                        self._unsent_aborts.setdefault(w.id, []).append(task.key)
            elif task.state is TaskState.QUEUED:
                self.stale_queued += 1
            task.state = TaskState.CANCELLED
            self._release_deps(task)
            self._resolve(driver, task, Status.CANCELLED, 0.0, [], 0)  # its waiting dependents: cancelled too
            self.counters["tasks_cancelled"] += 1

    def prefetch(self, w: PeerInfo) -> int:
        """Tasks to hand worker ``w`` beyond its slots: ``prefetch_s`` worth of them."""
        if w.avg_run_s is None:
            return 0
        per_slot = int(self.config.prefetch_s / max(w.avg_run_s, 1e-6))
        return w.slots * min(per_slot, self.config.prefetch_max)

    def _next_for(self, w: PeerInfo, prefetch: bool = False) -> Task | None:
        """The next queued task worker ``w`` can run: pinned to its domain first.

        ``prefetch``: for room beyond free slots, which a nested task never takes.
        """
        pq = self.pinned.get(w.domain) if w.domain is not None else None
        for q in (pq, self.queue):
            while q:
                task = q[0]
                if task.state is not _QUEUED:
                    q.popleft()
                    self.stale_queued -= 1
                    continue
                if prefetch and (task.nested or task.suspect):
                    break
                return q.popleft()
        return None

    def reclaim(self, driver: PeerInfo, ids: Sequence[int], now: float) -> None:
        """A driver asks for queued tasks back, to run them itself. Answered (Reclaimed) after the
        next dispatch: a task a free slot can start now goes there; only one nobody can take is given back."""
        self._now = now
        self._reclaims.append((driver, list(ids)))

    def _answer_reclaims(self) -> None:
        reclaims, self._reclaims = self._reclaims, []
        for driver, ids in reclaims:
            granted = self._grant(driver, ids) if self.peers.get(driver.id) is driver else []
            self._reclaimed.append(Reclaimed(driver.id, granted, ids))

    def _grant(self, driver: PeerInfo, ids: Sequence[int]) -> list[int]:
        """Give queued tasks back to their driver; returns the ids given back."""
        granted = []
        for task_id in ids:
            task = driver.tasks.get(task_id)
            # A task with dependencies needs their held values; one with dependents, its hold.
            if task is not None and task.state is TaskState.QUEUED and task.deps is None and not task.dependents:
                del driver.tasks[task_id]
                task.state = TaskState.CANCELLED  # dropped from its queue when reached
                self.stale_queued += 1
                granted.append(task_id)
        self.counters["tasks_reclaimed"] += len(granted)
        return granted

    def _stalled(self, w: PeerInfo, now: float, starved: bool = False) -> bool:
        """Busy far longer than its tasks usually take: what it holds beyond its slots may wait long.

        ``starved``: a slot idles with nothing queued, so any wait is a loss: no news for
        ``STARVED_STALL_S`` is enough, however long its tasks usually take.
        """
        if len(w.assigned) < w.slots:
            return False
        quiet_s = now - w.progress_at
        return quiet_s > STARVED_STALL_S if starved else quiet_s > max(4 * (w.avg_run_s or 0.0), STALL_S)

    def dispatch(self, now: float) -> None:
        """Hand queued tasks to workers: free slots first, then prefetch room, one task each in turn
        (SendTasks); then answer the drivers' reclaims (what no free slot took may go back).

        A stalled worker (its current task runs long) gets no prefetch, and
        while another worker idles, the tasks prefetched to a stalled one are
        taken back (CANCEL to it) and handed out again.
        """
        self._now = now
        self._schedule(now)
        if self._reclaims:
            self._answer_reclaims()

    def _schedule(self, now: float) -> None:
        out = self._tasks_out
        if not self.workers:
            return
        starved = self._steal(now)
        if not (self.queue or any(self.pinned.values()) or self.resource_queue):
            return
        if self.resource_queue:  # first: a slot that frees up goes to a task that needs its process's resources
            resources.place(self, out, self._now, self.config.resource_grace_s)
        for w in self.workers.values():  # free slots
            while len(w.assigned) < w.slots and self._assign(w, out, prefetch=False):
                pass
        room = {
            w: w.slots + self.prefetch(w)
            for w in self.workers.values()
            if not self._stalled(w, now, starved)  # not what was just taken back from it
            # a suspect runs alone; it only ever takes a free slot, so it is among the first `slots`
            and not any(t.suspect for t in itertools.islice(w.assigned.values(), w.slots))
        }
        while room:  # prefetch, round robin
            for w, limit in list(room.items()):
                if len(w.assigned) >= limit or not self._assign(w, out, prefetch=True):
                    del room[w]

    def _assign(self, w: PeerInfo, out: dict[bytes, list[Task]], prefetch: bool) -> bool:
        task = self._next_for(w, prefetch)
        if task is None:
            return False
        if prefetch:
            w.batched = True
        self._give(w, task, out)
        return True

    def _give(self, w: PeerInfo, task: Task, out: dict[bytes, list[Task]]) -> None:
        if not w.assigned:
            w.progress_at = self._now
        task.state = _ASSIGNED
        task.worker = w.id
        task.dispatched = self._now
        w.assigned[task.key] = task
        out.setdefault(w.id, []).append(task)

    def _fail_unplaceable(self, task: Task, text: str) -> None:
        """A task that asks for more than any worker of the cluster has (resources.place)."""
        self.counters["tasks_unplaceable"] += 1
        self._finish(task, Status.FAILED, 0.0, [text.encode()])

    def _steal(self, now: float) -> bool:
        """Take back what stalled or overfed workers hold beyond their slots; returns whether a slot
        idled with nothing queued (``starved``)."""
        if not any(len(w.assigned) < w.slots for w in self.workers.values()):
            return False
        starved = not self.queue and not any(self.pinned.values())  # an idle slot has nothing else to take
        for w in self.workers.values():
            if len(w.assigned) <= w.slots:
                continue
            if self._stalled(w, now, starved):
                keep = 0
            elif starved and self._overfed(w):
                keep = self.prefetch(w)
            else:
                continue
            # Never a direct task (distfork/direct.py): its slot has it over its own socket and runs it
            # anyway; its notice can come before the header of the slot's previous one.
            waiting = [t for t in list(w.assigned.values())[w.slots + keep :] if t.key < DIRECT_KEY_BASE]
            if not waiting:
                continue
            self._cancels.setdefault(w.id, []).extend(t.key for t in waiting)
            for task in reversed(waiting):
                del w.assigned[task.key]
                self._requeue(task)
            self.counters["tasks_stolen"] += len(waiting)
        return starved

    def _overfed(self, w: PeerInfo) -> bool:
        """It holds more beyond its slots than its recent run times would give it now: ``rebalance_s``
        more work (they were prefetched while its tasks looked shorter), or any at all if its tasks take
        ``REBALANCE_ANY_S`` or more (a long one may hide among them, the average cannot tell)."""
        extra = len(w.assigned) - w.slots - self.prefetch(w)
        # A worker whose batches were far faster a moment ago has likely run much of it already.
        avg_s = min(w.avg_run_s or 0.0, w.fast_run_s or 0.0)
        return extra > 0 and (avg_s >= REBALANCE_ANY_S or extra * avg_s > self.config.rebalance_s)

    def may_steal(self) -> bool:
        """Whether :meth:`dispatch` should be called again soon even without news."""
        idle = any(len(w.assigned) < w.slots for w in self.workers.values())
        return idle and any(len(w.assigned) > w.slots for w in self.workers.values())

    def local_workers(self, domain: str | None) -> int:
        """Workers that see the shared memory of ``domain``."""
        if domain is None:
            return 0
        return sum(1 for w in self.workers.values() if w.domain == domain)

    def _cluster_notices(self) -> list[ClusterNotice]:
        """What to tell each driver after the set of workers changed (else nothing)."""
        if not self._cluster_changed:
            return []
        self._cluster_changed = False
        return [
            ClusterNotice(d.id, {"local_workers": self.local_workers(d.domain), "workers": len(self.workers)})
            for d in self.peers.values()
            if d.role is Role.DRIVER
        ]

    def _task_entries(self, worker: bytes, tasks: list[Task]) -> list[TaskEntry]:
        """Tasks as a worker receives them: a result may travel by shared memory if it shares the driver's."""
        w = self.workers.get(worker)
        domain = w.domain if w is not None else None
        entries = []
        for t in tasks:
            frames, flags = t.wire()
            if domain is not None and t.domain == domain:
                entries.append(TaskEntry(t.key, t.max_retries, t.timeout_s, frames, flags | Flag.RESULT_SHM,
                                         t.owner_pid))
            else:
                entries.append(TaskEntry(t.key, t.max_retries, t.timeout_s, frames, flags))
        return entries

    def take_instructions(self) -> list[Instruction]:
        """Everything decided since the last call, in the order to carry it out; taken once.

        Replies to unknown peers, then TASKS, RESULTS (trace notes first in each
        driver's batch), CANCEL to slots, CANCEL to control sockets, DISCARD,
        RECYCLE, orphans to unlink here, CLUSTER notices, RECLAIMED answers.
        """
        out: list[Instruction] = self._replies
        self._replies = []
        if self._tasks_out:
            out += [SendTasks(w, tasks, self._task_entries(w, tasks)) for w, tasks in self._tasks_out.items()]
            self._tasks_out = {}
        if self._notes:  # first in the batch, so that the driver has them before it completes the futures
            for driver, notes in self._notes.items():
                self._results.setdefault(driver, []).insert(0, notes_entry(notes))
            self._notes = {}
        if self._results:
            out += [SendResults(d, entries) for d, entries in self._results.items()]
            self._results = {}
        if self._cancels:
            out += [Cancel(w, keys) for w, keys in self._cancels.items()]
            self._cancels = {}
        if self._aborts:
            out += [Abort(c, keys) for c, keys in self._aborts.items()]
            self._aborts = {}
        if self._discards:
            out += [Discard(w, entries) for w, entries in self._discards.items()]
            self._discards = {}
        if self._recycles:
            out += [Recycle(w, names) for w, names in self._recycles.items()]
            self._recycles = {}
        if self._orphans:
            # Its maker is gone and no worker shares that /dev/shm: we unlink it if it is ours.
            ours = self.domain
            out += [UnlinkOrphan(name) for name, domain in self._orphans if domain is not None and domain == ours]
            self._orphans = []
        if self._cluster_changed:
            out += self._cluster_notices()
        if self._reclaimed:
            out += self._reclaimed
            self._reclaimed = []
        return out

    # -- status --------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        """A JSON-able snapshot for ``distfork status``."""
        queued = sum(1 for q in (self.queue, self.resource_queue, *self.pinned.values())
                     for t in q if t.state is TaskState.QUEUED)
        held_resources = resources.status(self.workers.values())
        workers = [
            {
                "id": w.id.hex(),
                "name": w.info.get("name"),
                "host": w.info.get("host"),
                "pid": w.info.get("pid"),
                "shm": w.domain is not None,
                "slurm_job": w.info.get("slurm_job"),  # "123_4": its Slurm job (array task), if it is one
                "slots": w.slots,
                "busy": min(len(w.assigned), w.slots),
                "assigned": len(w.assigned),
                "done": w.done,
                "failed": w.failed,
                "rss_bytes": w.rss_bytes,
                "resources": held_resources.get(w.id),
                "last_seen_s": round(now - w.last_seen, 3),
            }
            for w in self.workers.values()
        ]
        # A worker runs the first `slots` tasks it holds; the rest wait there (prefetched).
        running = {t.key for w in self.workers.values() for t in itertools.islice(w.assigned.values(), w.slots)}
        held = sum(len(w.assigned) for w in self.workers.values())
        drivers = []
        for d in self.peers.values():
            if d.role is not Role.DRIVER:
                continue
            waiting = sum(1 for t in d.tasks.values() if t.state is TaskState.QUEUED)
            blocked = sum(1 for t in d.tasks.values() if t.state is TaskState.WAITING)
            on_worker = sum(1 for t in d.tasks.values() if t.state is TaskState.ASSIGNED and t.key in running)
            drivers.append({
                "id": d.id.hex(),
                "name": d.info.get("name"),
                "host": d.info.get("host"),
                "pid": d.info.get("pid"),
                "unfinished": len(d.tasks),
                "queued": waiting,
                "running": on_worker,
                "waiting": blocked,  # for the futures their arguments name
                "prefetched": len(d.tasks) - waiting - blocked - on_worker,  # handed to a worker, waiting there
                "done": d.done,  # finished, failures included
                "failed": d.failed,
                "held": len(d.holds),  # results kept here for the tasks that take them
                "result_bytes": d.result_bytes,  # payload bytes of results sent to it
            })
        return {
            "uptime_s": round(now - self.started, 3),
            "queued": queued,
            "running": len(running),
            "prefetched": held - len(running),
            "workers": workers,
            "drivers": drivers,
            "counters": dict(self.counters),
        }


def _heartbeat_of(p: PeerInfo) -> float:
    value = p.info.get("heartbeat_s")
    if isinstance(value, (int, float)) and 0 < value < 3600:
        return float(value)
    return 0.0


def _sigkill_hint(code: int, oom: bool, rss_bytes: int | None) -> str:
    """What a SIGKILL probably means: the kernel's OOM killer sends it, nobody else usually does."""
    if code != -signal.SIGKILL:
        return ""
    rss = f", its last RSS {rss_bytes / 2**20:.1f} MiB" if rss_bytes is not None else ""
    if oom:
        return f" by the kernel's OOM killer (out of memory{rss})"
    return f", possibly out of memory{rss}"


def _signal_name(signum: int) -> str:
    try:
        return f"{signal.Signals(signum).name} ({signum})"
    except ValueError:
        return str(signum)
