"""The one serialization path: cloudpickle, pickle protocol 5, out-of-band buffers.

``dumps(obj)`` gives ``[stream, *buffers]``: the pickle stream, then every
buffer of at least ``oob_threshold_bytes`` the pickler handed out of band
(numpy arrays, torch CPU tensors, ``bytes``-like objects wrapped in
``pickle.PickleBuffer``). ``pack`` / ``unpack`` put that on the wire::

    [stream]                                  nothing large
    [stream, manifest, buf0, buf1, ...]       large buffers as frames of their own
    [stream, manifest]                        large buffers in one shared-memory segment

The manifest is a small JSON object: the segment's name and size and each
buffer's offset and length, or just the lengths. Arrays built on
received buffers are writable: a shared-memory mapping is writable (private
copy-on-write for task arguments, so the task's writes stay its own), a
received ZeroMQ frame is exposed writable in place, and anything else is
copied.

torch CPU tensors are pickled as their bytes (a uint8 numpy view, so out of
band without a copy) plus dtype, shape, strides and ``requires_grad``;
bfloat16 and other dtypes numpy lacks travel the same way.

Functions and classes defined in ``__main__`` or interactively are pickled by
value (cloudpickle), everything importable by reference.
"""

from __future__ import annotations

import ctypes
import io
import json
import logging
import mmap
import pickle
import re
import sys
import threading
import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any, cast

import cloudpickle

from . import shm
from .codeship import CodeRef as _CodeRef
from .codeship import _activate as _activate_code
from .errors import SerializationError
from .future import Future as _Future
from .protocol import decode_manifest

__all__ = [
    "FRAME_BYTES", "FutureArgument", "Lease", "describe", "free", "dumps", "dumps_call",
    "loads", "oob_bytes", "pack", "route", "unpack", "unpack_call",
]

log = logging.getLogger(__name__)

PROTOCOL = 5


def _rebuild_tensor(data: Any, dtype: str, shape: tuple[int, ...], stride: tuple[int, ...], requires_grad: bool) -> Any:
    import torch

    raw = torch.from_numpy(data)  # uint8, on the received buffer: no copy
    t = raw.view(getattr(torch, dtype)).as_strided(shape, stride)
    if requires_grad:
        t.requires_grad_(True)
    return t


def _reduce_tensor(t: Any) -> Any:
    """A CPU strided tensor as (its bytes, dtype, shape, strides, requires_grad)."""
    import torch

    if (
        t.device.type != "cpu" or t.layout != torch.strided or t.is_quantized or t.is_nested
        or t.is_conj() or t.is_neg()
    ):
        return NotImplemented
    shape, stride = tuple(t.shape), tuple(t.stride())
    item = t.element_size()
    if t.numel() == 0:
        first, span = t.storage_offset(), 0
    else:
        first = t.storage_offset()
        span = 1 + sum((n - 1) * st for n, st in zip(shape, stride, strict=True))
    raw = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage(), first * item, (span * item,), (1,))
    return _rebuild_tensor, (raw.detach().numpy(), str(t.dtype).removeprefix("torch."), shape, stride, t.requires_grad)


def _code_reduce(code: types.CodeType) -> Any:
    """cloudpickle's reduction of a code object, keeping its file name.

    cloudpickle names every code it pickles by value ``<dynamic-code>``; with
    the real name, the remote traceback can show the source line where the
    worker has the file, and the driver fills it in where only it has it.
    """
    rebuild, args = cloudpickle.cloudpickle._code_reduce(code)
    return rebuild, tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)


_SCRIPT_TYPES: tuple[type, ...] | None = None


