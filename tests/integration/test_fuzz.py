"""Hostile bytes on the broker's port: random and mutated messages, junk on raw TCP.

A CLI-started broker with two workers receives well over 10,000 messages
from ZeroMQ DEALER sockets (random frames, truncated valid messages, wrong
version bytes, unknown types, batches whose counts lie, huge counts, bad JSON,
a valid HELLO followed by garbage, an oversized frame) and junk written to
raw TCP connections. It must stay up, count what it dropped, log no handler
crash, and then serve a real driver's fork.

The messages come from a seeded ``random.Random``: a failure names its seed
and is reproduced by running again.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

import distfork
import tasks
from conftest import CliCluster, cli_env, free_port, wait_until
from distfork import config, protocol, security
from distfork.protocol import Entry, Msg, ResultEntry, TaskEntry
from distfork.status import query_status

pytestmark = pytest.mark.timeout(120)

SEED = 20260427
MAX_MESSAGE_BYTES = 1_000_000
N_ANONYMOUS = 9_000  # from peers that never said hello
N_REGISTERED = 2_000  # from peers that did (as driver or as worker), all malformed
N_TCP = 200  # raw TCP connections writing junk

Frames = list[bytes]


@pytest.fixture
def fuzz_cluster(tmp_path: Path) -> Iterator[tuple[CliCluster, Path]]:
    """A CLI broker (its log kept in a file) and two bare workers; yields them and the broker's log."""
    address = f"tcp://127.0.0.1:{free_port()}"
    env = cli_env(DISTFORK_HEARTBEAT_S="0.2", DISTFORK_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES))
    log_path = tmp_path / "broker.log"
    with open(log_path, "wb") as log:
        broker = subprocess.Popen([sys.executable, "-m", "distfork", "broker", "--bind", address], env=env,
                                  stderr=log)
    cluster = CliCluster(address, broker, env=env)
    try:
        cluster.start_worker()
        cluster.start_worker()
        cluster.wait_for_workers(2)
        yield cluster, log_path
    finally:
        cluster.stop()


# -- message generators ------------------------------------------------------------


def valid_messages(rng: random.Random) -> list[Frames]:
    """Well-formed messages of every kind a peer sends (the raw material of mutations)."""
    def entries(n: int) -> list[Entry]:
        return [TaskEntry(rng.getrandbits(64), rng.randrange(256), rng.random(),
                      [rng.randbytes(rng.randrange(40)) for _ in range(rng.randrange(3))],
                      rng.randrange(256), rng.getrandbits(32)) for _ in range(n)]
    msgs: list[list[Any]] = [
        protocol.encode_json(Msg.HELLO, {"role": "worker", "name": "fuzz", "host": "fuzz-host", "pid": 1, "slots": 1}),
        protocol.encode_batch(Msg.SUBMIT, entries(rng.randrange(1, 5))),
        protocol.encode_batch(Msg.RESULTS, entries(rng.randrange(1, 5))),
        protocol.encode_cancel([rng.getrandbits(64) for _ in range(rng.randrange(1, 5))]),
        protocol.encode_cancel([rng.getrandbits(64)], Msg.RECLAIM),
        protocol.encode_json(Msg.KEEPALIVE, {"peers": [rng.randbytes(10).hex()], "pid": 1, "host": "fuzz-host"}),
        protocol.encode_json(Msg.EXITED, {"host": "fuzz-host", "pid": rng.randrange(1, 10**6), "code": -9}),
        protocol.encode_signal(Msg.HEARTBEAT),
    ]
    return [[bytes(f) for f in m] for m in msgs]


