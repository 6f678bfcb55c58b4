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