def _script_types(torch: Any) -> tuple[type, ...]:
    """TorchScript's compiled callables: ``ScriptModule`` (scripted or traced), ``ScriptFunction``,
    and a ScriptModule's bound ``ScriptMethod`` (``scripted.forward``)."""
    global _SCRIPT_TYPES
    if _SCRIPT_TYPES is None:
        jit = getattr(torch, "jit", None)
        module, function = getattr(jit, "ScriptModule", None), getattr(jit, "ScriptFunction", None)
        method = getattr(getattr(torch, "_C", None), "ScriptMethod", None)
        owner = getattr(getattr(torch, "_C", None), "ScriptModule", None)  # what a ScriptMethod is bound to
        if module is None or function is None or method is None or owner is None:  # torch is still importing
            return ()
        _SCRIPT_TYPES = (module, function, method, owner)
    return _SCRIPT_TYPES


def _reduce_script(obj: Any) -> Any:
    """A ScriptModule or ScriptFunction as its TorchScript archive, out of band.

    TorchScript objects do not pickle; ``torch.jit.save`` / ``save_to_buffer``
    writes the code and the tensors (stored, not compressed) into one zip
    archive, which travels as one large buffer (shared memory or a frame of
    its own, never through the pickle stream).
    """
    import torch

    if isinstance(obj, torch._C.ScriptMethod):  # its module's archive, and the method's name
        return getattr, (obj.owner, obj.name)
    if isinstance(obj, (torch.jit.ScriptFunction, torch._C.ScriptModule)):
        data = cast(Any, obj).save_to_buffer()  # typeshed-less pybind methods
    else:
        buf = io.BytesIO()
        torch.jit.save(obj, buf)
        data = buf.getbuffer()
    return _load_script, (_LargeBytes(data),)


def _load_script(data: Any) -> Any:
    """Unpickling: the TorchScript archive back as a ScriptModule (a ScriptFunction comes back as a
    module whose ``forward`` is that function, called the same way)."""
    import torch

    return torch.jit.load(io.BytesIO(data), map_location="cpu")  # type: ignore[no-untyped-call]


class FutureArgument(Exception):
    """Pickling met a distfork Future among the arguments that is not done yet (or failed)."""

    def __init__(self, future: Any) -> None:
        super().__init__("a future among the arguments is not done")
        self.future = future


def _value(x: Any) -> Any:
    return x


# Modules registered with cloudpickle.register_pickle_by_value (usually none).
_BY_VALUE: Any = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", None)


def _by_reference(func: types.FunctionType) -> bool:
    """Whether cloudpickle would pickle this function by reference, answered the short way for the
    common case (a top-level function of an imported module, nothing registered by value); False
    means "ask cloudpickle", which decides the rest exactly as before."""
    name = func.__module__
    if _BY_VALUE is None or _BY_VALUE or name is None or name == "__main__":
        return False
    qualname = func.__qualname__
    return "." not in qualname and getattr(sys.modules.get(name), qualname, None) is func


# cloudpickle has no type information, so its Pickler is Any to mypy.
class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.FunctionType and _by_reference(obj):
            return NotImplemented  # the pickler saves it as a global, as cloudpickle would have it
        if type(obj) is _CodeRef:  # first in every shipped fork's pickle: the short way
            return _activate_code, (obj.hash,)
        if obj is _activate_code:
            return NotImplemented  # by reference, without cloudpickle's lookup
        if isinstance(obj, _Future):
            # A future passed as an argument stands for its value: a reference the
            # broker resolves (see dumps_call), or the value itself once it is here.
            refer = _local.refer
            index = refer(obj) if refer is not None else None
            if index is not None:
                return _dependency, (index,)
            if not obj.done() or obj.cancelled() or obj.exception() is not None:
                raise FutureArgument(obj)
            return _value, (obj.result(),)
        if type(obj) is types.CodeType:
            return _code_reduce(obj)
        # getattr: another thread (the driver's I/O thread unpickling a first array) may be
        # importing the module right now; until it has the class, no instance exists.
        torch = sys.modules.get("torch")
        tensor = getattr(torch, "Tensor", None)
        if tensor is not None and type(obj) is tensor:
            reduced = _reduce_tensor(obj)
            if reduced is not NotImplemented:
                return reduced
        elif tensor is not None and isinstance(obj, _script_types(torch)):
            return _reduce_script(obj)
        share_copy = _local.share_copy
        if share_copy is not None:  # a large nn.Parameter or read-only array forked before (shared.py)
            reduced = share_copy(obj)
            if reduced is not NotImplemented:
                return reduced
        np = sys.modules.get("numpy")
        if type(obj) is getattr(np, "ndarray", None) and not (obj.flags.c_contiguous or obj.flags.f_contiguous) \
                and not obj.dtype.hasobject:
            # numpy pickles a strided view in band (a copy into the stream, byte
            # order lost); the same one copy, made contiguous, goes out of band.
            return obj.copy(order="C").__reduce_ex__(PROTOCOL)
        return super().reducer_override(obj)


