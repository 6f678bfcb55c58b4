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
