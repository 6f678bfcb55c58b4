"""Tasks pick their hardware: what workers advertise, what a fork asks, where the broker places it.

::

    distfork worker --resources gpu=2,ram_gb=64 --label zone=a     (or DISTFORK_RESOURCES / DISTFORK_LABELS)
        │ HELLO of each slot: "resources" {cpu, memory_gb, gpu, custom...}, "gpu_ids", "labels"
        ▼
    broker (BrokerState.dispatch -> place): a task with needs waits in its own queue; it goes to a
        free slot whose *process* has enough free (total - what its running tasks hold) and whose
        labels match; a GPU task is given device ids (TASKS entry with Flag.RESOURCES, first frame)
        ▼
    worker slot: CUDA_VISIBLE_DEVICES=<its ids> while the task runs

Resources belong to a worker process, shared by its slots: the broker adds
up what the tasks running on all slots of one (host, pid) hold. A task that
fits on no worker of the cluster, not even an idle one, fails after
``resource_grace_s`` (workers may still be joining) with an error naming
what every worker has. Tasks that ask for nothing are placed as before and
hold nothing.

Pure functions and state over the broker's own objects: no I/O, no clock of
its own (``now`` is passed in), unit-tested with a fake clock.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = ["describe", "detect", "fits", "parse_labels", "parse_resources", "validate_request"]

log = logging.getLogger(__name__)


def parse_resources(text: str) -> dict[str, float]:
    """``"gpu=2,ram_gb=64,ssd=1"`` -> ``{"gpu": 2.0, ...}``; a bad entry raises ValueError naming it."""
    out: dict[str, float] = {}
    for item, name, sep, value in _entries(text):
        try:
            amount = float(value) if sep else 1.0
        except ValueError:
            amount = -1.0
        if not name.isidentifier() or not amount >= 0 or amount == float("inf"):
            raise ValueError(f"resource {item!r}: give name=amount with a non-negative number, e.g. gpu=2")
        out[name] = amount
    return out


def parse_labels(text: str) -> dict[str, str]:
    """``"zone=a,rack=3"`` -> ``{"zone": "a", "rack": "3"}``."""
    out: dict[str, str] = {}
    for item, name, sep, value in _entries(text):
        if not sep or not name:
            raise ValueError(f"label {item!r}: give name=value, e.g. zone=a")
        out[name] = value.strip()
    return out


def _entries(text: str) -> Iterator[tuple[str, str, str, str]]:
    """The non-empty ``name=value`` items of a comma (or semicolon) separated list:
    (the item as written, its name stripped, "=" or "" when it has none, the value)."""
    for item in text.replace(";", ",").split(","):
        item = item.strip()
        if item:
            name, sep, value = item.partition("=")
            yield item, name.strip(), sep, value


def validate_request(resources: Mapping[str, Any] | None, labels: Mapping[str, Any] | None
                     ) -> tuple[dict[str, float] | None, dict[str, str] | None]:
    """What ``options(resources=..., labels=...)`` asks, checked; None for nothing asked."""
    need: dict[str, float] | None = None
    if resources:
        need = {}
        for name, amount in resources.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"resource name {name!r}: give a string, e.g. 'gpu'")
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < float("inf"):
                raise ValueError(f"resources={{{name!r}: {amount!r}}}: give a non-negative number")
            if amount:
                need[name] = float(amount)
        need = need or None
    want: dict[str, str] | None = None
    if labels:
        want = {str(k): str(v) for k, v in labels.items()}
    return need, want


def _gpu_ids() -> list[int]:
    """Visible CUDA devices, without importing torch unless it is imported already."""
    torch = __import__("sys").modules.get("torch")
    ids: list[int] = []
    try:
        if torch is not None and torch.cuda.is_available():
            ids = list(range(torch.cuda.device_count()))
        elif os.path.isdir("/proc/driver/nvidia/gpus"):
            ids = list(range(len(os.listdir("/proc/driver/nvidia/gpus"))))
    except Exception:  # noqa: BLE001 - no GPU facts is no GPUs
        ids = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        chosen = [v.strip() for v in visible.split(",") if v.strip()]
        ids = [int(v) for v in chosen if v.isdigit() and (not ids or int(v) in ids)]
    return ids


def detect(slots: int, spec: str = "") -> tuple[dict[str, float], list[int]]:
    """A worker process's resources: slots, cores, memory, GPUs, then ``spec`` (``--resources``) on top.

    Returns the amounts and the GPU device ids (``spec`` may give ``gpu=N``
    without real devices: ids 0..N-1, for scheduling only).
    """
    import psutil

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    found: dict[str, float] = {
        "slots": float(slots),
        "cpu": float(cores),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
    }
    ids = _gpu_ids()
    if ids:
        found["gpu"] = float(len(ids))
    found.update(parse_resources(spec))
    if "gpu" in found and len(ids) != int(found["gpu"]):
        ids = list(range(int(found["gpu"])))
    return found, ids


def fits(need: Mapping[str, float], free: Mapping[str, float]) -> bool:
    return all(free.get(k, 0.0) >= v for k, v in need.items())


def matches(want: Mapping[str, str] | None, labels: Mapping[str, Any]) -> bool:
    return not want or all(str(labels.get(k)) == v and k in labels for k, v in want.items())


def describe(amounts: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(amounts.items())) or "nothing"


class Process:
    """One worker process as the broker sees it: its slots, what it has, what its running tasks hold."""

    def __init__(self, info: Mapping[str, Any]) -> None:
        total = info.get("resources")
        self.total: dict[str, float] = (
            {str(k): float(v) for k, v in total.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if isinstance(total, dict) else {}
        )
        labels = info.get("labels")
        self.labels: dict[str, Any] = dict(labels) if isinstance(labels, dict) else {}
        ids = info.get("gpu_ids")
        self.gpu_ids: list[int] = [i for i in ids if isinstance(i, int)] if isinstance(ids, list) else []
        self.name = str(info.get("name", "?")).split("/")[0]
        self.slots: list[Any] = []  # PeerInfo of its slots
        self.held: collections.Counter[str] = collections.Counter()
        self.devices: set[int] = set()

    def free(self) -> dict[str, float]:
        return {k: v - self.held.get(k, 0.0) for k, v in self.total.items()}

    def hold(self, task: Any) -> None:
        for k, v in (task.needs or {}).items():
            self.held[k] += v
        self.devices.update(task.devices or ())


def processes(workers: Iterable[Any]) -> list[Process]:
    """Group slot peers by process (host, pid) and add up what their running tasks hold."""
    by: dict[tuple[Any, Any], Process] = {}
    for w in workers:
        key = (w.info.get("host"), w.info.get("pid"))
        p = by.get(key)
        if p is None:
            p = by[key] = Process(w.info)
        p.slots.append(w)
        for task in list(w.assigned.values())[: w.slots]:  # tasks with needs run alone: never prefetched
            if task.needs:
                p.hold(task)
    return list(by.values())


def unplaceable_text(task: Any, procs: list[Process]) -> str:
    asked = describe(task.needs or {})
    if task.labels:
        asked += f" on a worker labelled {', '.join(f'{k}={v}' for k, v in sorted(task.labels.items()))}"
    have = "; ".join(
        f"{p.name}: {describe(p.total)}" + (f" [{', '.join(f'{k}={v}' for k, v in sorted(p.labels.items()))}]"
                                            if p.labels else "")
        for p in procs
    ) or "no workers"
    return (
        f"no worker of this cluster can run this task: it asks for {asked}, and the cluster has {have}. "
        "Start a worker that has it (distfork worker --resources gpu=N,... --label k=v), or ask for less"
    )


def place(state: Any, out: dict[bytes, list[Any]], now: float, grace_s: float) -> None:
    """Hand queued tasks with needs to free slots where they fit; fail those that fit nowhere, after grace."""
    queue = state.resource_queue
    procs = processes(state.workers.values())
    keep: collections.deque[Any] = collections.deque()
    while queue:
        task = queue.popleft()
        if task.state.value != "queued":
            state.stale_queued -= 1
            continue
        placed = False
        fit_somewhere = False
        for p in procs:
            if not matches(task.labels, p.labels) or not fits(task.needs or {}, p.total):
                continue
            fit_somewhere = True
            if not fits(task.needs or {}, p.free()):
                continue
            slot = next((w for w in p.slots if not w.assigned and (not task.pinned or task.domain == w.domain)),
                        None)
            if slot is None:
                continue
            want = int((task.needs or {}).get("gpu", 0))
            if want:
                spare = [i for i in p.gpu_ids if i not in p.devices]
                if len(spare) < want:
                    continue
                task.devices = spare[:want]
            state._give(slot, task, out)
            p.hold(task)
            placed = True
            break
        if placed:
            continue
        if not fit_somewhere and now - max(task.submitted, state.started) >= grace_s:
            state._fail_unplaceable(task, unplaceable_text(task, procs))
            continue
        keep.append(task)
    queue.extend(keep)


def status(workers: Iterable[Any]) -> dict[bytes, dict[str, Any]]:
    """Per slot peer id: its process's resources, held and free (``distfork status``)."""
    out: dict[bytes, dict[str, Any]] = {}
    for p in processes(workers):
        entry = {"total": p.total, "held": dict(p.held), "free": p.free(), "labels": p.labels}
        for w in p.slots:
            out[w.id] = entry
    return out
