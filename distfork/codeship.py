"""The driver's own code travels to the workers: content-addressed packages, cached per host.

::

    driver (user thread, fork)              broker                     worker slot thread (unpickling a task)
    ┌─────────────────────────────┐  CODE   ┌──────────────────┐        ┌────────────────────────────────────┐
    │ Shipper.ref(): modules from │ ──────▶ │ CodeStore: hash  │        │ _activate(hash) runs first:        │
    │ outside site-packages/stdlib│  once   │ -> zip bytes     │        │  cached in <cache>/<hash>/? else   │
    │ -> one deterministic zip,   │         │ (LRU, bounded,   │ ◀───── │  CODE_GET on a socket of its own,  │
    │ sha256 = its name; each     │         │ hash checked)    │ ─────▶ │  check sha256, unzip, rename       │
    │ task's pickle starts with   │         └──────────────────┘  CODE  │ then swap sys.modules to that      │
    │ a CodeRef(hash): ~80 bytes  │                                     │ package's modules (per-hash sets)  │
    └─────────────────────────────┘                                     └────────────────────────────────────┘

Why this and not ``cloudpickle.register_pickle_by_value``: by value, every
fork pickles the source of every function it touches again (bigger, slower
forks, and classes rebuilt per task so ``isinstance`` across tasks breaks);
here a package crosses to each host once and a fork carries only its hash.

A task's pickle is ``(CodeRef, func, args, kwargs)``; unpickling the
``CodeRef`` first runs :func:`_activate`, so by the time pickle resolves
``mylib.square`` by reference, ``mylib`` is the driver's. Two drivers with
two versions of ``mylib`` have two hashes; a worker keeps each hash's
imported modules apart (``_saved``) and puts the right set into
``sys.modules`` before a task of that hash is unpickled. Tasks of a driver
with nothing to ship carry the empty hash: the worker's own modules.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import json
import logging
import os
import shutil
import site
import stat
import sys
import sysconfig
import tempfile
import threading
import time
import types
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import SerializationError

__all__ = [
    "CodeRef",
    "CodeStore",
    "Fetcher",
    "Package",
    "Shipper",
    "build_package",
    "configure_worker",
    "find_local_modules",
    "unpickling",
]

log = logging.getLogger(__name__)

_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".tox", ".nox", ".mypy_cache", ".pytest_cache",
              ".ruff_cache", "node_modules", ".venv", "venv", ".eggs"}
_SKIP_SUFFIXES = (".pyc", ".pyo")
_NEVER_SHIP = {"distfork", "__main__", "__mp_main__"}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


# -- the driver side ---------------------------------------------------------------------------


def _installed_roots() -> list[str]:
    """Directories whose modules every worker is expected to have: the stdlib and site-packages."""
    roots: set[str] = set()
    paths = sysconfig.get_paths()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        if paths.get(key):
            roots.add(paths[key])
    try:
        roots.update(site.getsitepackages())
    except AttributeError:  # some virtualenv builds lack it
        pass
    user = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if isinstance(user, str):
        roots.add(user)
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        roots.add(os.path.join(prefix, "lib"))
        roots.add(os.path.join(prefix, "lib64"))
    return sorted({os.path.realpath(r) for r in roots})


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r + os.sep) for r in roots)


def _top_path(name: str, file: str) -> Path | None:
    """Where module ``name`` (loaded from ``file``) has its top-level package or module file."""
    parts = name.split(".")
    path = Path(file)
    if path.stem == "__init__":
        top = path.parent
        ups = len(parts) - 1
    elif len(parts) == 1:
        return path
    else:
        top = path.parent
        ups = len(parts) - 2
    for _ in range(ups):
        top = top.parent
    return top if top.name == parts[0] else None


def find_local_modules(modules: dict[str, Any] | None = None) -> dict[str, Path]:
    """Top-level module name -> its directory or file, for the imported modules a worker may lack.

    Those whose file is outside the standard library and site-packages: the
    script's directory, the current directory, other ``sys.path`` entries,
    editable installs. distfork itself is never shipped.
    """
    modules = dict(sys.modules if modules is None else modules)
    installed = _installed_roots()
    found: dict[str, Path] = {}
    for name, mod in modules.items():
        top = name.partition(".")[0]
        if top in _NEVER_SHIP or top in found or top in sys.stdlib_module_names:
            continue
        file = getattr(mod, "__file__", None)
        if not isinstance(file, str) or not os.path.isabs(file):
            continue
        real = os.path.realpath(file)
        if _under(real, installed):
            continue
        where = _top_path(name, real)
        if where is not None and where.exists():
            found[top] = where
    return found


def _resolve_extra(item: str | types.ModuleType | os.PathLike[str]) -> tuple[str, Path]:
    """One entry of ``init(code=[...])`` / ``DISTFORK_CODE``: a path, a module or a module's name."""
    if isinstance(item, types.ModuleType):
        file = getattr(item, "__file__", None)
        where = _top_path(item.__name__, os.path.realpath(file)) if isinstance(file, str) else None
        if where is None:
            raise SerializationError(f"cannot ship module {item.__name__!r}: it has no source file")
        return item.__name__.partition(".")[0], where
    text = os.fspath(item)
    path = Path(text).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir() and not (path / "__init__.py").exists():
            raise SerializationError(
                f"cannot ship directory {path}: it is not a Python package (no __init__.py). Give the "
                "package directory itself, or its modules one by one"
            )
        name = path.name if path.is_dir() else path.name.partition(".")[0]
        return name, path
    try:
        spec = importlib.util.find_spec(text)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not isinstance(spec.origin, str) or not os.path.isabs(spec.origin):
        raise SerializationError(
            f"cannot ship {text!r}: it is neither an existing path nor an importable module with a source file"
        )
    where = _top_path(text, os.path.realpath(spec.origin))
    if where is None:
        raise SerializationError(f"cannot ship module {text!r}: cannot tell where its top-level package is")
    return text.partition(".")[0], where


