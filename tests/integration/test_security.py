"""Issue 5: a keyed cluster lets in only admitted keys, encrypts its traffic, and starts closed.

::

    keys.admitted   `distfork keygen`: the cluster's broker, worker and client pairs, allowed/{clients,workers}/
    keys.foreign    another keygen: its broker key is the wrong one for our cluster
    keys.unknown    our broker's public key + foreign's client pair: a key ours does not admit

    python -m distfork --keys-dir K broker --bind tcp://127.0.0.1:PORT     (CLI processes, as users run them)
    python -m distfork --keys-dir K worker --connect ... --no-nanny
    drivers: distfork.init(address, keys_dir=...) in this process, or raw peers
             (pyzmq DEALERs, a hand-written ZMTP peer, plain TCP sockets)

"No keys" means none at all (DISTFORK_DEFAULT_KEYS=0: not the user's default
credentials either). Keys reach our own driver through ``init(keys_dir=...)`` and the processes we
start through their command line or environment: never this process's
environment, which other tests share. The encryption test runs a whole
cluster inside a network namespace of its own and captures its loopback
with an AF_PACKET socket; it is skipped when we cannot make one (not root).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

import distfork
import tasks
from conftest import free_port, wait_until
from distfork import protocol, security, serialize
from distfork.config import Config
from distfork.protocol import Msg, TaskEntry

from .secsupport import (
    PY,
    SNIFFER,
    KeySet,
    Netns,
    Procs,
    ZmtpPeer,
    client_dir,
    closed_within,
    keygen,
    make_keys,
    netns_unavailable,
    query,
    run_cli,
    wait_ready,
)

pytestmark = pytest.mark.timeout(120)

REFUSED = "refused our key: our public key is not in its allow-list"
WRONG_BROKER_KEY = "the broker's public key we were given is wrong"
ONE_SIDED = "one side uses keys and the other does not"
HEARTBEAT_S = 0.2  # every role's, as in the processes we start (secsupport.Procs)
NS_ADDRESS = "10.213.7.1"  # given to the namespace's loopback: not a loopback address, reachable only inside


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def maybe_netns() -> Iterator[Netns | str]:
    """A namespace of our own (only a loopback, plus NS_ADDRESS on it), or why there is none."""
    reason = netns_unavailable()
    if reason is not None:
        yield reason
        return
    ns = Netns()
    try:
        ns.run("ip", "addr", "add", f"{NS_ADDRESS}/32", "dev", "lo")
        yield ns
    finally:
        ns.delete()


@pytest.fixture
def netns(maybe_netns: Netns | str) -> Netns:
    if isinstance(maybe_netns, str):
        pytest.skip(maybe_netns)
    return maybe_netns


@pytest.fixture
def wide_open(maybe_netns: Netns | str) -> tuple[str, ...]:
    """Where a test may bind every interface: inside our namespace (only a loopback there) if we have one."""
    return maybe_netns.prefix if isinstance(maybe_netns, Netns) else ()


def start_broker(procs: Procs, keys_dir: Path | None, *args: str, **env: str) -> tuple[str, subprocess.Popen[bytes]]:
    address = f"tcp://127.0.0.1:{free_port()}"
    return address, procs.distfork("broker", "--bind", address, *args, keys=keys_dir, **env)


def start_worker(procs: Procs, address: str, keys_dir: Path | None, *args: str, **env: str) -> subprocess.Popen[bytes]:
    return procs.distfork("worker", "--connect", address, *args, keys=keys_dir, **env)


@dataclass
class Cluster:
    address: str
    broker: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]


@pytest.fixture
def keyed(procs: Procs, keys: KeySet) -> Cluster:
    """A keyed CLI broker and one keyed worker, registered."""
    address, broker = start_broker(procs, keys.admitted)
    worker = start_worker(procs, address, keys.admitted, "--no-nanny")
    wait_ready(address, keys.admitted, workers=1)
    return Cluster(address, broker, worker)


def connect(address: str, keys_dir: Path | None, **config: Any) -> None:
    """``distfork.init`` for this process's driver: ``keys_dir``'s keys (None: none), our heartbeat."""
    distfork.init(address, keys_dir=str(keys_dir or ""), heartbeat_s=HEARTBEAT_S,
                  **({"default_keys": False} if keys_dir is None else {}), **config)


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    return host, int(port)


def attack(address: str, keys_dir: Path | None, path: Path, name: str) -> str:
    """Say hello as a driver and submit ``tasks.touch(path)`` at once, with ``keys_dir``'s keys (None: none).

    Returns "ran" once the task's result came back, else where it stopped (the handshake failure).
    """
    keys = security.client_keys(Config.from_env({}, keys_dir=str(keys_dir))) if keys_dir is not None else None
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"D" + os.urandom(8))
    security.secure_client(sock, keys)
    monitor = security.watch_handshake(sock)
    try:
        sock.connect(address)
        hello = {"role": "driver", "name": name, "host": socket.gethostname(), "pid": os.getpid(), "shm_domain": None}
        call, _ = serialize.route(serialize.dumps_call(tasks.touch, (str(path),), {}, 64 * 1024), None)
        # Queued before the handshake even started: sent the moment the broker would take it.
        sock.send_multipart(protocol.encode_json(Msg.HELLO, hello), zmq.NOBLOCK)
        sock.send_multipart(protocol.encode_batch(Msg.SUBMIT, [TaskEntry(1, protocol.DEFAULT_RETRIES, 0.0, call)]),
                            zmq.NOBLOCK)
        if not monitor.poll(10_000):
            return "no handshake outcome within 10 s"
        event = recv_monitor_message(monitor)["event"]
        if event != zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return zmq.Event(event).name
        deadline = last_beat = time.monotonic()
        deadline += 30
        while time.monotonic() < deadline:
            if time.monotonic() - last_beat >= HEARTBEAT_S:
                sock.send_multipart(protocol.encode_signal(Msg.HEARTBEAT), zmq.NOBLOCK)  # stay registered
                last_beat = time.monotonic()
            if sock.poll(HEARTBEAT_S * 1000) and protocol.decode(sock.recv_multipart())[0] is Msg.RESULTS:
                return "ran"
        return "admitted, but no result within 30 s"
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        ctx.term()


# -- who gets in ------------------------------------------------------------------------


@pytest.mark.parametrize(("key_set", "error", "says"), [
    pytest.param("unknown", distfork.AuthenticationError, [REFUSED, "SIGHUP the broker"], id="unknown-client-key"),
    pytest.param("foreign", distfork.AuthenticationError, [WRONG_BROKER_KEY, "DISTFORK_KEYS_DIR"],
                 id="wrong-broker-key"),
    pytest.param(None, distfork.BrokerUnavailableError,
                 ["no distfork broker answered", "if that broker uses keys", "keys_dir"], id="no-keys"),
])
def test_driver_without_an_admitted_key_is_refused_and_its_task_never_runs(
    keyed: Cluster, keys: KeySet, tmp_path: Path, key_set: str | None, error: type[Exception], says: list[str],
) -> None:
    keys_dir = getattr(keys, key_set) if key_set is not None else None
    connect_timeout_s = 10.0 if keys_dir is not None else 2.0
    started = time.monotonic()
    with pytest.raises(error) as refused:
        connect(keyed.address, keys_dir, connect_timeout_s=connect_timeout_s)
    elapsed_s = time.monotonic() - started
    for text in says:
        assert text in str(refused.value)
    if keys_dir is not None:
        assert elapsed_s < 3.0, f"the refusal took {elapsed_s:.1f} s (connect_timeout_s {connect_timeout_s:g})"
    else:  # no monitor without keys: the broker's silence, then an error that names keys
        assert connect_timeout_s <= elapsed_s < connect_timeout_s + 3.0, elapsed_s

    # The same keys, trying harder: hello and a task that would create a file, sent without waiting.
    forbidden = tmp_path / "forbidden"
    outcome = attack(keyed.address, keys_dir, forbidden, name="attacker-refused")
    assert outcome.startswith("HANDSHAKE_FAILED"), outcome

    # The same attack with an admitted key does run (the attack works), and so does a real driver's fork.
    control = tmp_path / "control"
    assert attack(keyed.address, keys.admitted, control, name="attacker-admitted") == "ran"
    assert control.exists()
    connect(keyed.address, keys.admitted)
    real = tmp_path / "real"
    assert distfork.wait(distfork.fork(tasks.touch, str(real)), timeout=30) == keyed.worker.pid
    # One worker, first come first served: a task that got in before these would have run by now.
    assert not forbidden.exists(), "a task from a peer without an admitted key ran"
    counters = query(keyed.address, keys.admitted)["counters"]
    assert counters.get("tasks_submitted") == 2, counters  # the control's and the real driver's: nothing else
    assert counters.get("unknown_peer_messages", 0) == 0, counters  # not even a message of the refused peer


def test_workers_without_an_admitted_key_exit_78_unregistered_and_run_no_task(
    procs: Procs, keys: KeySet, tmp_path: Path,
) -> None:
    address, _ = start_broker(procs, keys.admitted)
    wait_ready(address, keys.admitted)
    connect(address, keys.admitted)
    ran = tmp_path / "ran"
    fut = distfork.fork(tasks.touch, str(ran))  # queued: no worker yet

    expected = {"unknown": REFUSED, "foreign": WRONG_BROKER_KEY, "none": ONE_SIDED}
    workers = {label: start_worker(procs, address, getattr(keys, label, None), "--no-nanny") for label in expected}
    for label, p in workers.items():
        try:
            code = p.wait(20)
        except subprocess.TimeoutExpired:
            code = None
        assert code == security.EXIT_REFUSED, f"{label} worker: exit {code}, log:\n{procs.stderr(p)}"
        assert expected[label] in procs.stderr(p), procs.stderr(p)

    snap = query(address, keys.admitted)
    assert snap["workers"] == [], snap["workers"]
    assert snap["queued"] == 1 and not ran.exists(), "a worker without an admitted key was handed the task"

    # An admitted worker takes the very same task.
    good = start_worker(procs, address, keys.admitted, "--no-nanny")
    assert distfork.wait(fut, timeout=30) == good.pid
    assert ran.exists()


def test_nanny_whose_workers_are_all_refused_exits_nonzero_without_restarting_them(
    procs: Procs, keys: KeySet,
) -> None:
    address, _ = start_broker(procs, keys.admitted)
    wait_ready(address, keys.admitted)
    nanny = start_worker(procs, address, keys.unknown, "--processes", "2")  # the nanny is the default
    try:
        code = nanny.wait(30)
    except subprocess.TimeoutExpired:
        code = None
    log = procs.stderr(nanny)
    assert code not in (None, 0), f"the nanny: exit {code}, log:\n{log}"
    assert "the broker refused our key" in log
    refused = set(re.findall(r"worker pid (\d+) was refused by the broker", log))
    assert len(refused) == 2, log  # each of its two workers once ...
    assert "starting another" not in log, log  # ... and none replaced
    assert log.count(REFUSED) == 2, log
    assert query(address, keys.admitted)["workers"] == []


# -- a keyed cluster at work ------------------------------------------------------------------


@pytest.mark.parametrize("shm", [True, False], ids=["shared-memory", "frames"])
def test_keyed_cluster_runs_forks_on_both_data_paths(procs: Procs, keys: KeySet, shm: bool) -> None:
    address, _ = start_broker(procs, keys.admitted)
    worker = start_worker(procs, address, keys.admitted, "--no-nanny", DISTFORK_SHM="1" if shm else "0")
    wait_ready(address, keys.admitted, workers=1)
    connect(address, keys.admitted, shm=shm)

    assert distfork.wait_all([distfork.fork(tasks.add, i, 1) for i in range(20)], timeout=30) == list(range(1, 21))
    big = np.arange(1_000_000, dtype=np.float64)  # 8 MB out and 8 MB back
    got = distfork.wait(distfork.fork(tasks.describe_data, big), timeout=30)
    assert got["sha256"] == hashlib.sha256(big.tobytes()).hexdigest()
    assert str(got["backing"]).startswith("/dev/shm/") == shm, got["backing"]
    back = distfork.wait(distfork.fork(tasks.ones, 1_000_000), timeout=30)
    assert back.shape == (1_000_000,) and float(back.sum()) == 1_000_000.0

    moved = query(address, keys.admitted)["metrics"]["payload_bytes"]
    path, other = ("shm", "frames") if shm else ("frames", "shm")
    assert moved["task"][path] >= big.nbytes and moved["result"][path] >= big.nbytes, moved
    assert moved["task"][other] == 0 and moved["result"][other] == 0, moved
    distfork.shutdown()
    # A keyed worker stops on SIGTERM (its handshake monitor once kept ctx.term() waiting forever).
    assert procs.stop(worker, timeout_s=10) == 0, procs.stderr(worker)


def test_status_answers_admitted_keys_only(keyed: Cluster, keys: KeySet) -> None:
    ok = run_cli("status", "--address", keyed.address, "--json", keys=keys.admitted)
    assert ok.returncode == 0, ok.stderr
    assert [w["pid"] for w in json.loads(ok.stdout)["workers"]] == [keyed.worker.pid]

    none = run_cli("status", "--address", keyed.address, "--timeout", "2")
    assert none.returncode == 1 and "no distfork broker answered" in none.stderr and "--keys-dir" in none.stderr, none
    unknown = run_cli("status", "--address", keyed.address, keys=keys.unknown)
    assert unknown.returncode == 1 and REFUSED in unknown.stderr, unknown
    foreign = run_cli("status", "--address", keyed.address, keys=keys.foreign)
    assert foreign.returncode == 1 and WRONG_BROKER_KEY in foreign.stderr, foreign


def test_sighup_reloads_the_allow_list(procs: Procs, keys: KeySet, tmp_path: Path) -> None:
    allow = tmp_path / "allowed"
    shutil.copytree(keys.admitted / "allowed", allow)
    newcomer = client_dir(tmp_path / "newcomer", keys.admitted, keygen(tmp_path / "new-pair"))
    address = f"tcp://127.0.0.1:{free_port()}"
    broker = procs.distfork("--curve-secret-file", str(keys.admitted / "broker.key_secret"),
                            "--curve-allow-dir", str(allow), "broker", "--bind", address)
    start_worker(procs, address, keys.admitted, "--no-nanny")
    wait_ready(address, keys.admitted, workers=1)

    def newcomer_admitted(stay: bool = False) -> bool:
        try:
            connect(address, newcomer)
        except distfork.AuthenticationError as exc:
            # Refused at the handshake, or, when the key was revoked while its handshake was under
            # way (admitted by the old list), at its HELLO by the new one.
            assert REFUSED in str(exc) or "our key is admitted as no role" in str(exc), exc
            return False
        if not stay:
            distfork.shutdown()
        return True

    assert not newcomer_admitted()
    shutil.copy(newcomer / "client.key", allow / "clients" / "newcomer.key")
    assert not newcomer_admitted(), "admitted before SIGHUP: the allow-list is read at start and on SIGHUP"
    broker.send_signal(signal.SIGHUP)
    wait_until(lambda: newcomer_admitted(stay=True), 10, what="the newcomer's key to be admitted after SIGHUP")
    assert distfork.wait(distfork.fork(tasks.add, 20, 22), timeout=30) == 42
    distfork.shutdown()

    (allow / "clients" / "newcomer.key").unlink()  # revoked: new connections are refused again
    broker.send_signal(signal.SIGHUP)
    wait_until(lambda: not newcomer_admitted(), 10, what="the newcomer's key to be refused after SIGHUP")
    connect(address, keys.admitted)
    assert distfork.wait(distfork.fork(tasks.add, 1, 1), timeout=30) == 2
    assert broker.poll() is None


def test_a_driver_whose_key_is_revoked_while_connected_fails_its_futures_with_authentication_error(
    procs: Procs, keys: KeySet, tmp_path: Path
) -> None:
    allow = tmp_path / "allowed"
    shutil.copytree(keys.admitted / "allowed", allow)
    newcomer = client_dir(tmp_path / "newcomer", keys.admitted, keygen(tmp_path / "new-pair"))
    shutil.copy(newcomer / "client.key", allow / "clients" / "newcomer.key")
    address = f"tcp://127.0.0.1:{free_port()}"
    broker_args = ("--curve-secret-file", str(keys.admitted / "broker.key_secret"), "--curve-allow-dir", str(allow),
                   "broker", "--bind", address)
    broker = procs.distfork(*broker_args)
    start_worker(procs, address, keys.admitted, "--no-nanny")
    wait_ready(address, keys.admitted, workers=1)
    connect(address, newcomer)
    gate = tmp_path / "gate"
    pending = distfork.fork(tasks.wait_for_path, str(gate))
    try:
        (allow / "clients" / "newcomer.key").unlink()  # revoked, and the broker restarts: our reconnect is refused
        broker.send_signal(signal.SIGKILL)
        broker.wait(10)
        procs.distfork(*broker_args)
        with pytest.raises(distfork.AuthenticationError, match=REFUSED):
            distfork.wait(pending, timeout=30)
        with pytest.raises(distfork.AuthenticationError, match=REFUSED):
            distfork.fork(tasks.add, 1, 1)
    finally:
        gate.touch()
        distfork.shutdown()


# -- encryption on the wire ----------------------------------------------------------------------

CAPTURED_DRIVER = """
import os
import distfork, tasks

