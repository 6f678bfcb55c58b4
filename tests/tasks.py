"""Task functions for the tests, importable by workers (by reference)."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any


def add(a: Any, b: Any) -> Any:
    return a + b


def identity(x: Any) -> Any:
    return x


def whoami() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


def timed_sleep(seconds: float) -> tuple[int, float, float]:
    """Sleep; return (pid, start, end) in wall-clock seconds."""
    start = time.time()
    time.sleep(seconds)
    return os.getpid(), start, time.time()


class CustomError(Exception):
    pass


def fail(message: str) -> None:
    raise CustomError(message)


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def return_lock() -> Any:
    return threading.Lock()


class Adder:
    def __init__(self, k: int) -> None:
        self.k = k

    def add(self, x: int) -> int:
        return x + self.k

    def __call__(self, x: int) -> int:
        return x + self.k


def getpid() -> int:
    return os.getpid()


def echo_kwargs(**kwargs: Any) -> dict[str, Any]:
    """Return the keyword arguments as received (names like ``func`` included)."""
    return kwargs


def wait_for_path(path: str, timeout_s: float = 30.0) -> str:
    """Block until ``path`` exists (the test's release gate); return "released".

    Raises TimeoutError if the test never releases it, so a broken test cannot
    keep a worker busy for ever.
    """
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.005)
    return "released"


def wait_for_path_holding(path: str, data: Any, timeout_s: float = 30.0) -> Any:
    """``wait_for_path`` with an argument (a large one maps a shared-memory segment); returns it."""
    wait_for_path(path, timeout_s)
    return data


# -- the data plane (tests/integration/test_dataplane.py, test_shm_lifecycle.py, ...) --


def mapping_of(address: int) -> str | None:
    """What backs ``address`` in this process, from /proc/self/maps.

    The mapped file's path ("/dev/shm/df-... (deleted)" once unlinked), ""
    for anonymous memory (the heap, a received ZeroMQ frame), None if no
    mapping holds it.
    """
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5].strip() if len(fields) > 5 else ""
    return None


def describe_data(x: Any) -> dict[str, Any]:
    """Type, layout, exact bits (sha256) and backing memory of an array, tensor or bytes-like object."""
    import hashlib

    import numpy as np

    out: dict[str, Any] = {"type": type(x).__name__}
    if isinstance(x, np.ndarray):
        out.update(dtype=x.dtype.str if not x.dtype.fields else x.dtype.descr, shape=x.shape,
                   c=x.flags.c_contiguous, f=x.flags.f_contiguous, writeable=x.flags.writeable)
        if x.dtype.fields:  # field by field: padding between fields is no data, and copies may skip it
            packed = np.zeros(x.shape, x.dtype)
            packed[...] = x
            bits = packed.tobytes()
        else:
            bits = x.tobytes() if not x.dtype.hasobject else None
        address = x.__array_interface__["data"][0] if x.size else None
    elif type(x).__module__.startswith("torch"):
        import torch

        out.update(dtype=str(x.dtype), shape=tuple(x.shape), stride=tuple(x.stride()), requires_grad=x.requires_grad)
        dense = torch.empty(x.shape, dtype=x.dtype).copy_(x.detach())  # fresh, standard strides
        bits = dense.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b""
        address = x.data_ptr() if x.numel() else None
    else:
        view = memoryview(x)
        out.update(nbytes=view.nbytes, writeable=not view.readonly)
        bits = view.tobytes()
        address = None
    out["sha256"] = hashlib.sha256(bits).hexdigest() if bits is not None else None
    out["backing"] = mapping_of(address) if address is not None else None
    out["pid"] = os.getpid()
    return out


def describe_at(x: Any, *path: Any) -> dict[str, Any]:
    """:func:`describe_data` of ``x[path[0]][path[1]]...``: a value nested in containers."""
    for key in path:
        x = x[key]
    return describe_data(x)


def fill_and_sum(a: Any, value: float) -> float:
    """Overwrite the argument array in place (the driver's copy must not change); return its new sum."""
    a[...] = value
    return float(a.sum())


def ones(n: int, delay_s: float = 0.0) -> Any:
    """A float64 array of ``n`` ones, made here (a large result), after ``delay_s`` of work."""
    import numpy as np

    time.sleep(delay_s)
    return np.ones(n)


def sum_slowly(a: Any, delay_s: float) -> float:
    """The sum of an argument array, after ``delay_s`` of work (keeps large arguments in flight)."""
    time.sleep(delay_s)
    return float(a.sum())


_KEPT: dict[str, Any] = {}


def keep(x: Any, key: str) -> int:
    """Store the argument in a module global (it stays mapped after the task); return our pid."""
    _KEPT[key] = x
    return os.getpid()


def kept_on_every_worker(key: str, gate_dir: str, n: int, timeout_s: float = 30.0) -> dict[str, Any] | None:
    """``describe_data`` of what ``keep`` stored under ``key`` in this worker (then forgotten), or None.

    Each call leaves a file in ``gate_dir`` and waits until ``n`` calls have,
    so ``n`` concurrent calls run on ``n`` different single-slot workers.
    """
    open(os.path.join(gate_dir, str(os.getpid())), "w").close()
    deadline = time.monotonic() + timeout_s
    while len(os.listdir(gate_dir)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(os.listdir(gate_dir))} of {n} workers reached {gate_dir}")
        time.sleep(0.005)
    kept = _KEPT.pop(key, None)
    return describe_data(kept) if kept is not None else None


# -- faults (tests/integration/test_crash_matrix.py, test_faults.py, test_partition.py) --

#: Exit code of ``fault("exit")``: a worker that calls ``os._exit`` with it.
FAULT_EXIT_CODE = 3


def fault(kind: str) -> None:
    """Fail the way ``kind`` says, in this process: "raise", "exit", "sigkill" or "segfault"."""
    import ctypes
    import signal

    if kind == "raise":
        raise CustomError(f"fault {kind} in pid {os.getpid()}")
    if kind == "exit":
        os._exit(FAULT_EXIT_CODE)
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # the signal is delivered before this returns
    if kind == "segfault":
        ctypes.string_at(0)
    raise ValueError(f"unknown fault kind {kind!r}")


class FaultOnUnpickle:
    """An argument that pickles fine in the driver; rebuilding it in the worker does ``fault(kind)``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return fault, (self.kind,)


class FaultOnPickle:
    """A result whose pickling (``__reduce__``, in the worker) does ``fault(kind)``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __reduce__(self) -> Any:
        fault(self.kind)
        return FaultOnPickle, (self.kind,)


def take_and_return(arg: Any) -> str:
    """A task whose argument is rebuilt in the worker (``FaultOnUnpickle`` faults before this runs)."""
    return f"ran with {arg!r}"


def make_fault_on_pickle(kind: str) -> FaultOnPickle:
    return FaultOnPickle(kind)


def slow_identity(x: Any, delay_s: float) -> Any:
    """``x``, after ``delay_s`` seconds of work."""
    time.sleep(delay_s)
    return x


def touch(path: str) -> int:
    """Create ``path`` (proof that the task ran); return our pid."""
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    return os.getpid()


def announce_and_wait(started: str, gate: str, timeout_s: float = 60.0) -> int:
    """Write our pid to ``started``, then block until ``gate`` exists; return our pid."""
    with open(started + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(started + ".tmp", started)
    wait_for_path(gate, timeout_s)
    return os.getpid()


def host_identity(i: int, delay_s: float, marker_dir: str) -> tuple[int, str | None, int]:
    """(i, DISTFORK_TEST_HOST, pid) after ``delay_s``; files ``start-i-HOST`` and ``done-i-HOST`` mark the run."""
    host = os.environ.get("DISTFORK_TEST_HOST")
    open(os.path.join(marker_dir, f"start-{i}-{host}"), "w").close()
    time.sleep(delay_s)
    open(os.path.join(marker_dir, f"done-{i}-{host}"), "w").close()
    return i, host, os.getpid()


def fib(n: int) -> int:
    """Recursive Fibonacci that forks both halves (nested forks)."""
    import distfork

    if n < 2:
        return n
    a, b = distfork.fork(fib, n - 1), distfork.fork(fib, n - 2)
    return distfork.wait(a) + distfork.wait(b)


def merge_sort(xs: Any, cutoff: int = 50_000) -> Any:
    """Merge sort of a numpy array that forks both halves down to ``cutoff`` items."""
    import numpy as np

    import distfork

    if len(xs) <= cutoff:
        return np.sort(xs, kind="stable")
    mid = len(xs) // 2
    left, right = distfork.wait_all(
        [distfork.fork(merge_sort, xs[:mid], cutoff), distfork.fork(merge_sort, xs[mid:], cutoff)]
    )
    # Merge: where each item of the right half lands among the left half's.
    out = np.empty(len(xs), dtype=xs.dtype)
    pos = np.searchsorted(left, right, side="right") + np.arange(len(right))
    mask = np.ones(len(xs), dtype=bool)
    mask[pos] = False
    out[pos] = right
    out[mask] = left
    return out


def touch_and_return(path: str, value: Any) -> Any:
    """Create ``path`` (proof that the task ran), return ``value``."""
    open(path, "w").close()
    return value


def where_am_i(peer_ip: str, delay_s: float = 0.0) -> dict[str, Any]:
    """The host a task ran on: its hostname, pid, and the address it reaches ``peer_ip`` from (no packet is sent)."""
    time.sleep(delay_s)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer_ip, 9))  # UDP connect only picks the route and source address
        ip = s.getsockname()[0]
    return {"host": socket.gethostname(), "pid": os.getpid(), "ip": ip}


def chain_inside(n: int) -> int:
    """A task that forks a child and a grandchild taking the child's future as its argument; waits for it."""
    import distfork

    child = distfork.fork(add, n, 1)
    return distfork.wait(distfork.fork(add, child, 10))  # type: ignore[no-any-return]


def sum_after_gate(path: str, a: Any) -> float:
    """The sum of ``a`` once the test creates ``path``."""
    wait_for_path(path)
    return float(a.sum())


def scale(a: Any, k: float) -> Any:
    """``a * k``: a large result made from a large argument."""
    return a * k


def add_or_fail(a: int, b: int) -> int:
    """``a + b``, but raises CustomError when the sum is a multiple of 29 (a failure deep in a graph)."""
    if (a + b) % 29 == 0:
        raise CustomError(f"{a} + {b} is a multiple of 29")
    return a + b


def raise_unimportable(directory: str, message: str) -> None:
    """Raise an exception whose class lives in a module only this worker can import (written here)."""
    import importlib
    import sys

    with open(os.path.join(directory, "only_on_this_worker.py"), "w") as f:
        f.write("class OnlyHereError(Exception):\n    pass\n")
    sys.path.insert(0, directory)
    try:
        module = importlib.import_module("only_on_this_worker")
    finally:
        sys.path.remove(directory)
    raise module.OnlyHereError(message)


def announce_wait_and_make(started: str, gate: str, n: int, timeout_s: float = 60.0) -> Any:
    """Write our pid to ``started``, block until ``gate`` exists, then return ``n`` float64 ones (a large result)."""
    import numpy as np

    announce_and_wait(started, gate, timeout_s)
    return np.ones(n)


def pattern(n: int, k: float) -> Any:
    """``arange(n) + k`` as float64, made here: a large result whose every element says where it belongs."""
    import numpy as np

    return np.arange(n, dtype=np.float64) + k
