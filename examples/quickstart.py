"""The two examples of the torch.jit.fork documentation, run by distfork.

    pip install -e . && python examples/quickstart.py

The first fork starts an embedded local cluster (a broker and one worker
process per core); it stops when this script ends. With torch installed the
examples use tensors and ``torch.nn.Module``s as in the original page;
without it, numpy arrays and a plain callable class play their parts.
"""

from __future__ import annotations

import os
import time
import traceback

import distfork

try:
    import torch
except ImportError:
    torch = None


# -- Example 1: fork a free function -----------------------------------------


def foo(a, b: int):
    return a + b


def bar(a):
    fut = distfork.fork(foo, a, b=2)
    return distfork.wait(fut)


# -- Example 2: fork a module method -----------------------------------------

if torch is not None:

    class AddMod(torch.nn.Module):
        def forward(self, a, b: int):
            return a + b

    Base = torch.nn.Module
else:

    class AddMod:  # type: ignore[no-redef]
        """Stands in for torch.nn.Module: a callable object."""

        def __call__(self, a, b: int):
            return a + b

    Base = object


class Mod(Base):  # type: ignore[misc, valid-type]
    def __init__(self) -> None:
        super().__init__()
        self.mod = AddMod()

    def forward(self, input):
        fut = distfork.fork(self.mod, input, b=2)
        return distfork.wait(fut)

    def broken_forward(self, input):
        # As printed in the torch.jit.fork docs: 'a' is not defined here.
        fut = distfork.fork(self.mod, a, b=2)  # noqa: F821
        return distfork.wait(fut)

    __call__ = forward if torch is None else Base.__call__


def where() -> tuple[str, int]:
    return os.uname().nodename, os.getpid()


def main() -> None:
    make = torch.tensor if torch is not None else __import__("numpy").asarray
    kind = "torch tensors and nn.Modules" if torch is not None else "numpy arrays (torch not installed)"
    print(f"distfork quickstart with {kind}")

    t0 = time.perf_counter()
    input = make(2)
    out = bar(input)
    assert out == 4, out
    print(f"example 1: bar({input!r}) = {out!r}   (first fork started the local cluster: "
          f"{time.perf_counter() - t0:.2f} s to the first result)")

    mod = Mod()
    out = mod(input)
    assert out == 4, out
    print(f"example 2: Mod()({input!r}) = {out!r}")

    try:
        mod.broken_forward(input)
    except NameError as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        print(f"example 2 as printed in the docs raises NameError: {exc} "
              f"(at {os.path.basename(frame.filename)}:{frame.lineno}: {frame.line})")
    else:
        raise AssertionError("the docs' example should raise NameError")

    futs = [distfork.fork(where) for _ in range(8)]
    hosts = sorted({pid for _, pid in distfork.wait_all(futs)})
    print(f"8 more forks ran in worker processes {hosts}; this script is pid {os.getpid()}")


if __name__ == "__main__":
    main()