BAD_JSON_BODIES = [
    b"", b"{", b"}", b"[1, 2]", b'"a string"', b"null", b"1e400", b"NaN", b"\xff\xfe\x00", b"{\"a\": }",
    b"[" * 50_000, b"{\"a\":" * 20_000, b"{\"role\": 7}", b"{\"role\": \"boss\"}",
    b"{\"role\": \"worker\", \"slots\": \"many\"}", b"{\"role\": \"worker\", \"slots\": -3}",
    b"{\"role\": \"worker\", \"slots\": [1]}", b"{\"role\": \"worker\", \"slots\": 1e400}",
    b"{\"role\": \"worker\", \"slots\": NaN}", b"{\"role\": [\"worker\"]}",
]
BAD_CONTROL_BODIES = [  # KEEPALIVE and EXITED, as JSON objects of the wrong shape
    b"{}", b"{\"peers\": \"abc\"}", b"{\"peers\": [\"zz\"]}", b"{\"peers\": [1, 2]}",
    b"{\"peers\": [], \"bye\": true, \"timed_out\": [\"x\"]}",
    b"{\"peers\": [], \"bye\": true, \"timed_out\": [1e400]}",
    b"{\"peers\": [], \"bye\": true, \"timed_out\": 5}",
    b"{\"host\": \"fuzz-host\", \"pid\": \"x\", \"code\": 1}",
    b"{\"host\": \"fuzz-host\", \"pid\": 1e400, \"code\": 1}",
    b"{\"host\": \"fuzz-host\", \"pid\": 5, \"code\": NaN}", b"{\"host\": \"fuzz-host\"}",
]


def header(kind: int, version: int = protocol.VERSION) -> bytes:
    return bytes([version, kind])


def lying_batch(rng: random.Random, kind: Msg) -> Frames:
    """A batch whose count, entry table or frame count disagree."""
    big = b"x" * (protocol.INLINE_MAX + 1)  # payload frames of their own, not inline in the header
    valid = protocol.encode_batch(kind, [TaskEntry(rng.getrandbits(64), 1, 0.0, [big] * rng.randrange(1, 3))
                                         for _ in range(rng.randrange(1, 4))])
    head, payload = bytes(valid[0]), [bytes(f) for f in valid[1:]]
    (count,) = struct.unpack_from("!I", head, 2)
    how = rng.randrange(5)
    if how == 0:  # the count lies
        head = head[:2] + struct.pack("!I", count + rng.choice([-1, 1, 7])) + head[6:]
    elif how == 1:  # a huge count
        head = head[:2] + struct.pack("!I", rng.choice([2**32 - 1, 2**31, 10**9])) + head[6:]
    elif how == 2:  # the entries name more frames than the message has
        payload = payload[: rng.randrange(len(payload))]
    elif how == 3:  # frames no entry names
        payload = payload + [b"extra"] * rng.randrange(1, 4)
    else:  # the entry table is cut
        head = head[: rng.randrange(2, len(head))]
    return [head, *payload]


def mutate(rng: random.Random, msg: Frames) -> Frames:
    """A valid message, damaged one way."""
    frames = [bytearray(f) for f in msg]
    how = rng.randrange(5)
    if how == 0:  # truncated
        i = rng.randrange(len(frames))
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
        frames = frames[: i + 1]
    elif how == 1 and len(frames[0]) > 2:  # bit flips in the body
        for _ in range(rng.randrange(1, 4)):
            j = rng.randrange(2, len(frames[0]))
            frames[0][j] ^= 1 << rng.randrange(8)
    elif how == 2:  # frames dropped or added
        frames = frames[:1] + [bytearray(rng.randbytes(rng.randrange(20))) for _ in range(rng.randrange(4))]
    elif how == 3:  # random bytes appended
        frames[0] += rng.randbytes(rng.randrange(1, 30))
    else:  # a frame duplicated
        frames.insert(rng.randrange(1, len(frames) + 1), frames[rng.randrange(len(frames))])
    return [bytes(f) for f in frames]


