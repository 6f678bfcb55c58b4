"""Every kind of callable ``fork`` accepts runs on the embedded cluster and gives the local result."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import distfork
import tasks
from conftest import cli_env

from .support import write_script

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("shared_cluster")]


def triple(x: int) -> int:
    """Defined in the test module: the worker imports it by reference."""
    return 3 * x


SQUARE = lambda x: x * x  # noqa: E731 - a lambda bound at module level is still pickled by value


class Scaler:
    """A class of the test module: instances travel with their state."""

    def __init__(self, factor: int) -> None:
        self.factor = factor
        self.calls = 0

    def scale(self, x: int) -> int:
        self.calls += 1
        return x * self.factor + self.calls

    def __call__(self, x: int) -> int:
        return self.scale(x)


def _closure() -> Callable[[int], int]:
    offset = 7
    table = {"scale": 2}

    def f(x: int) -> int:
        return x * table["scale"] + offset

    return f


# (callable, args, kwargs, expected)
CASES: dict[str, tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Any]] = {
    "module_function": (tasks.add, (2, 3), {}, 5),
    "module_function_kwargs": (tasks.add, (), {"a": 2, "b": 3}, 5),
    "test_module_function": (triple, (4,), {}, 12),
    "lambda": (lambda x, y=1: x - y, (10,), {"y": 4}, 6),
    "module_level_lambda": (SQUARE, (9,), {}, 81),
    "closure": (_closure(), (5,), {}, 17),
    "bound_method": (tasks.Adder(10).add, (5,), {}, 15),
    "bound_method_of_test_class": (Scaler(3).scale, (5,), {}, 16),
    "callable_object": (tasks.Adder(10), (1,), {}, 11),
    "callable_object_of_test_class": (Scaler(4), (2,), {}, 9),
    "builtin": (pow, (2, 10), {}, 1024),
    "builtin_with_kwarg": (pow, (3, 4), {"mod": 5}, 81 % 5),
    "partial": (functools.partial(tasks.add, 100), (1,), {}, 101),
    "partial_of_lambda": (functools.partial(lambda a, b: a * b, b=6), (7,), {}, 42),
}


@pytest.mark.parametrize("name", list(CASES))
def test_callable_kind(name: str) -> None:
    func, args, kwargs, expected = CASES[name]
    assert copy.deepcopy(func)(*args, **kwargs) == expected  # the local call (on a copy), for reference
    assert distfork.wait(distfork.fork(func, *args, **kwargs), timeout=30) == expected


def test_closure_sees_state_at_fork_time() -> None:
    state = {"n": 1}

    def read() -> int:
        return state["n"]

    fut = distfork.fork(read)
    state["n"] = 2  # pickled at fork: the task does not see this
    assert distfork.wait(fut, timeout=30) == 1
    assert distfork.wait(distfork.fork(read), timeout=30) == 2


def test_callable_object_state_does_not_come_back() -> None:
    scaler = Scaler(2)
    assert distfork.wait(distfork.fork(scaler, 5), timeout=30) == 11  # 5*2 + 1 call, in the worker
    assert scaler.calls == 0  # the worker mutated its own copy


def test_keyword_argument_named_func() -> None:
    # fork's callable is positional-only: ``func=`` and friends go to the task.
    fut = distfork.fork(tasks.echo_kwargs, func="f", args=(1,), kwargs={"k": 2})
    assert distfork.wait(fut, timeout=30) == {"func": "f", "args": (1,), "kwargs": {"k": 2}}
    fut = distfork.options(max_retries=1).fork(tasks.echo_kwargs, func=3)
    assert distfork.wait(fut, timeout=30) == {"func": 3}


def test_function_defined_in_main_of_a_script(tmp_path: Path) -> None:
    script = write_script(tmp_path, """
        import os
        import distfork

        def offset_square(x, offset=0):  # lives in __main__: pickled by value
            return x * x + offset

        class Box:  # a __main__ class, both ways
            def __init__(self, v):
                self.v = v

        def unbox(b):
            return Box(b.v + 1)

        distfork.init(workers=1)
        assert distfork.wait(distfork.fork(offset_square, 7, offset=1), timeout=30) == 50
        out = distfork.wait(distfork.fork(unbox, Box(41)), timeout=30)
        assert type(out) is Box and out.v == 42, out
        assert distfork.wait(distfork.fork(os.getpid), timeout=30) != os.getpid()
        print("ok")
    """)
    env = cli_env(DISTFORK_HEARTBEAT_S="0.2")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=45)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# -- torch --------------------------------------------------------------------

def test_torch_module_with_parameters() -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        model[0].bias.fill_(0.25)  # not the initializer's values: the parameters must travel
    x = torch.randn(5, 8)
    expected = model(x)
    result = distfork.wait(distfork.fork(model, x), timeout=30)
    assert isinstance(result, torch.Tensor)
    assert result.shape == (5, 3)
    assert torch.allclose(result.detach(), expected.detach())


def test_torch_module_method_and_state_dict() -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    lin = torch.nn.Linear(4, 2)
    state = distfork.wait(distfork.fork(lin.state_dict), timeout=30)
    assert state.keys() == lin.state_dict().keys()
    for k, v in lin.state_dict().items():
        assert torch.equal(state[k], v)


@pytest.mark.parametrize("shape, dtype", [
    ((), "int64"),
    ((3, 4), "float64"),
    ((1_000_000,), "float32"),  # 4 MB: above the out-of-band threshold
    ((256, 256), "bool"),
])
def test_torch_tensors_as_args_and_results(shape: tuple[int, ...], dtype: str) -> None:
    torch = pytest.importorskip("torch")
    t = (torch.arange(int(torch.tensor(shape).prod().item())) % 7).reshape(shape).to(getattr(torch, dtype))
    back = distfork.wait(distfork.fork(tasks.identity, t), timeout=30)
    assert isinstance(back, torch.Tensor)
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back, t)
    if dtype != "bool":
        assert torch.equal(distfork.wait(distfork.fork(tasks.add, t, 1), timeout=30), t + 1)


def test_torch_non_contiguous_and_nested_tensors() -> None:
    torch = pytest.importorskip("torch")
    big = torch.arange(600_000, dtype=torch.float32).reshape(1000, 600)
    view = big[::2, 1::3]  # a strided view of a large storage
    payload = {"view": view, "pair": (torch.ones(3), torch.zeros(2, dtype=torch.int32))}
    back = distfork.wait(distfork.fork(tasks.identity, payload), timeout=30)
    assert torch.equal(back["view"], view)
    assert torch.equal(back["pair"][0], torch.ones(3))
    assert back["pair"][1].dtype == torch.int32 and torch.equal(back["pair"][1], torch.zeros(2, dtype=torch.int32))


def test_pids_differ_from_the_driver(shared_cluster: list[int]) -> None:
    pids = {distfork.wait(distfork.fork(tasks.getpid), timeout=30) for _ in range(4)}
    assert pids <= set(shared_cluster)
    assert os.getpid() not in pids