class _ReusablePickler:
    """A cloudpickle Pickler kept per thread: building one costs more than a small pickle."""

    def __init__(self) -> None:
        self.file = io.BytesIO()
        self.buffers: list[Any] = []
        self.threshold = 0
        self.in_use = False
        self.pickler = _Pickler(self.file, protocol=PROTOCOL, buffer_callback=self._buffer)

    def _buffer(self, buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < self.threshold:
            return True  # small: serialize in band
        self.buffers.append(raw)
        return False

    def dumps(self, obj: Any, oob_threshold_bytes: int) -> list[Any]:
        self.in_use = True
        self.threshold = oob_threshold_bytes
        try:
            self.pickler.dump(obj)
            return [self.file.getvalue(), *self.buffers]
        finally:
            self.pickler.clear_memo()
            self.buffers = []
            if self.file.tell() > 1 << 20:
                self.file = io.BytesIO()
                self.pickler = _Pickler(self.file, protocol=PROTOCOL, buffer_callback=self._buffer)
            else:
                self.file.seek(0)
                self.file.truncate()
            self.in_use = False


class _Local(threading.local):
    pickler: _ReusablePickler | None = None
    # While pickling a call: future -> index of it among the task's dependencies, or None.
    refer: Callable[[Any], int | None] | None = None
    # While unpickling a call: the values of its dependencies, by index.
    deps: list[Any] | None = None
    # While pickling a call for workers that share our /dev/shm: shared.ParamCache.reduce.
    share_copy: Callable[[Any], Any] | None = None


_local = _Local()


def _dependency(index: int) -> Any:
    """Unpickling: the value of the task's dependency ``index`` (a future among its arguments)."""
    deps = _local.deps
    if deps is None or not 0 <= index < len(deps):
        raise SerializationError(
            f"the task names dependency {index} (a future among its arguments) but was given "
            f"{0 if deps is None else len(deps)} dependency values"
        )
    return deps[index]


class _LargeBytes:
    """A large ``bytes``/``bytearray``/``memoryview``, pickled out of band.

    The C pickler writes exact ``bytes`` and ``bytearray`` into the stream
    without asking ``reducer_override``; wrapped, they leave it like arrays.
    They come back as ``bytes`` (``bytearray`` as ``bytearray``).
    """

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, tuple[Any, ...]]:
        kind = bytearray if type(self.data) is bytearray else bytes
        return kind, (pickle.PickleBuffer(self.data),)


_CONTAINERS = (tuple, list, dict)
_WALKED = frozenset((bytes, bytearray, memoryview, tuple, list, dict))  # what _wrap_large looks at


def _has_large(obj: Any, threshold: int, depth: int = 3) -> bool:
    """Whether :func:`_wrap_large` would wrap anything in ``obj``: the same walk, building nothing.

    The common call (ints, floats, strings, small bytes, arrays, objects) holds
    no large bytes-like value; this answers that without the copies of every
    container the wrapping walk makes. Arrays need no walk: the pickler hands
    their buffers out of band wherever they are.
    """
    t = type(obj)
    if t is bytes or t is bytearray:
        return len(obj) >= threshold
    if t is memoryview:
        return bool(obj.nbytes >= threshold and obj.c_contiguous)
    if depth == 0 or t not in _CONTAINERS:
        return False
    for v in (obj.values() if t is dict else obj):
        if type(v) in _WALKED and _has_large(v, threshold, depth - 1):
            return True
    return False