def anonymous_message(rng: random.Random, valid: list[Frames]) -> tuple[Frames, bool]:
    """A message from a peer that never said hello; True if its header alone must make the broker drop it."""
    r = rng.randrange(9)
    if r == 0:  # random frames
        return [rng.randbytes(rng.randrange(60)) for _ in range(rng.randrange(1, 4))], False
    if r == 1:  # too short for a header
        return [rng.randbytes(rng.randrange(2))], True
    if r == 2:  # a valid message with a wrong version byte
        msg = rng.choice(valid)
        v = rng.choice([0, 2, 3, 127, 255])
        return [bytes([v]) + msg[0][1:], *msg[1:]], True
    if r == 3:  # an unknown message type
        known = {m.value for m in Msg}
        t = rng.choice([t for t in range(256) if t not in known])
        extra = [rng.randbytes(5) for _ in range(rng.randrange(2))]
        return [header(t) + rng.randbytes(rng.randrange(30)), *extra], True
    if r == 4:  # bad JSON in a HELLO (never a valid driver hello: nothing may submit work)
        return [header(Msg.HELLO) + rng.choice(BAD_JSON_BODIES)], False
    if r == 5:  # control messages of the wrong shape
        kind = rng.choice([Msg.KEEPALIVE, Msg.EXITED])
        return [header(kind) + rng.choice(BAD_CONTROL_BODIES + BAD_JSON_BODIES)], False
    if r == 6:
        return lying_batch(rng, rng.choice([Msg.SUBMIT, Msg.RESULTS])), False
    return mutate(rng, rng.choice(valid)), False


def registered_garbage(rng: random.Random, role: str) -> Frames:
    """Malformed messages from a peer that said hello as ``role``: every one must be dropped."""
    r = rng.randrange(7)
    if r == 0:
        return lying_batch(rng, Msg.SUBMIT if role == "driver" else Msg.RESULTS)
    if r == 1:  # the other role's batch
        return protocol.encode_batch(Msg.RESULTS if role == "driver" else Msg.SUBMIT, [])
    if r == 2:
        return [header(Msg.CANCEL) + struct.pack("!I", rng.choice([1, 2**32 - 1])) + rng.randbytes(rng.randrange(7))]
    if r == 3:
        return [header(Msg.HELLO) + rng.choice(BAD_JSON_BODIES)]
    if r == 4:
        return [header(rng.choice([0, 2, 99]), version=rng.choice([0, 2])) + rng.randbytes(8)]
    if r == 5:  # a type only the broker sends
        return [header(rng.choice([Msg.WELCOME, Msg.TASKS, Msg.STATUS_REPLY, Msg.REJECT, Msg.DISCARD]))]
    known = {m.value for m in Msg}
    return [header(rng.choice([t for t in range(256) if t not in known]))]


# -- sockets -------------------------------------------------------------------------


def dealer(ctx: zmq.Context[Any], address: str, identity: bytes | None = None, role: str = "client") -> zmq.Socket[Any]:
    """A DEALER with this user's default keys for ``role`` (the cluster is keyed by default): admitted garbage."""
    sock = ctx.socket(zmq.DEALER)
    security.secure_client(sock, security.client_keys(config.load(), address, role=role))
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)  # keep every REJECT the broker answers, so its status reply is not dropped
    sock.setsockopt(zmq.SNDHWM, 0)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.connect(address)
    return sock


def barrier(sock: zmq.Socket[Any], timeout_s: float = 60.0) -> dict[str, Any]:
    """STATUS after everything sent on ``sock``: the broker handled all of it once it answers."""
    sock.send_multipart(protocol.encode_signal(Msg.STATUS))
    while True:
        if not sock.poll(timeout_s * 1000):
            raise AssertionError(f"the broker did not answer STATUS within {timeout_s} s")
        kind, body = protocol.decode(sock.recv_multipart())
        if kind is Msg.STATUS_REPLY:
            return protocol.decode_json(body)


def hello(sock: zmq.Socket[Any], role: str) -> None:
    info = {"role": role, "name": f"fuzz-{role}", "host": "fuzz-host", "pid": 1, "slots": 1}
    sock.send_multipart(protocol.encode_json(Msg.HELLO, info))
    while True:
        assert sock.poll(30_000), "no WELCOME"
        kind, _ = protocol.decode(sock.recv_multipart())
        if kind is Msg.WELCOME:
            return


