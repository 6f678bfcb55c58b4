"""Task functions of the benchmarks, in a module so every system imports them by reference."""

from __future__ import annotations

from typing import Any


def noop() -> None:
    return None


def total(a: Any) -> float:
    return float(a.sum())


def ones(n: int) -> Any:
    import numpy as np

    return np.ones(n)


def echo(a: Any) -> Any:
    return a


def fib(n: int) -> int:
    """Recursive Fibonacci forking both halves (nested forks)."""
    import distfork

    if n < 2:
        return n
    a, b = distfork.fork(fib, n - 1), distfork.fork(fib, n - 2)
    return distfork.wait(a) + distfork.wait(b)
