"""distfork/sharecache.py without a cluster: the broker's relay, and one copy per host."""

from __future__ import annotations

import collections
import hashlib
import os
import threading
from typing import Any

import pytest

from distfork import protocol, sharecache, shm
from distfork.errors import ProtocolError
from distfork.protocol import Msg

pytestmark = pytest.mark.timeout(30)

KEY = "ab" * 16
DRIVER = b"D" + bytes(8)
WORKER = b"\x00fetcher"


def body(frames: list[Any]) -> memoryview:
    return protocol.decode(frames)[1]


def test_the_relay_asks_the_driver_named_and_forwards_only_the_answer_to_that_fetch() -> None:
    counters: collections.Counter[str] = collections.Counter()
    relay = sharecache.Relay(counters)
    ask = protocol.encode_share_get(KEY, DRIVER.hex())
    to, out = relay.get(WORKER, body(ask), lambda peer: peer == DRIVER)
    assert to == DRIVER and protocol.decode_share_get(body(out)) == (KEY, DRIVER.hex(), WORKER.hex())
    data = [b"x" * 10, b"y" * 5]
    answer = protocol.encode_share(KEY, WORKER.hex(), data, "cd" * 32, 15)
    with pytest.raises(ProtocolError):  # another driver cannot answer it
        relay.reply(b"D" + bytes([1] * 8), answer, body(answer))
    to, out = relay.reply(DRIVER, answer, body(answer))
    assert to == WORKER and out[1:] == data
    share = protocol.decode_share(out, body(out))
    assert (share.key, share.sha256, share.size) == (KEY, "cd" * 32, 15)
    assert counters == {"share_fetches": 1, "share_bytes": 15}
    with pytest.raises(ProtocolError):  # answered already: a second answer goes nowhere
        relay.reply(DRIVER, answer, body(answer))
    # A driver that is gone: the asker hears so at once.
    to, out = relay.get(WORKER, body(ask), lambda peer: False)
    assert to == WORKER and protocol.decode_share(out, body(out)).data is None
    # The driver leaves: every worker process is told to drop what it served.
    drops = relay.gone(lambda peer: False, lambda: [b"C1", b"C2"])
    assert [(c, protocol.decode_share_drop(body(f))) for c, f in drops] == [(b"C1", [KEY]), (b"C2", [KEY])]
    assert relay.gone(lambda peer: False, lambda: [b"C1"]) == []


def test_malformed_share_messages_are_refused() -> None:
    for raw in ({"key": "../x", "driver": "00"}, {"key": KEY}, {"key": KEY, "driver": "zz"}):
        with pytest.raises(ProtocolError):
            protocol.decode_share_get(body(protocol.encode_json(Msg.SHARE_GET, raw)))
    with pytest.raises(ProtocolError):
        protocol.decode_share_drop(body(protocol.encode_json(Msg.SHARE_DROP, {"keys": ["not hex"]})))


def test_processes_of_one_host_fetch_a_value_once_and_a_drop_removes_the_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    if shm.domain() is None:
        pytest.skip("no /dev/shm")
    size = 3 * 1024 * 1024 + 5
    payload = os.urandom(size)
    fetched: list[str] = []
    gate = threading.Barrier(4)

    def fake_fetch(key: str, driver: str, n: int, into: memoryview) -> None:
        fetched.append(key)
        into[:n] = payload
        assert hashlib.sha256(into[:n]).digest() == hashlib.sha256(payload).digest()

    monkeypatch.setattr(sharecache, "_fetch", fake_fetch)
    sharecache.configure_worker("tcp://127.0.0.1:1", None, True, 5.0)
    session = "5eed5eed"
    got: list[tuple[str | None, bytes]] = []

    def lookup() -> None:
        gate.wait()
        name, view = sharecache.host_copy(session, KEY, size, DRIVER.hex())
        got.append((name, bytes(view[:size])))
        view.release()

    threads = [threading.Thread(target=lookup) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    try:
        assert fetched == [KEY]  # one fetch for the host, whoever asked first
        assert len({name for name, _ in got}) == 1 and all(data == payload for _, data in got)
        (name,) = {name for name, _ in got}
        assert name is not None and name.endswith(KEY[:16]) and os.path.exists(f"/dev/shm/{name}")
    finally:
        sharecache.dropped([KEY])
        sharecache.configure_worker("", None, False, 30.0)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"df-{session}-")]