def _wrap_large(obj: Any, threshold: int, depth: int = 3) -> Any:
    """``obj`` with large bytes-like values (in tuples, lists and dicts, a few levels deep) wrapped."""
    t = type(obj)
    if t is bytes or t is bytearray or t is memoryview:
        if memoryview(obj).nbytes >= threshold and memoryview(obj).c_contiguous:
            return _LargeBytes(obj)
        return obj
    if depth == 0 or t not in _CONTAINERS:
        return obj
    if t is dict:
        items = {k: _wrap_large(v, threshold, depth - 1) for k, v in obj.items()}
        return items if any(items[k] is not v for k, v in obj.items()) else obj
    seq = [_wrap_large(v, threshold, depth - 1) for v in obj]
    if all(a is b for a, b in zip(seq, obj, strict=True)):
        return obj
    return tuple(seq) if t is tuple else seq


def _call_has_large(call: tuple[Any, ...], args: Any, kwargs: Any, threshold: int) -> bool:
    """:func:`_has_large` of a call ``([code,] func, args, kwargs)``, unrolled: where the walk can
    find large bytes is in the arguments' values (the function, a code reference: not walked)."""
    if type(args) is not tuple or type(kwargs) is not dict or type(call[-3]) in _WALKED \
            or type(call[0]) in _WALKED:
        return _has_large(call, threshold)
    for v in args:
        if type(v) in _WALKED and _has_large(v, threshold, 1):
            return True
    for v in kwargs.values():
        if type(v) in _WALKED and _has_large(v, threshold, 1):
            return True
    return False


def dumps(obj: Any, oob_threshold_bytes: int) -> list[Any]:
    """Pickle ``obj``; buffers of at least ``oob_threshold_bytes`` become frames of their own."""
    if _has_large(obj, oob_threshold_bytes):
        obj = _wrap_large(obj, oob_threshold_bytes)
    return _pickled(obj, oob_threshold_bytes)


def _pickled(obj: Any, oob_threshold_bytes: int) -> list[Any]:
    p = _local.pickler
    if p is None or p.in_use:  # first use in this thread, or pickling re-entered
        p = _ReusablePickler()
        if _local.pickler is None:
            _local.pickler = p
    return p.dumps(obj, oob_threshold_bytes)


def loads(frames: Sequence[Any]) -> Any:
    """Unpickle ``[stream, *buffers]`` as made by :func:`dumps`."""
    return pickle.loads(frames[0], buffers=frames[1:])


_ALIGN = 64
#: Largest frame a payload puts on the wire: larger pickle streams and buffers (the frames path,
#: between hosts) are split into frames of this size, so the broker can refuse any frame larger
#: than ``max_message_bytes`` (config.py) before a peer has authenticated.
FRAME_BYTES = 16 * 1024 * 1024
_shm_warned = False


def pack(
    obj: Any, oob_threshold_bytes: int, pool: shm.SegmentPool | None, owner: int = 0
) -> tuple[list[Any], shm.Segment | None]:
    """Pickle ``obj`` for the wire; large buffers go to a shared-memory segment if ``pool``.

    Returns the frames and the segment written (still mapped; the caller owns
    it until it hands it over, to the process ``owner`` if given), or None.
    """
    return route(dumps(obj, oob_threshold_bytes), pool, owner)


