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


# -- The same examples scripted, as on the page: TorchScript code travels too ----

if torch is not None:

    def jit_bar(a):
        fut = torch.jit.fork(foo, a, b=2)
        return torch.jit.wait(fut)

    class JitMod(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mod = AddMod()

        def forward(self, input):
            fut = torch.jit.fork(self.mod, input, b=2)
            return torch.jit.wait(fut)


def scripted_examples(input) -> None:
    """The page's ``script_bar`` and ``torch.jit.script(mod)``, each run in a worker by distfork."""
    script_bar = torch.jit.script(jit_bar)
    out = distfork.wait(distfork.fork(script_bar, input))
    assert out == jit_bar(input) == 4, out
    print(f"scripted example 1: fork(torch.jit.script(bar), {input!r}) = {out!r}")
    scripted = torch.jit.script(JitMod())
    out = distfork.wait(distfork.fork(scripted, input))
    assert out == JitMod()(input) == 4, out
    print(f"scripted example 2: fork(torch.jit.script(mod), {input!r}) = {out!r}")
    traced = torch.jit.trace(JitMod(), (input,))
    out = distfork.wait(distfork.fork(traced, input))
    assert out == 4, out
    print(f"traced example 2: fork(torch.jit.trace(mod, ...), {input!r}) = {out!r}")


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

    if torch is not None:
        scripted_examples(input)

    futs = [distfork.fork(where) for _ in range(8)]
    hosts = sorted({pid for _, pid in distfork.wait_all(futs)})
    print(f"8 more forks ran in worker processes {hosts}; this script is pid {os.getpid()}")


if __name__ == "__main__":
    main()
