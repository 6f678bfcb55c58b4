"""The seed: the two examples of the ``torch.jit.fork`` docs, written for distfork.

``torch.jit.fork(foo, a, b=2)`` becomes ``distfork.fork(foo, a, b=2)`` and
``torch.jit.wait`` becomes ``distfork.wait``; the scripted version's
asynchrony becomes a worker process. Every example runs twice: on the
embedded cluster and in inline mode, which must give the same results.
"""

from __future__ import annotations

import inspect
import os
import traceback
from collections.abc import Iterator

import pytest

import distfork

torch = pytest.importorskip("torch")
from torch import Tensor  # noqa: E402

import tasks  # noqa: E402

pytestmark = pytest.mark.timeout(60)


# -- example 1: a function ------------------------------------------------------

def foo(a: Tensor, b: int) -> Tensor:
    return a + b


def bar(a: Tensor) -> Tensor:
    fut = distfork.fork(foo, a, b=2)
    return distfork.wait(fut)


# -- example 2: calling methods -------------------------------------------------

class AddMod(torch.nn.Module):
    def forward(self, a: Tensor, b: int) -> Tensor:
        return a + b


class Mod(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mod = AddMod()

    def forward(self, input: Tensor) -> Tensor:
        fut = distfork.fork(self.mod, input, b=2)
        return distfork.wait(fut)


class BrokenMod(torch.nn.Module):
    """The docs' version of Mod: ``a`` is not defined in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.mod = AddMod()

    def forward(self, input: Tensor) -> Tensor:
        fut = distfork.fork(self.mod, a, b=2)  # noqa: F821 - the documented NameError
        return distfork.wait(fut)


def _broken_line() -> int:
    lines, start = inspect.getsourcelines(BrokenMod.forward)
    (offset,) = [i for i, line in enumerate(lines) if "distfork.fork(self.mod, a, b=2)" in line]
    return start + offset


def _run_all() -> dict[str, object]:
    x = torch.tensor(2)
    out: dict[str, object] = {"bar": bar(x), "mod": Mod()(x)}
    calls = [("broken", lambda: BrokenMod()(x)), ("raising", lambda: distfork.wait(distfork.fork(tasks.fail, "boom")))]
    for name, call in calls:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - compared below
            out[name] = (type(exc), str(exc), type(exc.__cause__))
    return out


def test_inline_mode_gives_identical_results() -> None:
    distfork.init(workers=2)
    on_cluster = _run_all()
    distfork.shutdown()
    distfork.init(mode="inline")
    inline = _run_all()
    distfork.shutdown()

    assert on_cluster.keys() == inline.keys() == {"bar", "mod", "broken", "raising"}
    for key in ("bar", "mod"):
        a, b = on_cluster[key], inline[key]
        assert isinstance(a, Tensor) and isinstance(b, Tensor)
        assert a.dtype == b.dtype and torch.equal(a, b), key
    assert on_cluster["broken"] == inline["broken"] == (NameError, "name 'a' is not defined", type(None))
    assert on_cluster["raising"] == inline["raising"] == (tasks.CustomError, "boom", distfork.RemoteTraceback)


@pytest.fixture(scope="module", params=["cluster", "inline"])
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test runs on the embedded cluster (2 workers) and in inline mode (one runtime per mode)."""
    if request.param == "cluster":
        distfork.init(workers=2)
    else:
        distfork.init(mode="inline")
    try:
        yield request.param
    finally:
        distfork.shutdown()


def test_where_the_task_runs(mode: str) -> None:
    # What makes the two modes differ at all: inline runs in the caller's process.
    pid = distfork.wait(distfork.fork(tasks.getpid))
    if mode == "inline":
        assert pid == os.getpid()
    else:
        assert pid != os.getpid()


def test_example_1_bar_forks_foo(mode: str) -> None:
    x = torch.tensor(2)
    result = bar(x)
    assert isinstance(result, Tensor)
    assert result.dtype == x.dtype
    assert result == 4
    assert torch.equal(result, foo(x, b=2))


def test_example_2_module_forks_its_submodule(mode: str) -> None:
    result = Mod()(torch.tensor(2))
    assert isinstance(result, Tensor)
    assert result == 4


def test_example_2_broken_version_raises_name_error_in_the_caller(mode: str) -> None:
    with pytest.raises(NameError) as excinfo:
        BrokenMod()(torch.tensor(2))
    assert excinfo.value.name == "a"
    # Raised here, before anything was forked: no remote traceback.
    assert not isinstance(excinfo.value.__cause__, distfork.RemoteTraceback)
    last = traceback.extract_tb(excinfo.value.__traceback__)[-1]
    assert os.path.samefile(last.filename, __file__)
    assert last.lineno == _broken_line()
    assert last.name == "forward"


def test_raising_task(mode: str) -> None:
    fut = distfork.fork(tasks.fail, "boom")
    with pytest.raises(tasks.CustomError, match="^boom$") as excinfo:
        distfork.wait(fut)
    assert type(excinfo.value) is tasks.CustomError
    assert isinstance(excinfo.value.__cause__, distfork.RemoteTraceback)
    assert "CustomError: boom" in str(excinfo.value.__cause__)


def test_forked_bar_forks_foo_from_a_worker(mode: str) -> None:
    # bar itself forked: in cluster mode the nested fork reaches the same broker from a worker.
    assert distfork.wait(distfork.fork(bar, torch.tensor(2)), timeout=30) == 4
