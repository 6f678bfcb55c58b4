"""The one serialization path: round trips, out-of-band buffers, errors naming the culprit."""

from __future__ import annotations

import secrets
import sys
import threading
import types
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import distfork
from distfork import serialize, shm

THRESHOLD = 64 * 1024


@pytest.mark.parametrize(
    "obj",
    [None, 42, "text", b"bytes", [1, (2, 3), {"a": {4}}], {"nested": [1.5, None]}, ValueError("x").args],
)
def test_plain_objects_round_trip_in_one_frame(obj: Any) -> None:
    frames = serialize.dumps(obj, THRESHOLD)
    assert len(frames) == 1
    assert serialize.loads(frames) == obj


def test_a_large_array_goes_out_of_band_as_its_own_frame() -> None:
    big = np.arange(THRESHOLD, dtype=np.float64)  # 8 x threshold bytes
    frames = serialize.dumps(big, THRESHOLD)

    assert len(frames) == 2
    assert memoryview(frames[1]).nbytes == big.nbytes
    assert len(frames[0]) < 1024  # the stream holds no array data
    back = serialize.loads(frames)
    assert back.dtype == big.dtype and back.shape == big.shape
    np.testing.assert_array_equal(back, big)


def test_a_small_array_stays_in_band() -> None:
    small = np.arange(100, dtype=np.int32)
    frames = serialize.dumps(small, THRESHOLD)
    assert len(frames) == 1
    np.testing.assert_array_equal(serialize.loads(frames), small)


def test_the_threshold_decides_in_or_out_of_band() -> None:
    arr = np.ones(1000, dtype=np.uint8)
    assert len(serialize.dumps(arr, arr.nbytes + 1)) == 1
    assert len(serialize.dumps(arr, arr.nbytes)) == 2


