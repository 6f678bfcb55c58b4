"""The public calls: ``fork``, ``wait``, ``init``, ``shutdown``, ``options``.

A process has at most one *runtime*: a driver connected to a broker (the
embedded local cluster, or one at an address), or the inline mode that runs
every fork synchronously in the caller. The first ``fork`` with nothing
configured creates the runtime from ``DISTFORK_ADDRESS`` / ``DISTFORK_MODE``,
or starts the embedded cluster; it is shut down at interpreter exit.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from . import codeship, protocol, serialize, shared
from . import config as _config
from . import resources as resources_
from . import tracing as _trace
from .cluster import LocalCluster
from .driver import Call, Driver, complete
from .errors import DistforkError
from .future import Future, settle
from .worker import run_task

__all__ = ["Options", "fork", "init", "options", "shutdown", "wait"]

log = logging.getLogger(__name__)

T = TypeVar("T")

MODES = ("cluster", "inline")
#: What a fork asks of its worker: (resources, labels), or None.
Request = tuple[dict[str, float] | None, dict[str, str] | None] | None


@dataclasses.dataclass
class _Runtime:
    mode: str
    config: _config.Config
    pid: int
    driver: Driver | None = None
    cluster: LocalCluster | None = None
    #: Copies of large parameters / read-only arrays forked before (see distfork/shared.py).
    copies: shared.ParamCache | None = None

    def share_copy(self) -> Callable[[Any], Any] | None:
        """The reducer that sends large parameters forked before as references, if workers share our /dev/shm."""
        driver = self.driver
        if driver is None or driver._pool is None or driver._session is None:
            return None
        if self.copies is None or self.copies.session != driver._session:
            if self.copies is not None:
                self.copies.close()
            self.copies = shared.ParamCache(driver._session, self.config.share_min_bytes, driver._segments)
        return self.copies.reduce

    @property
    def address(self) -> str | None:
        return self.driver.address if self.driver else None

    def close(self) -> None:
        try:
            if self.copies is not None:
                self.copies.close()
            if self.driver is not None:
                self.driver.close()
        finally:
            if self.cluster is not None:
                self.cluster.stop()


_lock = threading.RLock()
_runtime: _Runtime | None = None
_atexit_registered = False


def init(
    address: str | None = None,
    mode: str = "cluster",
    workers: int | None = None,
    code: Sequence[Any] = (),
    **config: Any,
) -> None:
    """Set up how forks run in this process.

    - ``init()``: start the embedded local cluster (a broker and ``workers``
      worker processes, default one per core), stopped at exit;
    - ``init("tcp://host:7340")``: connect to a running cluster (also
      ``DISTFORK_ADDRESS``); raises ``BrokerUnavailableError`` if nothing answers;
    - ``init(mode="inline")``: run every fork synchronously in the caller,
      with the same results (pickled the same way), for debugging.

    Connected to a cluster at an address, the driver ships the modules it
    imported from outside site-packages and the standard library to the
    workers (cached per host by content hash). ``code``: more to ship, paths
    or modules or module names (also ``DISTFORK_CODE``); ``code_ship=False``
    (``DISTFORK_CODE_SHIP=0``) turns shipping off.

    Other keyword arguments override fields of :class:`distfork.config.Config`.
    """
    global _runtime, _atexit_registered
    check_address(address, "distfork.init(address)")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
    with _lock:
        if _runtime is not None and _runtime.pid == os.getpid():
            raise DistforkError(
                f"distfork is already initialized ({_describe(_runtime)}); call distfork.shutdown() first"
            )
        cfg = _config.load(**config)
        rt = _Runtime(mode, cfg, os.getpid())
        if mode == "cluster":
            if address is None:
                rt.cluster = LocalCluster(cfg, workers=workers).start()
                address = rt.cluster.address
            rt.driver = Driver(address, cfg, nested=os.environ.get("DISTFORK_IN_WORKER") == "1")
            try:
                extra = [*codeship.parse_code_setting(cfg.code), *code]
                if rt.cluster is None or (cfg.code_ship and extra):
                    rt.driver.shipper = codeship.Shipper(extra if cfg.code_ship else [], cfg.code_max_bytes,
                                                         rt.driver.ship_code, enabled=cfg.code_ship)
                rt.driver.connect()
            except BaseException:
                rt.close()
                raise
        _runtime = rt
        if not _atexit_registered:
            atexit.register(_at_exit)
            _atexit_registered = True
        _trace.from_env()  # `distfork trace -- cmd`: after shutdown's atexit, so it runs before it
        log.info("distfork initialized: %s", _describe(rt))


def check_address(address: object, where: str) -> None:
    """Refuse an address that is not a string such as ``"tcp://host:7340"``."""
    if address is None:
        return
    if not isinstance(address, str):
        raise TypeError(
            f"{where}: an address is a string such as 'tcp://host:7340', got {type(address).__name__}: "
            f"{address!r:.80}"
        )
    if "://" not in address:
        raise ValueError(
            f"{where}: {address!r} is not an address; give one such as 'tcp://host:7340' (scheme://host:port)"
        )


def _describe(rt: _Runtime) -> str:
    if rt.mode == "inline":
        return "inline mode"
    if rt.cluster is not None:
        return f"embedded cluster of {rt.cluster.n_workers} workers at {rt.address}"
    return f"cluster at {rt.address}"


# This process's pid, kept fresh in forked children: os.getpid() is a system call, and _current()
# runs on every fork (it was ~15% of a no-op fork's samples in the calling thread).
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


def _current() -> _Runtime:
    rt = _runtime
    if rt is not None and rt.pid == _pid:
        return rt
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            init(os.environ.get("DISTFORK_ADDRESS") or None, mode=os.environ.get("DISTFORK_MODE", "cluster"))
        assert _runtime is not None
        return _runtime


def shutdown() -> None:
    """Close the connection and stop the embedded cluster; unfinished futures are cancelled.

    At interpreter exit, unfinished forks are waited for first (see ``_at_exit``).
    """
    global _runtime
    with _lock:
        rt, _runtime = _runtime, None
    if rt is not None and rt.pid == os.getpid():
        rt.close()


def _at_exit() -> None:
    """At interpreter exit: let the unfinished forks finish, then shut down (Ctrl-C cancels them).

    As ``concurrent.futures`` executors do at exit. A runtime inside a task
    (nested) does not wait: its worker process ends it.
    """
    rt = _runtime
    driver = rt.driver if rt is not None and rt.pid == os.getpid() else None
    if rt is not None and driver is not None and not driver.nested:
        try:
            while pending := driver.pending():
                log.info("waiting at exit for %d unfinished forks (Ctrl-C cancels them)", len(pending))
                done, _ = concurrent.futures.wait(
                    pending, timeout=rt.config.peer_timeout_s, return_when=concurrent.futures.FIRST_COMPLETED
                )
                if not done and not _broker_answers(driver.address, min(5.0, rt.config.peer_timeout_s)):
                    log.warning("the broker at %s does not answer: cancelling %d unfinished forks at exit",
                                driver.address, len(pending))
                    break
        except KeyboardInterrupt:
            log.warning("interrupted at exit: cancelling %d unfinished forks", len(driver.pending()))
    shutdown()


def _broker_answers(address: str, timeout_s: float) -> bool:
    """Whether a broker answers at ``address`` within ``timeout_s`` (a driver waits for a lost broker
    for ever; exit must not)."""
    from .status import query_status

    try:
        query_status(address, timeout_s)
    except Exception:  # noqa: BLE001 - any failure to get an answer
        return False
    return True


def _check_callable(func: Any) -> None:
    if not callable(func):
        raise TypeError(
            f"fork() needs a callable as its first argument, got {serialize.describe(func)}; "
            "pass the function itself, not its result: fork(f, x), not fork(f(x))"
        )


def _fork(
    func: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any], max_retries: int, timeout_s: float,
    request: Request = None,
) -> Future[T]:
    _check_callable(func)
    rt = _current()
    driver = rt.driver
    deps: list[Future[Any]] = []
    pins = shared.pins()
    serialize._local.share_copy = rt.share_copy()
    shared._forking.driver = driver  # share() handles pickle a reference for its workers
    try:
        frames = serialize.dumps_call(
            func, args, kwargs, rt.config.oob_threshold_bytes, driver.referrer(deps) if driver is not None else None,
            driver.shipper.ref() if driver is not None and driver.shipper is not None else None,
        )
    except serialize.FutureArgument as arg:
        return _fork_after(arg.future, func, args, kwargs, max_retries, timeout_s, request)
    finally:
        serialize._local.share_copy = None
        shared._forking.driver = None
    rec = _trace.begin(func, args, kwargs, driver is not None) if _trace.ACTIVE else None
    if driver is not None:
        call = Call(func, args, kwargs, deps, request=request) if deps else None
        return driver.submit(frames, max_retries, timeout_s, call=call, request=request,
                             pinned=shared.pins() != pins, traced=rec)
    fut: Future[T] = Future()
    frames, _ = serialize.route(frames, None)
    with _trace.run_here(rec, "inline"):
        code, out, _ = run_task(frames, f"inline mode (pid {os.getpid()})", rt.config.oob_threshold_bytes, None)
    complete(fut, code, out)
    if rec is not None:
        _trace.finish(rec, code, 0, fut, "", 0)
    return fut


def _fork_after(
    dep: Future[Any], func: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any], max_retries: int,
    timeout_s: float, request: Request = None,
) -> Future[T]:
    """Fork once ``dep`` (a future among the arguments) is done; if it failed, fail the same way, unrun.

    For futures the broker cannot resolve: not a task's (``then`` chains),
    another runtime's, or forked inside a task, where waiting for the outer
    future first runs ``dep`` here if it is still queued, then the call
    (see ``Future._reclaim``), so a task never waits for children no slot
    can start.
    """
    inner_box: list[Future[T]] = []
    scope = _trace.capture()  # a traced task's forks stay its own when they start from a callback

    def reclaim(_: Future[Any], local: bool) -> None:
        dep._reclaim(local)  # run here: its done callback forks the call, in this thread
        if inner_box:
            inner_box[0]._reclaim(local)

    outer: Future[T] = Future(reclaimer=reclaim if isinstance(dep, Future) else None)

    def start(_: Any) -> None:
        if outer.cancelled():
            return
        if dep.cancelled():
            outer.cancel()
            return
        failure = dep.exception()
        if failure is not None:
            settle(outer, exception=failure)
            return
        try:
            with _trace.scoped(scope):
                inner = _fork(func, args, kwargs, max_retries, timeout_s, request)
        except BaseException as exc:  # noqa: BLE001 - it belongs to the future
            settle(outer, exception=exc)
            return
        inner_box.append(inner)

        def cancel_inner(_: Future[Any]) -> None:
            inner.cancel()

        outer._canceller = cancel_inner
        inner.add_done_callback(finish)

    def finish(inner: Any) -> None:
        if inner.cancelled():
            outer.cancel()
        elif inner.exception() is not None:
            settle(outer, exception=inner.exception())
        else:
            settle(outer, result=inner.result())

    dep.add_done_callback(start)
    return outer



def fork(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
    """Run ``func(*args, **kwargs)`` in a worker; return its :class:`Future` at once.

    ``func`` may be a function (also a lambda, closure or one defined in
    ``__main__``), a bound method, a callable object or a ``torch.nn.Module``.
    Everything is pickled now, so later changes to the arguments do not reach
    the task. Raises :class:`~distfork.errors.SerializationError` at once if
    something cannot be pickled.
    """
    return _fork(func, args, kwargs, protocol.DEFAULT_RETRIES, 0.0)


def wait(fut: Future[T], timeout: float | None = None) -> T:
    """The value of a forked task; raises what the task raised.

    With ``timeout`` (seconds), raises the builtin ``TimeoutError`` if the
    task is not done by then; the task goes on.
    """
    if not isinstance(fut, Future):
        if type(fut).__module__.startswith("torch"):
            raise TypeError(
                f"distfork.wait() takes a distfork Future (what distfork.fork returns), got a torch future "
                f"{serialize.describe(fut)}; wait for it with torch.jit.wait() (and for distfork futures "
                "with distfork.wait(): torch.jit.wait cannot take them)"
            )
        raise TypeError(f"wait() takes a distfork Future (what fork returns), got {serialize.describe(fut)}")
    return fut.result(timeout)


@dataclasses.dataclass(frozen=True)
class Options:
    """Per-fork options, apart from the user's own keyword arguments."""

    max_retries: int | None = None
    timeout_s: float | None = None
    #: What the worker must have free for the task: ``{"gpu": 1, "memory_gb": 16}`` (held while it runs).
    resources: dict[str, float] | None = None
    #: Labels the worker must have: ``{"zone": "a"}``.
    labels: dict[str, str] | None = None

    def __post_init__(self) -> None:
        need, want = resources_.validate_request(self.resources, self.labels)
        object.__setattr__(self, "_request", (need, want) if need or want else None)
        if self.max_retries is not None and not 0 <= self.max_retries < protocol.DEFAULT_RETRIES:
            raise ValueError(f"max_retries={self.max_retries}: give 0 to {protocol.DEFAULT_RETRIES - 1}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s}: give a positive number of seconds, or None")

    def fork(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """``distfork.fork`` with these options."""
        retries = protocol.DEFAULT_RETRIES if self.max_retries is None else self.max_retries
        return _fork(func, args, kwargs, retries, self.timeout_s or 0.0, getattr(self, "_request", None))


def options(
    max_retries: int | None = None, timeout_s: float | None = None,
    resources: dict[str, float] | None = None, labels: dict[str, str] | None = None,
) -> Options:
    """Options for forks: ``distfork.options(max_retries=0, timeout_s=5).fork(f, x)``.

    ``max_retries``: how often the task is re-run when the worker running it
    is lost (default ``Config.max_retries``). ``timeout_s``: the longest the
    task may run; then its worker process is ended (and replaced) and the
    future fails with ``TimeoutError``. Inline mode ignores ``timeout_s``.
    ``resources``: what the worker process must have free, held while the
    task runs (``{"gpu": 1}``: it also sees only its device through
    ``CUDA_VISIBLE_DEVICES``); ``labels``: labels the worker must have. A task
    no worker of the cluster can ever run fails after ``resource_grace_s``
    naming what the cluster has. Inline mode ignores both.
    """
    return Options(max_retries, timeout_s, resources, labels)