def _files(top: Path) -> Iterable[tuple[str, Path]]:
    """(name in the package, path) of every file of a top-level package or module."""
    if top.is_file():
        yield top.name, top
        return
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for f in sorted(filenames):
            if f.endswith(_SKIP_SUFFIXES):
                continue
            path = Path(dirpath) / f
            if path.is_file():
                yield path.relative_to(top.parent).as_posix(), path


class Package:
    """A zip of top-level modules and packages, named by the sha256 of its bytes."""

    def __init__(self, data: bytes, names: Sequence[str]) -> None:
        self.data = data
        self.names = tuple(names)
        self.hash = hashlib.sha256(data).hexdigest()

    def __repr__(self) -> str:
        return f"Package({self.hash[:12]}, {len(self.data)} bytes, {', '.join(self.names)})"


def build_package(tops: dict[str, Path], max_bytes: int) -> Package:
    """Zip ``tops`` deterministically (same files, same bytes, same hash); refuse more than ``max_bytes``."""
    files: list[tuple[str, Path, int]] = []
    for _, top in sorted(tops.items()):
        for arcname, path in _files(top):
            files.append((arcname, path, path.stat().st_size))
    total = sum(size for _, _, size in files)
    if max_bytes and total > max_bytes:
        biggest = sorted(files, key=lambda f: -f[2])[:5]
        listing = ", ".join(f"{p} ({size / 1e6:.1f} MB)" for _, p, size in biggest)
        raise SerializationError(
            f"the code to ship to the workers is {total / 1e6:.1f} MB, over the limit of {max_bytes / 1e6:.1f} MB "
            f"(code_max_bytes); the biggest files: {listing}. Keep data files out of the shipped packages "
            f"({', '.join(sorted(tops))}), raise DISTFORK_CODE_MAX_BYTES, or turn shipping off "
            "(DISTFORK_CODE_SHIP=0) and install the code on the workers"
        )
    buf = io.BytesIO()
    seen: set[str] = set()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for arcname, path, _ in sorted(files):
            if arcname in seen:
                continue
            seen.add(arcname)
            info = zipfile.ZipInfo(arcname, _ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes(), compresslevel=1)
        manifest = zipfile.ZipInfo(".distfork-names", _ZIP_DATE)
        zf.writestr(manifest, json.dumps(sorted(tops)))
    return Package(buf.getvalue(), sorted(tops))


class CodeRef:
    """Travels first in a task's pickle; unpickled, it puts its package's modules in place."""

    __slots__ = ("hash",)

    def __init__(self, code_hash: str) -> None:
        self.hash = code_hash

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _activate, (self.hash,)


#: The reference of a driver with nothing to ship: the worker's own modules only.
NOTHING = CodeRef("")