def route(
    frames: list[Any], pool: shm.SegmentPool | None, owner: int = 0
) -> tuple[list[Any], shm.Segment | None]:
    """Lay ``dumps`` output out for the wire: see the module docstring."""
    global _shm_warned
    if len(frames) == 1 and len(frames[0]) <= FRAME_BYTES:
        return frames, None
    stream, bufs = frames[0], frames[1:]
    # A pickle stream too large for one frame goes the frames way (shm.segment_of knows [stream, manifest] only).
    if pool is not None and bufs and len(stream) <= FRAME_BYTES:
        extents, total = [], 0
        for b in bufs:
            total = -(-total // _ALIGN) * _ALIGN
            extents.append((total, b.nbytes))
            total += b.nbytes
        try:
            seg = pool.take(total, owner)
        except shm.ShmUnavailable as exc:
            if not _shm_warned:
                _shm_warned = True
                log.warning("shared memory unavailable (%s); large buffers travel as ZeroMQ frames instead", exc)
        else:
            for (off, n), b in zip(extents, bufs, strict=True):
                shm.copy_into(seg.view[off : off + n], b)
            manifest = {"shm": seg.name, "size": seg.size, "bufs": extents}
            return [stream, json.dumps(manifest).encode()], seg
    manifest = {"bufs": [b.nbytes for b in bufs]}
    if len(stream) <= FRAME_BYTES and all(b.nbytes <= FRAME_BYTES for b in bufs):
        return [stream, json.dumps(manifest).encode(), *bufs], None
    # Split into frames of at most FRAME_BYTES (views, no copy): the broker's max_message_bytes stays small.
    parts = _split(memoryview(stream))
    pieces = [_split(b) for b in bufs]
    manifest["stream"] = len(parts)
    manifest["chunks"] = [len(p) for p in pieces]
    return [parts[0], json.dumps(manifest).encode(), *parts[1:], *(f for p in pieces for f in p)], None


def _split(view: memoryview) -> list[memoryview]:
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    return [view[i : i + FRAME_BYTES] for i in range(0, view.nbytes, FRAME_BYTES)] or [view]


def _joined(frames: Sequence[Any]) -> Any:
    """One writable buffer from the frames a split buffer came in (one copy)."""
    if len(frames) == 1:
        return _writable(frames[0])
    views = [memoryview(f).cast("B") for f in frames]
    out = bytearray(sum(v.nbytes for v in views))
    at = 0
    for v in views:
        out[at : at + v.nbytes] = v
        at += v.nbytes
    return out


class Lease:
    """Our private mapping of someone else's segment, for as long as we use it."""

    def __init__(self, view: memoryview, bufs: list[memoryview]) -> None:
        self.view = view
        self.bufs = bufs

    def close(self) -> bool:
        """Unmap; False if something built on the mapping is still alive (it keeps it)."""
        try:
            for b in self.bufs:
                b.release()
            mm = cast(mmap.mmap, self.view.obj)  # shm.attach maps the segment with mmap
            self.view.release()
            mm.close()
        except BufferError:
            return False
        return True


def free(frames: Sequence[Any]) -> None:
    """Unlink the shared-memory segment of a payload nobody will unpack (a dropped result)."""
    name = shm.segment_of(frames)
    if name is not None and shm.creator(name) is not None:
        shm.unlink(name)


def oob_bytes(frames: Sequence[Any]) -> int:
    """Bytes of the out-of-band buffers of ``dumps`` output."""
    return sum(memoryview(b).nbytes for b in frames[1:])


def unpack(
    frames: Sequence[Any], private: bool, leases: list[Lease] | None = None,
    on_free: Callable[[str], None] | None = None,
) -> Any:
    """Inverse of :func:`pack`. ``private``: writes to arrays on shared memory stay in this process.

    A segment is unlinked as soon as it is mapped unless ``private`` (task
    arguments: their owner, the driver, unlinks or reuses them when the task
    ends); then its mapping is added to ``leases`` so the caller can tell
    whether anything still uses it when it is done. With ``on_free``, a
    received segment is not unlinked but given to ``on_free(name)`` once
    nothing maps it any more (the driver sends it back to its worker).
    """
    if len(frames) == 1:
        return pickle.loads(frames[0])
    manifest = decode_manifest(frames[1])
    name = manifest.shm
    stream: Any = frames[0]
    rest = list(frames[2:])
    if manifest.stream is not None:  # a pickle stream split into frames of at most FRAME_BYTES (route)
        k = manifest.stream
        stream, rest = _joined([frames[0], *rest[: k - 1]]), rest[k - 1 :]
    if name is not None:
        view = shm.attach(name, manifest.size, private)
        if not private:
            if on_free is None:
                shm.unlink(name)
            else:
                weakref.finalize(view.obj, on_free, name)
        bufs = [view[off : off + n] for off, n in manifest.bufs]
        if leases is not None:
            leases.append(Lease(view, bufs))
    elif manifest.chunks is not None:  # buffers split into frames of at most FRAME_BYTES (route)
        bufs = []
        for count in manifest.chunks:
            bufs.append(_joined(rest[:count]))
            rest = rest[count:]
    else:
        bufs = [_writable(f) for f in rest]
    return pickle.loads(stream, buffers=bufs)


def _writable(frame: Any) -> Any:
    """A writable buffer over a received frame, without a copy when it is a ZeroMQ frame."""
    import zmq

    if isinstance(frame, zmq.Frame):
        view = frame.buffer
        if view.nbytes == 0:
            return bytearray()
        import numpy as np

        addr = np.frombuffer(view, np.uint8).__array_interface__["data"][0]
        arr = (ctypes.c_ubyte * view.nbytes).from_address(addr)
        arr._frame = frame  # type: ignore[attr-defined]  # keep the message alive with the view
        return memoryview(arr).cast("B")
    return bytearray(frame)  # in-process (inline mode): never share the sender's memory


def describe(obj: Any) -> str:
    """A short, safe description of an object for an error message."""
    try:
        text = repr(obj)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = object.__repr__(obj)
    if len(text) > 100:
        text = text[:60] + "..." + text[-37:]  # keep both ends: a nested function's name is at the end
    return f"{text} (type {type(obj).__module__}.{type(obj).__qualname__})"


def dumps_call(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], oob_threshold_bytes: int,
    refer: Callable[[Any], int | None] | None = None, code: Any = None,
) -> list[Any]:
    """Pickle a call ``(func, args, kwargs)``; name the culprit if it cannot be pickled.

    ``refer(future)``: for each distfork future among the arguments, the
    index under which it goes as a reference (the broker hands the task its
    value, see :func:`unpack_call`), or None to pickle its value here.
    ``code``: a ``codeship.CodeRef``, pickled first so that the worker puts
    the driver's modules in place before it resolves anything else.
    """
    _local.refer = refer
    call = (func, args, kwargs) if code is None else (code, func, args, kwargs)
    try:
        if _call_has_large(call, args, kwargs, oob_threshold_bytes):  # what dumps does, the short way
            call = _wrap_large(call, oob_threshold_bytes)
        return _pickled(call, oob_threshold_bytes)
    except FutureArgument:
        raise
    except Exception as exc:  # noqa: BLE001 - any pickling failure is the user's object
        culprit = _find_unpicklable(func, args, kwargs)
        raise SerializationError(
            f"cannot pickle {culprit}: {type(exc).__name__}: {exc}. "
            "Everything passed to fork must be picklable by cloudpickle: pass plain data, "
            "or create the object inside the task instead"
        ) from exc
    finally:
        _local.refer = None