def test_several_large_and_small_buffers_keep_their_order() -> None:
    a = np.full(THRESHOLD, 1, dtype=np.uint8)
    b = np.full(10, 2, dtype=np.uint8)
    c = np.full((THRESHOLD // 8, 2), 3.0, dtype=np.float32, order="F")
    frames = serialize.dumps({"a": a, "b": b, "c": c}, THRESHOLD)
    assert len(frames) == 3  # a and c out of band, b in band
    back = serialize.loads(frames)
    np.testing.assert_array_equal(back["a"], a)
    np.testing.assert_array_equal(back["b"], b)
    np.testing.assert_array_equal(back["c"], c)
    assert back["c"].flags.f_contiguous


def test_loads_accepts_buffers_as_memoryviews_without_copying() -> None:
    big = np.arange(THRESHOLD, dtype=np.int64)
    stream, buf = serialize.dumps(big, THRESHOLD)
    received = bytearray(memoryview(buf).cast("B"))  # what a receiver would own
    back = serialize.loads([stream, memoryview(received)])
    np.testing.assert_array_equal(back, big)
    received[:8] = b"\xff" * 8
    assert back[0] == -1  # the array is built on the received buffer, not on a copy


def test_a_call_round_trips_with_closures_and_lambdas() -> None:
    k = 3
    frames = serialize.dumps_call(lambda x, y=0: x * k + y, (2,), {"y": 1}, THRESHOLD)
    func, args, kwargs = serialize.loads(frames)
    assert func(*args, **kwargs) == 7


@pytest.mark.parametrize(
    ("func", "args", "kwargs", "culprit"),
    [
        (print, (1, threading.Lock()), {}, "argument 1 "),
        (print, (), {"x": threading.Lock()}, "keyword argument x="),
        (print, (1,), {"ok": 2, "bad": threading.Lock()}, "keyword argument bad="),
    ],
)
def test_dumps_call_names_the_unpicklable_argument(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], culprit: str
) -> None:
    with pytest.raises(distfork.SerializationError, match="cannot pickle") as info:
        serialize.dumps_call(func, args, kwargs, THRESHOLD)
    message = str(info.value)
    assert culprit in message
    assert "_thread.lock" in message
    assert isinstance(info.value.__cause__, Exception)


def _locked_task() -> Any:
    lock = threading.Lock()

    def task() -> None:
        with lock:
            pass

    return task


def test_dumps_call_names_the_function_when_it_is_the_culprit() -> None:
    with pytest.raises(distfork.SerializationError) as info:
        serialize.dumps_call(_locked_task(), (1, 2), {"k": "v"}, THRESHOLD)
    message = str(info.value)
    assert message.startswith("cannot pickle the function <function _locked_task.<locals>.task")
    assert "_thread.lock" in message


def test_describe_survives_a_broken_repr() -> None:
    class BadRepr:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    text = serialize.describe(BadRepr())
    assert "BadRepr" in text


class _Custom(Exception):
    pass


def test_an_exception_comes_back_as_its_type_with_the_remote_traceback_as_cause() -> None:
    try:
        raise _Custom("boom", 7)
    except _Custom as exc:
        frames = serialize.dumps_exception(exc, "worker w-1 (host hh, pid 123)", THRESHOLD)

    back = serialize.loads(frames)

    assert type(back) is _Custom
    assert back.args == ("boom", 7)
    assert isinstance(back.__cause__, distfork.RemoteTraceback)
    text = str(back.__cause__)
    assert "worker w-1 (host hh, pid 123)" in text
    assert "_Custom: ('boom', 7)" in text
    assert "Traceback (most recent call last)" in text
    assert "test_an_exception_comes_back_as_its_type" in text  # the frame that raised


def test_a_builtin_exception_keeps_its_type() -> None:
    frames = serialize.dumps_exception(KeyError("k"), "here", THRESHOLD)
    back = serialize.loads(frames)
    assert type(back) is KeyError and back.args == ("k",)
    assert "here" in str(back.__cause__)


class _HoldsLock(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class _NeedsTwoArgs(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}+{b}")  # args != (a, b): pickles, but cannot be rebuilt


@pytest.mark.parametrize("exc", [_HoldsLock("has a lock"), _NeedsTwoArgs(1, 2)], ids=["unpicklable", "unrebuildable"])
def test_an_exception_that_cannot_travel_comes_back_as_remote_error_naming_its_type(exc: BaseException) -> None:
    frames = serialize.dumps_exception(exc, "worker w-9 (host x, pid 9)", THRESHOLD)
    back = serialize.loads(frames)

    assert type(back) is distfork.RemoteError
    assert type(exc).__qualname__ in str(back)
    assert str(exc) in str(back)
    assert isinstance(back.__cause__, distfork.RemoteTraceback)
    assert "worker w-9 (host x, pid 9)" in str(back.__cause__)


def test_large_bytes_and_bytearrays_leave_the_pickle_stream_and_keep_their_type() -> None:
    big = bytes(range(256)) * 1024
    frames = serialize.dumps(([big, {"b": bytearray(big)}], memoryview(big)), 65536)
    assert len(frames) == 1 + 3  # three buffers out of band, none copied into the stream
    assert len(frames[0]) < 1024
    (data, view) = serialize.loads(frames)
    assert type(data[0]) is bytes and data[0] == big
    assert type(data[1]["b"]) is bytearray and data[1]["b"] == big
    assert bytes(view) == big


def test_small_bytes_stay_in_band() -> None:
    assert len(serialize.dumps((b"x" * 100, bytearray(100)), 65536)) == 1


def _module_function(name: str) -> Any:
    module = types.ModuleType(name)
    exec("def f(x):\n    return x + 1\n", module.__dict__)
    module.f.__module__ = name
    sys.modules[name] = module
    return module


def test_functions_go_by_reference_exactly_when_cloudpickle_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # reducer_override answers "by reference" the short way for plain top-level functions; every
    # other case must still come out as cloudpickle decides.
    import cloudpickle

    def local(x: int) -> int:
        return x

    module = _module_function("distfork_test_by_reference")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    def check(func: Any, by_reference: bool) -> None:
        assert cloudpickle.cloudpickle._should_pickle_by_reference(func) is by_reference, func
        assert (serialize.loads(serialize.dumps(func, THRESHOLD)) is func) is by_reference, func

    for func, by_reference in [(distfork.fork, True), (serialize._value, True), (local, False),
                               (lambda x: x, False), (module.f, True)]:
        check(func, by_reference)
    rebound = module.f
    module.f = lambda x: x  # the module's name now means another function: by value
    check(rebound, False)
    module.f = rebound
    cloudpickle.register_pickle_by_value(module)
    try:
        back = serialize.loads(serialize.dumps(module.f, THRESHOLD))
        assert back is not module.f and back(1) == 2  # registered by value: a copy
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    assert serialize.loads(serialize.dumps(module.f, THRESHOLD)) is module.f


SMALL = 16  # bytes: a threshold the drawn bytes-like values straddle
_leaves = st.one_of(
    st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=4),
    st.binary(max_size=2 * SMALL), st.binary(max_size=2 * SMALL).map(bytearray),
    st.binary(max_size=2 * SMALL).map(memoryview),
    st.binary(min_size=2 * SMALL, max_size=4 * SMALL).map(lambda b: memoryview(b)[::2]),  # not contiguous
)
_nested = st.recursive(
    _leaves,
    lambda inner: st.one_of(st.tuples(inner, inner), st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=2), inner, max_size=3)),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(obj=_nested)