def tcp_junk(rng: random.Random, port: int) -> None:
    """One raw TCP connection: junk bytes, or a ZMTP greeting that goes wrong."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        r = rng.randrange(4)
        if r == 0:
            data = rng.randbytes(rng.randrange(1, 2000))
        elif r == 1:  # ZMTP signature, then junk
            data = b"\xff" + bytes(8) + b"\x7f" + rng.randbytes(rng.randrange(1, 200))
        elif r == 2:  # a greeting with an unknown mechanism
            data = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"BOGUS".ljust(20, b"\0") + bytes(32)
        else:
            data = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        try:
            s.sendall(data)
        except OSError:
            pass  # the broker may have closed on us already: fine


# -- the test ---------------------------------------------------------------------------


def test_hostile_messages_are_dropped_and_counted_and_the_broker_keeps_serving(
    fuzz_cluster: tuple[CliCluster, Path],
) -> None:
    cluster, log_path = fuzz_cluster
    address = cluster.address
    port = int(address.rsplit(":", 1)[1])
    real_workers = {p.pid for p in cluster.workers}
    rng = random.Random(SEED)
    ctx = zmq.Context()
    sockets: list[zmq.Socket[Any]] = []
    try:
        before = query_status(address)["counters"]
        anonymous = [dealer(ctx, address, b"F" + os.urandom(8)) for _ in range(8)]
        drivers = [dealer(ctx, address, b"G" + os.urandom(8)) for _ in range(2)]
        workers = [dealer(ctx, address, b"H" + os.urandom(8), role="worker") for _ in range(2)]
        sockets += anonymous + drivers + workers
        for s in drivers:
            hello(s, "driver")
        for s in workers:
            hello(s, "worker")

        sent = must_drop = 0
        valid = valid_messages(rng)
        for i in range(N_ANONYMOUS):
            if i % 500 == 0:
                valid = valid_messages(rng)
            msg, dropped = anonymous_message(rng, valid)
            rng.choice(anonymous).send_multipart(msg)
            sent += 1
            must_drop += dropped
        registered = [(s, "driver") for s in drivers] + [(s, "worker") for s in workers]
        for _ in range(N_REGISTERED):
            sock, role = rng.choice(registered)
            sock.send_multipart(registered_garbage(rng, role))
            sent += 1
            must_drop += 1
        # A registered worker's results with run times no worker could report.
        for w in workers:
            for extra in (float("nan"), float("inf"), -1.0):
                bad = ResultEntry(rng.getrandbits(64), 0, extra, [b"x"])
                w.send_multipart(protocol.encode_batch(Msg.RESULTS, [bad]))
                sent += 1
        # One frame over the broker's limit: ZeroMQ drops the connection that sent it.
        big = dealer(ctx, address)
        sockets.append(big)
        big.send_multipart([header(Msg.SUBMIT) + bytes(MAX_MESSAGE_BYTES + 1)])

        for _ in range(N_TCP):
            tcp_junk(rng, port)

        statuses = [barrier(s) for s in sockets if s is not big]
        after = statuses[-1]["counters"]
        assert sent >= 10_000
        dropped = after.get("messages_dropped", 0) - before.get("messages_dropped", 0)
        unknown = after.get("unknown_peer_messages", 0) - before.get("unknown_peer_messages", 0)
        assert dropped >= must_drop, (dropped, must_drop)
        assert dropped + unknown >= must_drop + N_ANONYMOUS // 3
        assert cluster.broker.poll() is None, "the broker died"

        # A real driver, while the hostile peers are still registered (those posing as
        # workers take tasks and never answer: they expire and their tasks run elsewhere).
        distfork.init(address, heartbeat_s=0.2)
        futs = [distfork.fork(tasks.add, i, 1) for i in range(20)]
        assert distfork.wait_all(futs, timeout=30) == list(range(1, 21))
        distfork.shutdown()

        for s in sockets:
            s.send_multipart(protocol.encode_signal(Msg.BYE))
        barrier(anonymous[0])
    finally:
        for s in sockets:
            s.close(linger=0)
        ctx.term()

    assert cluster.broker.poll() is None, "the broker died"
    # The hostile peers are gone (said goodbye, or expired); the real workers are still registered.
    wait_until(lambda: {w["pid"] for w in query_status(address)["workers"]} == real_workers, 20,
               what="only the real workers to be registered")
    distfork.init(address, heartbeat_s=0.2)
    assert distfork.wait(distfork.fork(tasks.add, 40, 2), timeout=30) == 42
    distfork.shutdown()

    log = log_path.read_text(errors="replace")
    assert "broke its handler" not in log and "Traceback" not in log, log[-5000:]
