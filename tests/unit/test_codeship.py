"""distfork.codeship without a cluster: which modules ship, the package, the broker's store, the worker's swap."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from distfork import codeship, protocol, serialize
from distfork.errors import ProtocolError, SerializationError


def _mod(tmp_path: Path, name: str, body: str = "X = 1\n") -> Path:
    path = tmp_path / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "__init__.py").write_text(body)
    return path


def test_local_modules_are_found_and_installed_ones_and_distfork_are_not(tmp_path: Path) -> None:
    import json as stdlib_module

    import numpy

    import distfork

    pkg = _mod(tmp_path, "mypkg")
    (pkg / "sub.py").write_text("Y = 2\n")
    single = tmp_path / "single.py"
    single.write_text("Z = 3\n")

    class M:
        def __init__(self, file: Path) -> None:
            self.__file__ = str(file)

    modules = {"mypkg": M(pkg / "__init__.py"), "mypkg.sub": M(pkg / "sub.py"), "single": M(single),
               "json": stdlib_module, "numpy": numpy, "distfork": distfork, "sys": sys}
    assert codeship.find_local_modules(modules) == {"mypkg": pkg.resolve(), "single": single.resolve()}


def test_a_submodule_alone_still_ships_its_whole_top_level_package(tmp_path: Path) -> None:
    pkg = _mod(tmp_path, "top")
    _mod(pkg, "inner")
    (pkg / "inner" / "leaf.py").write_text("")

    class M:
        __file__ = str(pkg / "inner" / "leaf.py")

    assert codeship.find_local_modules({"top.inner.leaf": M()}) == {"top": pkg.resolve()}


def test_the_package_is_deterministic_and_named_by_its_bytes(tmp_path: Path) -> None:
    pkg = _mod(tmp_path, "mylib")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"junk")
    (pkg / "data.txt").write_text("data")
    a = codeship.build_package({"mylib": pkg}, 0)
    os.utime(pkg / "__init__.py", (1, 1))  # another mtime: same content, same package
    b = codeship.build_package({"mylib": pkg}, 0)
    assert a.hash == b.hash == hashlib.sha256(a.data).hexdigest()
    names = zipfile.ZipFile(io.BytesIO(a.data)).namelist()
    assert sorted(names) == [".distfork-names", "mylib/__init__.py", "mylib/data.txt"]
    (pkg / "__init__.py").write_text("X = 2\n")
    assert codeship.build_package({"mylib": pkg}, 0).hash != a.hash


def test_a_package_over_the_limit_is_refused_naming_its_biggest_files(tmp_path: Path) -> None:
    pkg = _mod(tmp_path, "proj")
    (pkg / "weights.bin").write_bytes(b"\0" * 3_000_000)
    (pkg / "small.py").write_text("pass\n")
    with pytest.raises(SerializationError) as info:
        codeship.build_package({"proj": pkg}, 1_000_000)
    text = str(info.value)
    assert "3.0 MB, over the limit of 1.0 MB" in text
    assert str(pkg / "weights.bin") in text.split("biggest files:")[1].split(",")[0]
    assert "DISTFORK_CODE_MAX_BYTES" in text and "DISTFORK_CODE_SHIP=0" in text


def test_bad_code_entries_are_refused_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "notpkg").mkdir()
    with pytest.raises(SerializationError, match="not a Python package"):
        codeship.Shipper([str(tmp_path / "notpkg")], 0, lambda p: None)
    with pytest.raises(SerializationError, match="neither an existing path nor an importable module"):
        codeship.Shipper(["no_such_module_anywhere_xyz"], 0, lambda p: None)
    assert codeship.parse_code_setting(f"a, b{os.pathsep}c,,") == ["a", "b", "c"]


def test_the_shipper_sends_a_package_once_and_again_only_when_new_code_is_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _mod(tmp_path, "shipme_one", "A = 1\n")
    _mod(tmp_path, "shipme_two", "B = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sent: list[codeship.Package] = []
    shipper = codeship.Shipper([], 0, sent.append)
    import shipme_one  # noqa: F401

    try:
        first = shipper.ref()
        assert [shipper.ref() for _ in range(1000)] == [first] * 1000  # the same object: no rescan
        assert len(sent) == 1 and "shipme_one" in sent[0].names and first.hash == sent[0].hash
        import shipme_two  # noqa: F401

        second = shipper.ref()
        assert len(sent) == 2 and second.hash != first.hash and "shipme_two" in sent[1].names
    finally:
        sys.modules.pop("shipme_one", None)
        sys.modules.pop("shipme_two", None)


def test_a_fork_carries_only_the_hash_of_the_package() -> None:
    plain = serialize.dumps_call(max, (1, 2), {}, 1 << 16)
    ref = codeship.CodeRef("ab" * 32)
    with_ref = serialize.dumps_call(max, (1, 2), {}, 1 << 16, code=ref)
    assert len(with_ref[0]) - len(plain[0]) < 120


def test_the_broker_store_keeps_only_what_the_hash_names_and_stays_bounded() -> None:
    store = codeship.CodeStore(max_bytes=250)
    data = [bytes([i]) * 100 for i in range(3)]
    hashes = [hashlib.sha256(d).hexdigest() for d in data]
    assert not store.put(hashes[0], b"poison")  # a driver cannot claim another's package
    assert store.get(hashes[0]) is None
    assert store.put(hashes[0], data[0]) and store.put(hashes[1], data[1])
    store.get(hashes[0])  # recently used: the other one goes first
    assert store.put(hashes[2], data[2])
    assert store.get(hashes[1]) is None and store.get(hashes[0]) == data[0] and store.nbytes == 200


def test_code_messages_round_trip_and_bad_ones_raise_protocol_error() -> None:
    h = "c" * 64
    frames = protocol.encode_code(h, b"zip")
    kind, body = protocol.decode(frames)
    assert kind is protocol.Msg.CODE and protocol.decode_code(frames, body) == (h, b"zip")
    none = protocol.encode_code(h, None)
    assert protocol.decode_code(none, protocol.decode(none)[1]) == (h, None)
    for bad in (protocol.encode_json(protocol.Msg.CODE, {"hash": "short"}),
                protocol.encode_json(protocol.Msg.CODE, {"hash": 5}),
                [*protocol.encode_code(h, b"a"), b"extra"]):
        with pytest.raises(ProtocolError):
            protocol.decode_code(bad, protocol.decode(bad)[1])


def test_a_cache_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    ok = codeship.private_dir(tmp_path / "new" / "cache")
    assert ok.stat().st_mode & 0o777 == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    loose.chmod(0o777)
    with pytest.raises(SerializationError, match="not private"):
        codeship.private_dir(loose)


class _FakeFetcher:
    def __init__(self, packages: dict[str, bytes]) -> None:
        self.packages = packages
        self.fetched: list[str] = []

    def fetch(self, code_hash: str) -> bytes:
        self.fetched.append(code_hash)
        return self.packages[code_hash]


@pytest.fixture
def worker_code(tmp_path: Path) -> Any:
    """This process as a worker whose packages come from a fake broker; restored afterwards."""
    saved = codeship._worker
    codeship._worker = codeship._WorkerCode()
    codeship._worker.cache_dir = tmp_path / "cache"
    try:
        yield codeship._worker
    finally:
        for key in [k for k in sys.modules if k.partition(".")[0] == "swaplib"]:
            del sys.modules[key]
        for root, _ in codeship._worker.roots.values():
            if root in sys.path:
                sys.path.remove(root)
        codeship._worker = saved


def test_a_worker_keeps_two_versions_of_one_module_apart_and_fetches_each_once(
    tmp_path: Path, worker_code: Any
) -> None:
    packages = {}
    for version in (1, 2):
        pkg = _mod(tmp_path / f"v{version}", "swaplib", f"VERSION = {version}\n")
        p = codeship.build_package({"swaplib": pkg}, 0)
        packages[p.hash] = p.data
    one, two = list(packages)
    worker_code.fetcher = fetcher = _FakeFetcher(packages)

    def version_in(code_hash: str) -> int:
        with codeship.unpickling():
            _, func, args, kwargs = serialize.loads(serialize.dumps_call(
                _import_version, (), {}, 1 << 16, code=codeship.CodeRef(code_hash)))
            return int(func())

    assert [version_in(h) for h in (one, two, one, two, one)] == [1, 2, 1, 2, 1]
    assert fetcher.fetched == [one, two]  # then from the cache
    assert version_in("") == 0  # a task of a driver that ships nothing: no package module left behind


def _import_version() -> int:
    try:
        import swaplib
    except ImportError:
        return 0
    return int(swaplib.VERSION)


def test_a_package_with_a_path_outside_itself_is_refused(tmp_path: Path, worker_code: Any) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../escaped.py", "boom")
        zf.writestr(".distfork-names", '["escaped"]')
    data = buf.getvalue()
    h = hashlib.sha256(data).hexdigest()
    worker_code.fetcher = _FakeFetcher({h: data})
    with pytest.raises(SerializationError, match="outside itself"):
        codeship._activate(h)
    assert not (tmp_path / "escaped.py").exists() and not (tmp_path.parent / "escaped.py").exists()