small, mark = os.environ["MARK_SMALL"], os.environ["MARK_BIG"].encode()
big = bytearray(mark * (200_000 // len(mark) + 1))  # > 64 KiB: its own frame (shared memory is off)
arg = {"small": [f"{small}-{i}" for i in range(64)], "big": big}
distfork.init(os.environ["ADDRESS"])
back = distfork.wait(distfork.fork(tasks.identity, arg), timeout=60)
assert back == arg, "the result differs from the argument"
distfork.shutdown()
print("ok", len(big), flush=True)
"""


@pytest.mark.parametrize("keyed_run", [True, False], ids=["keyed-encrypted", "unkeyed-control"])
def test_traffic_of_a_keyed_cluster_is_encrypted(
    procs: Procs, keys: KeySet, netns: Netns, tmp_path: Path, keyed_run: bool,
) -> None:
    marks = {"MARK_SMALL": f"df-small-secret-{os.urandom(8).hex()}", "MARK_BIG": f"df-big-secret-{os.urandom(8).hex()}"}
    address = f"tcp://127.0.0.1:{17000 + (1 if keyed_run else 2)}"  # our own namespace: every port is free
    env = {"DISTFORK_SHM": "0", "ADDRESS": address, **marks}
    if keyed_run:
        env["DISTFORK_KEYS_DIR"] = str(keys.admitted)
    capture = tmp_path / "capture.bin"
    sniffer = procs.start(PY, "-c", SNIFFER, str(capture), prefix=netns.prefix)
    wait_until(lambda: "ready" in procs.stdout(sniffer) or sniffer.poll() is not None, 20, what="the sniffer")
    assert sniffer.poll() is None, procs.stderr(sniffer)

    broker = procs.distfork("broker", "--bind", address, prefix=netns.prefix, **env)
    worker = procs.distfork("worker", "--connect", address, "--no-nanny", prefix=netns.prefix, **env)
    script = tmp_path / "driver.py"
    script.write_text(CAPTURED_DRIVER)
    driver = procs.start(PY, str(script), prefix=netns.prefix, **env)
    assert driver.wait(90) == 0, procs.stderr(driver)
    assert procs.stdout(driver).startswith("ok"), procs.stdout(driver)
    for p in (worker, broker):
        assert procs.stop(p) == 0, procs.stderr(p)
    assert procs.stop(sniffer) == 0, procs.stderr(sniffer)

    wire = capture.read_bytes()
    assert len(wire) > 2 * 200_000, f"captured only {len(wire)} bytes of TCP payload"  # it saw the traffic
    seen = {name: mark.encode() in wire for name, mark in marks.items()}
    if keyed_run:
        assert seen == {"MARK_SMALL": False, "MARK_BIG": False}, "a marker crossed the wire in clear"
    else:  # the same capture without keys shows both: the check above can fail
        assert seen == {"MARK_SMALL": True, "MARK_BIG": True}, seen


# -- closed by default ------------------------------------------------------------------------------


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:{port}", "tcp://*:{port}", "tcp://[::]:{port}", "namespace"])
def test_refuses_to_bind_beyond_loopback_without_keys(maybe_netns: Netns | str, bind: str) -> None:
    prefix: tuple[str, ...] = ()
    if bind == "namespace":  # an address that is really there, on an interface of our namespace
        if isinstance(maybe_netns, str):
            pytest.skip(maybe_netns)
        prefix, bind = maybe_netns.prefix, f"tcp://{NS_ADDRESS}:{{port}}"
    address = bind.format(port=free_port())
    done = run_cli("broker", "--bind", address, prefix=prefix, DISTFORK_DEFAULT_KEYS="0")  # no keys at all
    assert done.returncode != 0, done
    assert f"refusing to bind {address} without keys" in done.stderr, done.stderr
    assert "distfork keygen" in done.stderr and "--insecure" in done.stderr, done.stderr


def _served(address: str, prefix: tuple[str, ...], keys_dir: Path | None) -> bool:
    return run_cli("status", "--address", address, "--timeout", "1", keys=keys_dir, prefix=prefix).returncode == 0


def test_insecure_binds_every_interface_and_warns_loudly(procs: Procs, wide_open: tuple[str, ...]) -> None:
    port = free_port()
    broker = procs.distfork("broker", "--bind", f"tcp://0.0.0.0:{port}", "--insecure", prefix=wide_open)
    wait_until(lambda: _served(f"tcp://127.0.0.1:{port}", wide_open, None) or broker.poll() is not None, 30,
               what="the insecure broker to serve")
    assert broker.poll() is None, procs.stderr(broker)
    log = procs.stderr(broker)
    assert "WARNING" in log and "INSECURE: broker bound to tcp://0.0.0.0" in log, log
    assert "anyone who can reach it can run code on the workers" in log, log


@pytest.mark.parametrize("where", ["every-interface", "namespace-address"])
def test_keys_allow_binding_beyond_loopback(
    procs: Procs, keys: KeySet, maybe_netns: Netns | str, wide_open: tuple[str, ...], where: str,
) -> None:
    port = free_port()
    if where == "namespace-address":
        if isinstance(maybe_netns, str):
            pytest.skip(maybe_netns)
        bind = reach = f"tcp://{NS_ADDRESS}:{port}"
    else:
        bind, reach = f"tcp://0.0.0.0:{port}", f"tcp://127.0.0.1:{port}"
    broker = procs.distfork("broker", "--bind", bind, keys=keys.admitted, prefix=wide_open)
    wait_until(lambda: _served(reach, wide_open, keys.admitted) or broker.poll() is not None, 30,
               what="the keyed broker to serve")
    assert broker.poll() is None, procs.stderr(broker)
    assert "INSECURE" not in procs.stderr(broker)
    assert not _served(reach, wide_open, None), "a broker with keys answered a client without"


# -- limits an unauthenticated peer cannot get around ----------------------------------------------


def test_peers_that_never_finish_their_handshake_are_dropped(procs: Procs, keys: KeySet) -> None:
    address, broker = start_broker(procs, keys.admitted, DISTFORK_HANDSHAKE_S="1")
    start_worker(procs, address, keys.admitted, "--no-nanny")
    wait_ready(address, keys.admitted, workers=1)
    host, port = host_port(address)

    peers = [socket.create_connection((host, port), timeout=5) for _ in range(20)]  # silent
    peers.append(socket.create_connection((host, port), timeout=5))
    peers[-1].sendall(b"GET / HTTP/1.1\r\nHost: distfork\r\n\r\n")  # junk
    opened = time.monotonic()
    dropped_after: dict[int, float | None] = {}

    def watch(i: int, s: socket.socket) -> None:
        closed = closed_within(s, 15)
        dropped_after[i] = None if closed is None else time.monotonic() - opened

    watchers = [threading.Thread(target=watch, args=(i, s), daemon=True) for i, s in enumerate(peers)]
    for t in watchers:
        t.start()
    try:
        # Meanwhile an admitted driver is let in and served.
        connect(address, keys.admitted)
        assert distfork.wait(distfork.fork(tasks.add, 2, 3), timeout=30) == 5
        for t in watchers:
            t.join(20)
    finally:
        for s in peers:
            s.close()
    times = [dropped_after.get(i) for i in range(len(peers))]
    assert None not in times, f"peers still connected after 15 s: {times}"
    assert max(times) < 1.0 + 2.5, times  # type: ignore[type-var]  # handshake_s = 1 (the default: 5)
    assert min(times[:-1]) > 0.5, times  # type: ignore[type-var]  # silent peers: by the timer, not at once
    assert distfork.wait(distfork.fork(tasks.add, 3, 4), timeout=30) == 7
    assert broker.poll() is None


def test_frame_over_max_message_bytes_drops_the_connection(procs: Procs) -> None:
    address, broker = start_broker(procs, None, DISTFORK_MAX_MESSAGE_BYTES="100000")
    wait_ready(address, None)
    host, port = host_port(address)

    def status_over(peer: ZmtpPeer) -> None:
        peer.send(protocol.encode_signal(Msg.STATUS))
        kind, _ = protocol.decode(peer.recv())
        assert kind is Msg.STATUS_REPLY

    with ZmtpPeer(host, port) as peer:
        peer.handshake()
        status_over(peer)  # our hand-written ZMTP is understood
        peer.send([b"\0" * 99_000])  # under the limit: a bad message, dropped; the connection stays
        status_over(peer)
        peer.send_oversized_header(200_000)
        assert closed_within(peer.sock, 5) is not None, "a frame over max_message_bytes did not drop the connection"

    assert broker.poll() is None
    with ZmtpPeer(host, port) as again:  # the broker goes on serving
        again.handshake()
        status_over(again)
    assert query(address, None)["uptime_s"] > 0