def unpack_call(
    frames: Sequence[Any], deps: Sequence[Sequence[Any]], leases: list[Lease]
) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """Unpickle a task's call; ``deps``: the result payloads of the futures it names, in order.

    Everything is mapped private (see :func:`unpack`): the segments of
    dependency values belong to the broker's hold, which may hand them to
    other tasks too.
    """
    if deps:
        from .shared import dep_value  # a held torch module: built once per worker (shared.py)
    values = [dep_value(d, leases) for d in deps]
    _local.deps = values
    try:
        call = unpack(frames, private=True, leases=leases)
    finally:
        _local.deps = None
    if len(call) == 4:  # (CodeRef, func, args, kwargs): the code package was put in place first
        call = call[1:]
    func, args, kwargs = call
    return func, args, kwargs


def _find_unpicklable(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    candidates: list[tuple[str, Any]] = [("the function " + describe(func), func)]
    candidates += [(f"argument {i} {describe(a)}", a) for i, a in enumerate(args)]
    candidates += [(f"keyword argument {k}={describe(v)}", v) for k, v in kwargs.items()]
    for label, value in candidates:
        try:
            _Pickler(io.BytesIO(), protocol=PROTOCOL, buffer_callback=lambda b: False).dump(value)
        except Exception:  # noqa: BLE001
            return label
    return "the call"


class _RemoteException:
    """An exception with its remote traceback text, rebuilt with it as ``__cause__``.

    The exception is pickled on its own, inside: a driver that cannot import
    its class (a module only the workers have) still gets its type name,
    message and traceback, as a :class:`RemoteError`.
    """

    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exc = exc
        self.tb = tb

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        kind = type(self.exc)
        try:
            message = str(self.exc)
        except Exception:  # noqa: BLE001 - a broken __str__ must not lose the rest
            message = "<its message could not be read>"
        inner = cloudpickle.dumps(self.exc, protocol=pickle.HIGHEST_PROTOCOL)
        return _rebuild_remote_exception, (inner, f"{kind.__module__}.{kind.__qualname__}", message, self.tb)


def _rebuild_remote_exception(inner: bytes, type_name: str, message: str, tb: str) -> BaseException:
    from .errors import RemoteError, RemoteTraceback

    exc: BaseException
    try:
        exc = pickle.loads(inner)
    except Exception as err:  # noqa: BLE001 - typically its class cannot be imported here
        exc = RemoteError(
            f"the task raised {type_name}: {message} (that exception cannot be rebuilt in this process: "
            f"{type(err).__name__}: {err}; the remote traceback is the cause)", type_name=type_name,
        )
    exc.__cause__ = RemoteTraceback(_with_source(tb))
    return exc


_FRAME = re.compile(r'^(?P<indent> *)File "(?P<file>[^"]+)", line (?P<line>\d+), in ')


def _with_source(tb: str) -> str:
    """The remote traceback text with the source lines the task's host lacked, where we have them."""
    import linecache

    lines = tb.split("\n")
    out: list[str] = []
    for i, line in enumerate(lines):
        out.append(line)
        m = _FRAME.match(line)
        if m is None:
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if following.startswith(m["indent"] + "  ") and not _FRAME.match(following):
            continue  # the remote side printed the source line
        source = linecache.getline(m["file"], int(m["line"])).strip()
        if source:
            out.append(f"{m['indent']}    {source}")
    return "\n".join(out)


def dumps_exception(exc: BaseException, where: str, oob_threshold_bytes: int) -> list[Any]:
    """Pickle an exception raised in a task, with its traceback text as its future cause.

    If the exception itself cannot be pickled, a :class:`RemoteError` with its
    type, text and traceback is sent instead.
    """
    import traceback

    from .errors import RemoteError

    tb = "".join(traceback.format_exception(exc))
    text = f'\n"""\nTraceback in {where}:\n{tb}"""'
    try:
        frames = dumps(_RemoteException(exc, text), oob_threshold_bytes)
        loads(frames)  # an exception that pickles but cannot be rebuilt fails here, not in the driver
        return route(frames, None)[0]
    except Exception:  # noqa: BLE001
        substitute = RemoteError(
            f"the task raised {type(exc).__module__}.{type(exc).__qualname__}: {exc}, "
            "which could not be pickled to send it back; the remote traceback is the cause",
            type_name=f"{type(exc).__module__}.{type(exc).__qualname__}",
        )
        return route(dumps(_RemoteException(substitute, text), oob_threshold_bytes), None)[0]
