"""Errors on a real cluster: task exceptions, pickling failures, misuse of the API, no broker."""

from __future__ import annotations

import concurrent.futures
import os
import re
import socket
import threading

import psutil
import pytest

import distfork
import tasks
from conftest import free_port

from .support import embedded_cluster

pytestmark = pytest.mark.timeout(60)

T = 30.0


class LocalError(Exception):
    """An exception class of the test module itself: the driver unpickles it by reference."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code


def raise_local(message: str, code: int) -> None:
    raise LocalError(message, code)


# -- exceptions raised by tasks -------------------------------------------------

@pytest.mark.usefixtures("class_cluster")
class TestTaskExceptions:
    def test_custom_error_with_remote_traceback(self, class_cluster: list[int]) -> None:
        fut = distfork.fork(tasks.fail, "boom")
        with pytest.raises(tasks.CustomError, match="^boom$") as excinfo:
            distfork.wait(fut, timeout=T)
        assert type(excinfo.value) is tasks.CustomError
        cause = excinfo.value.__cause__
        assert isinstance(cause, distfork.RemoteTraceback)
        text = str(cause)
        assert f"host {socket.gethostname()}" in text
        pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
        assert pids and pids[0] in class_cluster and pids[0] != os.getpid()
        assert "raise CustomError(message)" in text  # the worker's frame, with its source line
        assert "CustomError: boom" in text

    def test_exception_class_of_the_test_module(self) -> None:
        fut = distfork.fork(raise_local, "local failure", 7)
        with pytest.raises(LocalError) as excinfo:
            distfork.wait(fut, timeout=T)
        assert excinfo.value.args == ("local failure", 7)
        assert excinfo.value.code == 7
        assert isinstance(excinfo.value.__cause__, distfork.RemoteTraceback)
        assert "raise_local" in str(excinfo.value.__cause__)

    def test_builtin_exception_keeps_its_type(self) -> None:
        with pytest.raises(ValueError, match="bad value"):
            distfork.wait(distfork.fork(tasks.raise_value_error, "bad value"), timeout=T)
        with pytest.raises(ZeroDivisionError):
            distfork.wait(distfork.fork(lambda: 1 / 0), timeout=T)

    def test_a_failure_fails_only_its_own_future(self) -> None:
        futs = [distfork.fork(tasks.add, 1, 1), distfork.fork(tasks.fail, "x"), distfork.fork(tasks.add, 2, 2)]
        assert distfork.wait(futs[0], timeout=T) == 2
        assert isinstance(futs[1].exception(T), tasks.CustomError)
        assert distfork.wait(futs[2], timeout=T) == 4


# -- pickling ------------------------------------------------------------------

@pytest.mark.usefixtures("class_cluster")
class TestSerialization:
    def test_unpicklable_argument_raises_at_fork(self) -> None:
        with pytest.raises(distfork.SerializationError) as excinfo:
            distfork.fork(tasks.identity, threading.Lock())
        message = str(excinfo.value)
        assert "argument 0" in message
        assert "lock" in message.lower()

    def test_unpicklable_keyword_argument_is_named(self) -> None:
        with pytest.raises(distfork.SerializationError, match="keyword argument guard="):
            distfork.fork(tasks.echo_kwargs, ok=1, guard=threading.Lock())

    def test_unpicklable_function_is_named(self) -> None:
        lock = threading.Lock()
        with pytest.raises(distfork.SerializationError, match="the function"):
            distfork.fork(lambda: lock.locked())

    def test_serialization_error_is_a_distfork_error(self) -> None:
        with pytest.raises(distfork.DistforkError):
            distfork.fork(tasks.identity, threading.Lock())

    def test_unpicklable_result_fails_only_its_future(self) -> None:
        before = distfork.fork(tasks.add, 1, 2)
        bad = distfork.fork(tasks.return_lock)
        after = distfork.fork(tasks.add, 3, 4)
        with pytest.raises(distfork.SerializationError, match="lock"):
            distfork.wait(bad, timeout=T)
        assert distfork.wait(before, timeout=T) == 3
        assert distfork.wait(after, timeout=T) == 7
        # and the workers keep serving
        assert distfork.wait_all([distfork.fork(tasks.add, i, 1) for i in range(20)], timeout=T) == list(range(1, 21))


# -- misuse of the API -----------------------------------------------------------

def test_fork_of_a_non_callable_raises_type_error_without_starting_a_cluster() -> None:
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    with pytest.raises(TypeError, match="callable"):
        distfork.fork(3)
    with pytest.raises(TypeError, match="callable"):
        distfork.fork(tasks.add(1, 2), 3)  # the classic: fork(f(x)) instead of fork(f, x)
    assert {p.pid for p in me.children(recursive=True)} == before


@pytest.mark.usefixtures("class_cluster")
class TestWaitMisuse:
    @pytest.mark.parametrize("thing", [42, "fut", None, [1, 2]], ids=["int", "str", "None", "list"])
    def test_wait_of_a_non_future_raises_type_error(self, thing: object) -> None:
        with pytest.raises(TypeError, match="Future"):
            distfork.wait(thing)  # type: ignore[arg-type]

    def test_wait_of_a_plain_concurrent_future_raises_type_error(self) -> None:
        with pytest.raises(TypeError, match="Future"):
            distfork.wait(concurrent.futures.Future())  # type: ignore[arg-type]

    def test_wait_of_a_value_instead_of_its_future(self) -> None:
        value = distfork.wait(distfork.fork(tasks.add, 1, 1), timeout=T)
        with pytest.raises(TypeError, match="Future"):
            distfork.wait(value)  # type: ignore[arg-type]


def test_init_twice_raises() -> None:
    distfork.init(workers=2)
    pids = embedded_cluster().pids
    with pytest.raises(distfork.DistforkError, match="already initialized"):
        distfork.init(workers=2)
    with pytest.raises(distfork.DistforkError, match="already initialized"):
        distfork.init(mode="inline")
    assert embedded_cluster().pids == pids  # the first runtime is untouched
    assert distfork.wait(distfork.fork(tasks.add, 1, 1), timeout=T) == 2


def test_init_after_an_automatic_start_raises() -> None:
    assert distfork.wait(distfork.fork(tasks.add, 1, 1), timeout=T) == 2  # starts the embedded cluster
    with pytest.raises(distfork.DistforkError):
        distfork.init()


def test_init_after_shutdown_works() -> None:
    distfork.init(mode="inline")
    distfork.shutdown()
    distfork.init(mode="inline")
    assert distfork.wait(distfork.fork(tasks.getpid)) == os.getpid()


def test_init_with_a_bad_mode_raises_value_error() -> None:
    with pytest.raises(ValueError, match="inline"):
        distfork.init(mode="threads")


def test_no_broker_at_the_address() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(distfork.BrokerUnavailableError) as excinfo:
        distfork.init(address=address, connect_timeout_s=1)
    assert address in str(excinfo.value)
    assert isinstance(excinfo.value, distfork.DistforkError)
    # the failed init left nothing half set up: a new init works
    distfork.init(mode="inline")
    assert distfork.wait(distfork.fork(tasks.add, 2, 2)) == 4


def test_no_broker_at_distfork_address(monkeypatch: pytest.MonkeyPatch) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    monkeypatch.setenv("DISTFORK_ADDRESS", address)
    monkeypatch.setenv("DISTFORK_CONNECT_TIMEOUT_S", "1")
    with pytest.raises(distfork.BrokerUnavailableError, match=re.escape(address)):
        distfork.fork(tasks.add, 1, 1)


class _Unpicklable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_unpicklable(message: str) -> None:
    raise _Unpicklable(message)


@pytest.mark.usefixtures("local_cluster")
def test_exception_that_cannot_travel_becomes_remote_error() -> None:
    with pytest.raises(distfork.RemoteError) as excinfo:
        distfork.wait(distfork.fork(raise_unpicklable, "cannot pickle me"), timeout=T)
    text = str(excinfo.value)
    assert "_Unpicklable" in text and "cannot pickle me" in text
    assert isinstance(excinfo.value.__cause__, distfork.RemoteTraceback)
    assert "raise_unpicklable" in str(excinfo.value.__cause__)
