"""TorchScript through distfork: scripted and traced modules and functions travel and run in a worker.

The seed page's ``script_bar`` / ``torch.jit.script(mod)`` examples, a
traced module, a large scripted module (its archive goes out of band, through
shared memory), a task that calls ``torch.jit.fork`` / ``wait`` itself, and
``examples/quickstart.py`` with and without torch.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

import distfork
from distfork import serialize

torch = pytest.importorskip("torch")
from torch import Tensor  # noqa: E402

from conftest import ROOT, cli_env  # noqa: E402

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("shared_cluster")]

T = 30.0


def foo(a: Tensor, b: int) -> Tensor:
    return a + b


def bar(a: Tensor) -> Tensor:
    fut = torch.jit.fork(foo, a, b=2)
    return torch.jit.wait(fut)


class AddMod(torch.nn.Module):
    def forward(self, a: Tensor, b: int) -> Tensor:
        return a + b


class Mod(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mod = AddMod()

    def forward(self, input: Tensor) -> Tensor:
        fut = torch.jit.fork(self.mod, input, b=2)
        return torch.jit.wait(fut)


def worker_pid() -> int:
    return os.getpid()


def run_with_pid(m: Any, x: Any) -> tuple[Any, int]:
    return m(x), os.getpid()


def test_a_scripted_function_runs_in_a_worker() -> None:
    script_bar = torch.jit.script(bar)
    assert isinstance(script_bar, torch.jit.ScriptFunction)
    x = torch.tensor(2)
    assert distfork.wait(distfork.fork(script_bar, x), T) == script_bar(x) == 4
    value, pid = distfork.wait(distfork.fork(run_with_pid, script_bar, x), T)
    assert value == 4 and pid != os.getpid()


def test_a_scripted_module_runs_in_a_worker() -> None:
    mod = Mod()
    scripted = torch.jit.script(mod)
    x = torch.tensor(2)
    assert distfork.wait(distfork.fork(scripted, x), T) == mod(x) == scripted.forward(x) == 4
    assert distfork.wait(distfork.fork(scripted.forward, x), T) == 4  # its method, bound


def test_a_traced_module_and_a_traced_function_run_in_a_worker() -> None:
    x = torch.tensor(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Mod(), (x,))
        traced_bar = torch.jit.trace(bar, (x,))
    assert "fork" in str(traced_bar.graph)
    assert distfork.wait(distfork.fork(traced, x), T) == 4
    assert distfork.wait(distfork.fork(traced_bar, torch.tensor(5)), T) == 7


def test_a_large_scripted_module_travels_out_of_band_and_computes_the_same() -> None:
    torch.manual_seed(0)
    lin = torch.jit.script(torch.nn.Linear(600, 600))  # 1.4 MB of weights
    frames = serialize.dumps_call(lin, (), {}, 64 * 1024)
    assert len(frames[0]) < 64 * 1024, "the archive went into the pickle stream"
    assert serialize.oob_bytes(frames) > 600 * 600 * 4
    x = torch.randn(4, 600)
    out = distfork.wait(distfork.fork(lin, x), T)
    assert torch.allclose(out, lin(x))


def test_a_scripted_module_inside_a_plain_one_and_as_a_result() -> None:
    holder = torch.nn.Sequential(torch.jit.script(AddMod()))
    back = distfork.wait(distfork.fork(lambda m: m, holder), T)
    assert isinstance(back[0], torch.jit.ScriptModule)
    assert back[0](torch.tensor(1), 2) == 3


def test_pickling_a_script_function_by_hand_still_fails_outside_fork() -> None:
    """Only distfork's pickler knows TorchScript: pickle.dumps keeps torch's own error."""
    with pytest.raises(Exception):  # noqa: B017, PT011 - torch's own error type
        pickle.dumps(torch.jit.script(bar))
    # ...while distfork's serialization round-trips it.
    frames = serialize.dumps(torch.jit.script(bar), 64 * 1024)
    assert serialize.loads(frames)(torch.tensor(1)) == 3


def test_a_task_may_call_torch_jit_fork_and_wait_itself() -> None:
    x = torch.tensor(2)
    assert distfork.wait(distfork.fork(bar, x), T) == 4
    assert distfork.wait(distfork.fork(Mod(), x), T) == 4


def test_torch_jit_save_of_a_loaded_module_round_trips() -> None:
    """What the worker gets back is a loadable module: its archive saves again."""
    scripted = torch.jit.script(Mod())
    back = distfork.wait(distfork.fork(lambda m: m, scripted), T)
    buf = io.BytesIO()
    torch.jit.save(back, buf)
    assert torch.jit.load(io.BytesIO(buf.getvalue()))(torch.tensor(3)) == 5


QUICKSTART = str(Path(ROOT) / "examples" / "quickstart.py")


def test_quickstart_runs_the_scripted_examples_through_distfork() -> None:
    out = subprocess.run([sys.executable, QUICKSTART], env=cli_env(), capture_output=True, text=True, timeout=T * 2)
    assert out.returncode == 0, out.stderr
    assert "scripted example 1: fork(torch.jit.script(bar), tensor(2)) = tensor(4)" in out.stdout
    assert "scripted example 2: fork(torch.jit.script(mod), tensor(2)) = tensor(4)" in out.stdout
    assert "traced example 2" in out.stdout


def test_quickstart_runs_without_torch() -> None:
    hide_torch = (
        "import sys, runpy; sys.modules['torch'] = None; "
        f"runpy.run_path({QUICKSTART!r}, run_name='__main__')"
    )
    out = subprocess.run([sys.executable, "-c", hide_torch], env=cli_env(), capture_output=True, text=True,
                         timeout=T * 2)
    assert out.returncode == 0, out.stderr
    assert "numpy arrays (torch not installed)" in out.stdout and "scripted" not in out.stdout