class Shipper:
    """The driver's view: which package its tasks need, rebuilt only when ``sys.modules`` grows."""

    def __init__(self, extra: Sequence[Any], max_bytes: int, send: Any, enabled: bool = True) -> None:
        self.extra = [_resolve_extra(x) for x in extra]  # bad entries fail in init(), not in fork()
        self.max_bytes = max_bytes
        # Off (code_ship=False): every task still says so (the empty hash), so that a worker that ran
        # another driver's package puts its own modules back before unpickling ours.
        self.enabled = enabled
        self.send = send  # send(package): hand it to the driver's I/O thread
        self._seen = -1
        self._ref = NOTHING
        self._package: Package | None = None
        self._lock = threading.Lock()

    @property
    def package(self) -> Package | None:
        return self._package

    def ref(self) -> CodeRef:
        """The reference for the next task: one length comparison unless modules were imported."""
        if len(sys.modules) == self._seen or not self.enabled:
            return self._ref
        with self._lock:
            seen = len(sys.modules)
            if seen != self._seen:
                tops = find_local_modules()
                tops.update(dict(self.extra))
                if tops:
                    pkg = build_package(tops, self.max_bytes)
                    if self._package is None or pkg.hash != self._package.hash:
                        log.info("shipping %r to the workers", pkg)
                        self._package = pkg
                        self.send(pkg)
                        self._ref = CodeRef(pkg.hash)
                else:
                    self._ref = NOTHING
                self._seen = seen
            return self._ref


def parse_code_setting(text: str) -> list[str]:
    """``DISTFORK_CODE``: paths or module names, separated by commas or ``os.pathsep``."""
    return [p.strip() for p in text.replace(os.pathsep, ",").split(",") if p.strip()]


# -- the broker side ---------------------------------------------------------------------------