def test_the_quick_look_for_large_bytes_agrees_with_the_wrapping_walk(obj: Any) -> None:
    # dumps skips the wrapping walk when _has_large says there is nothing to wrap: it must
    # never say so when the walk would wrap something (a large buffer left in the stream).
    for depth in range(5):
        assert serialize._has_large(obj, SMALL, depth) == (serialize._wrap_large(obj, SMALL, depth) is not obj)


@settings(max_examples=150, deadline=None)
@given(head=st.lists(st.one_of(st.just(print), _nested), min_size=1, max_size=2),
       args=st.one_of(st.lists(_nested, max_size=3).map(tuple), _nested),
       kwargs=st.one_of(st.dictionaries(st.text(max_size=2), _nested, max_size=3), _nested))
def test_the_quick_look_at_a_call_agrees_with_the_look_at_the_whole_call(head: list[Any], args: Any,
                                                                          kwargs: Any) -> None:
    call = (*head, args, kwargs)  # ([code,] func, args, kwargs), whatever a caller passed
    assert serialize._call_has_large(call, args, kwargs, SMALL) == serialize._has_large(call, SMALL)


def test_large_buffers_in_small_looking_containers_still_leave_the_stream_for_shared_memory() -> None:
    arr = np.arange(1 << 17, dtype=np.float64)  # 1 MiB
    raw = bytes(1 << 20)
    # The array at any depth (the pickler hands its buffer out); bytes within the walk's three levels.
    kwargs = {"opts": {"k": (1, {"deep": [arr]})}, "blob": ("x", raw)}
    frames = serialize.dumps_call(print, (1, 2.0, "s", None), kwargs, THRESHOLD)
    assert len(frames) == 3 and len(frames[0]) < 1024  # both out of band, in the order pickled
    assert sorted(memoryview(b).nbytes for b in frames[1:]) == [arr.nbytes, len(raw)]
    pool = shm.SegmentPool(secrets.token_hex(4), 0)
    try:
        wire, seg = serialize.route(frames, pool)
        assert seg is not None and len(wire) == 2  # [stream, manifest]: the buffers are in the segment
        func, args, back = serialize.unpack_call(wire, [], [])
        assert func is print and args == (1, 2.0, "s", None)
        np.testing.assert_array_equal(back["opts"]["k"][1]["deep"][0], arr)
        assert type(back["blob"][1]) is bytes and back["blob"][1] == raw
    finally:
        if seg is not None:
            seg.release()
            seg.unlink()
        pool.close()


@pytest.mark.parametrize("module", ["numpy", "torch"])
def test_pickling_while_another_thread_is_still_importing_numpy_or_torch(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver's I/O thread imports numpy when it unpickles a first array; meanwhile a user thread
    pickles a call and finds the module in sys.modules without its classes yet."""
    monkeypatch.setitem(sys.modules, module, types.ModuleType(module))  # partially initialized
    frames = serialize.dumps_call(max, ([3, 1, 2],), {}, 1 << 16)
    func, args, kwargs = serialize.loads(frames)
    assert func(*args, **kwargs) == 3