class CodeStore:
    """Packages by hash, least recently used dropped beyond ``max_bytes``. No I/O, no unpickling."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self.nbytes = 0

    def put(self, code_hash: str, data: bytes) -> bool:
        """Keep ``data`` if it is what ``code_hash`` names (else a driver could poison another's hash)."""
        if hashlib.sha256(data).hexdigest() != code_hash:
            return False
        if code_hash in self._items:
            self._items.move_to_end(code_hash)
            return True
        self._items[code_hash] = data
        self.nbytes += len(data)
        while self.nbytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.nbytes -= len(old)
        return True

    def get(self, code_hash: str) -> bytes | None:
        data = self._items.get(code_hash)
        if data is not None:
            self._items.move_to_end(code_hash)
        return data

    def __len__(self) -> int:
        return len(self._items)


# -- the worker side ---------------------------------------------------------------------------


class Fetcher:
    """Gets a package from the broker: a socket of its own per fetch, in the thread that needs it."""

    def __init__(self, address: str, keys: Any, timeout_s: float) -> None:
        self.address = address
        self.keys = keys
        self.timeout_s = timeout_s

    def fetch(self, code_hash: str) -> bytes:
        import zmq

        from . import protocol, security
        from .protocol import Msg

        ctx: zmq.Context[Any] = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        security.secure_client(sock, self.keys)
        sock.connect(self.address)
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                sock.send_multipart(protocol.encode_json(Msg.CODE_GET, {"hash": code_hash}))
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0 or not sock.poll(int(min(left, 1.0) * 1000) + 1):
                        break
                    frames = sock.recv_multipart()
                    kind, body = protocol.decode(frames)
                    if kind is not Msg.CODE:
                        continue
                    got, data = protocol.decode_code(frames, body)
                    if got != code_hash:
                        continue
                    if data is not None and hashlib.sha256(data).hexdigest() == code_hash:
                        return bytes(data)
                    break  # the broker does not have it (yet: its driver's CODE may be on the way)
                if time.monotonic() >= deadline:
                    raise SerializationError(
                        f"the task needs the driver's code package {code_hash[:12]}, which the broker at "
                        f"{self.address} did not give within {self.timeout_s:g} s (code_fetch_timeout_s); "
                        "is the driver that forked it still connected?"
                    )
                time.sleep(0.05)
        finally:
            sock.close(linger=0)


class _WorkerCode:
    """Process-wide state of a worker: where packages are cached, which one is in ``sys.modules``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.fetcher: Fetcher | None = None
        self.cache_dir: Path | None = None
        self.active = ""  # hash whose modules are in sys.modules ("" the worker's own)
        self.roots: dict[str, tuple[str, tuple[str, ...]]] = {}  # hash -> (sys.path entry, top-level names)
        self.saved: OrderedDict[str, dict[str, types.ModuleType]] = OrderedDict()


_worker = _WorkerCode()
_SAVED_MAX = 32  # packages whose imported modules a worker keeps ready


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "distfork" / "code"


def private_dir(path: Path) -> Path:
    """Create ``path`` 0700, or check that an existing one is ours and private (docs/SECURITY.md)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise SerializationError(
            f"code cache directory {path} is not private to this user (owner uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):o}): others could change the code tasks run. "
            f"`chmod 700 {path}` or set DISTFORK_CODE_CACHE_DIR to a private directory"
        )
    return path


def configure_worker(address: str, keys: Any, cache_dir: str, fetch_timeout_s: float) -> None:
    """Called once by a worker process: where to fetch packages from and where to cache them."""
    with _worker.lock:
        _worker.fetcher = Fetcher(address, keys, fetch_timeout_s)
        _worker.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()


def unpickling() -> threading.RLock:
    """Held around unpickling a task: one slot's ``sys.modules`` swap must not meet another's import."""
    return _worker.lock


def _install(code_hash: str) -> tuple[str, tuple[str, ...]]:
    """The extracted package ``code_hash``: fetched and unzipped once per host, then from disk."""
    known = _worker.roots.get(code_hash)
    if known is not None:
        return known
    if not all(c in "0123456789abcdef" for c in code_hash) or len(code_hash) != 64:
        raise SerializationError(f"malformed code package name {code_hash[:80]!r}")
    if _worker.fetcher is None or _worker.cache_dir is None:
        raise SerializationError(
            "this task needs the driver's code package, but this process is not a distfork worker "
            "connected to a broker"
        )
    cache = private_dir(_worker.cache_dir)
    root = cache / code_hash
    names_file = root / ".distfork-names"
    if not names_file.exists():
        data = _worker.fetcher.fetch(code_hash)
        tmp = Path(tempfile.mkdtemp(prefix=f".{code_hash[:12]}-", dir=cache))
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for member in zf.infolist():
                    target = (tmp / member.filename).resolve()
                    if not str(target).startswith(str(tmp.resolve()) + os.sep):
                        raise SerializationError(f"code package {code_hash[:12]} names a path outside itself")
                zf.extractall(tmp)
            try:
                os.rename(tmp, root)  # atomic: another worker process of this host may race us
            except OSError:
                if not names_file.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("code package %s installed in %s", code_hash[:12], root)
    names = tuple(json.loads(names_file.read_text()))
    _worker.roots[code_hash] = known = (str(root), names)
    return known


def _owned(names: Iterable[str]) -> list[str]:
    tops = set(names)
    return [key for key in list(sys.modules) if key.partition(".")[0] in tops]


def _activate(code_hash: str) -> None:
    """Make ``code_hash``'s modules the ones imported (unpickling a task's :class:`CodeRef`).

    Returns None: the task's call drops the first item of its tuple.
    """
    w = _worker
    if code_hash == w.active:  # the common case, under the lock unpack_call holds in a worker
        return
    with w.lock:
        new_root, new_names = _install(code_hash) if code_hash else ("", ())
        old_root, old_names = w.roots.get(w.active, ("", ()))
        # Whatever is imported under the names of either package belongs to the active one: put it aside.
        stash: dict[str, types.ModuleType] = {}
        for key in _owned((*old_names, *new_names)):
            stash[key] = sys.modules.pop(key)
        w.saved[w.active] = {**w.saved.get(w.active, {}), **stash}
        w.saved.move_to_end(w.active)
        if old_root in sys.path:
            sys.path.remove(old_root)
        if new_root:
            sys.path.insert(0, new_root)
        sys.modules.update(w.saved.pop(code_hash, {}))
        while len(w.saved) > _SAVED_MAX:
            w.saved.popitem(last=False)
        importlib.invalidate_caches()
        w.active = code_hash


def missing_module_hint(exc: BaseException) -> str:
    """What to do when a task cannot be unpickled on a worker (most often: a module it lacks)."""
    missing = exc if isinstance(exc, ModuleNotFoundError) else None
    cause = exc.__cause__ or exc.__context__
    if missing is None and isinstance(cause, ModuleNotFoundError):
        missing = cause
    if missing is None or not missing.name:
        return "Is every module the task needs installed on the worker?"
    top = missing.name.partition(".")[0]
    return (
        f"Module {top!r} is not on the worker. If it is your own code, ship it: distfork.init(address, "
        f"code=[{top!r}]) or DISTFORK_CODE={top} (the driver ships modules it imported from outside "
        "site-packages by itself unless DISTFORK_CODE_SHIP=0); if it is a package from an index, install it "
        f"in the worker's environment or image (pip install {top})"
    )
