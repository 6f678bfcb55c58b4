"""Helpers for tests/integration/test_security.py: keys, CLI processes, a raw ZMTP peer, a netns sniffer.

::

    KeySet (two ``distfork keygen`` runs)
      admitted/   the cluster's keys: broker, worker and client pairs, allowed/{clients,workers}/
      foreign/    another cluster's keys: its broker key is the wrong one for ours
      unknown/    our broker's public key + foreign's client pair: a key ours does not admit

    Procs         every process a test starts (CLI roles, sniffer, driver scripts),
                  stdout/stderr to files; stop_all() SIGTERMs, then SIGKILLs, only those pids
    ZmtpPeer      ZMTP 3.0 by hand over a plain TCP socket (NULL mechanism, as a DEALER)
    Netns         a network namespace with only a loopback, ``ip netns exec`` prefix (tests/deploy/netns.py)
    SNIFFER       an AF_PACKET raw-socket capture of a namespace's loopback (TCP payloads)
"""

from __future__ import annotations

import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import cli_env, stop_processes, wait_until
from deploy.netns import Namespace, unavailable
from distfork.status import query_status

PY = sys.executable


# -- keys -------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySet:
    admitted: Path
    foreign: Path
    unknown: Path


def keygen(directory: Path) -> Path:
    """``distfork keygen DIRECTORY`` through the CLI, as a user would run it."""
    done = subprocess.run([PY, "-m", "distfork", "keygen", str(directory)], env=cli_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return directory


def client_dir(directory: Path, broker_from: Path, client_from: Path) -> Path:
    """A keys dir with ``broker_from``'s broker public key and ``client_from``'s client pair."""
    directory.mkdir()
    shutil.copy(broker_from / "broker.key", directory / "broker.key")
    for name in ("client.key", "client.key_secret"):
        shutil.copy(client_from / name, directory / name)
    return directory


def make_keys(root: Path) -> KeySet:
    admitted = keygen(root / "admitted")
    foreign = keygen(root / "foreign")
    return KeySet(admitted, foreign, client_dir(root / "unknown", admitted, foreign))


def query(address: str, keys_dir: Path | None, timeout_s: float = 5.0) -> dict[str, Any]:
    """``query_status`` with our keys: DISTFORK_KEYS_DIR set only for the call, then restored."""
    with pytest.MonkeyPatch.context() as mp:
        if keys_dir is None:
            mp.delenv("DISTFORK_KEYS_DIR", raising=False)
            mp.setenv("DISTFORK_DEFAULT_KEYS", "0")
        else:
            mp.setenv("DISTFORK_KEYS_DIR", str(keys_dir))
        return query_status(address, timeout_s)


def wait_ready(address: str, keys_dir: Path | None, workers: int = 0, timeout_s: float = 20.0) -> dict[str, Any]:
    """Poll the broker until it answers (and ``workers`` workers are registered); return its status."""

    def ready() -> dict[str, Any] | None:
        try:
            snap = query(address, keys_dir, timeout_s=0.5)
        except TimeoutError:
            return None
        return snap if len(snap["workers"]) >= workers else None

    return wait_until(ready, timeout_s, what=f"the broker at {address} with {workers} workers")  # type: ignore[no-any-return]


# -- processes -----------------------------------------------------------------------


@dataclass
class Procs:
    """The processes of one test, each with its output in files under ``logs``."""

    logs: Path
    env: dict[str, str] = field(default_factory=lambda: cli_env(DISTFORK_HEARTBEAT_S="0.2"))
    started: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def start(self, *cmd: str, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None,
              **env_extra: str) -> subprocess.Popen[bytes]:
        run_env = {**(self.env if env is None else env), **env_extra}
        if "DISTFORK_KEYS_DIR" not in env_extra:
            run_env.pop("DISTFORK_KEYS_DIR", None)  # keys only where a test gives them
        if "--keys-dir" not in cmd and not any(k.startswith("DISTFORK_CURVE") for k in env_extra) \
                and not any(a.startswith("--curve") for a in cmd):
            run_env.setdefault("DISTFORK_DEFAULT_KEYS", "0")  # no keys: not the user's default ones either
        log = self.logs / f"p{len(self.started)}.log"
        with open(log, "wb") as err, open(log.with_suffix(".out"), "wb") as out:
            p = subprocess.Popen([*prefix, *cmd], env=run_env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.started.append((p, log))
        return p

    def distfork(self, *args: str, keys: Path | None = None, prefix: tuple[str, ...] = (),
                 **env_extra: str) -> subprocess.Popen[bytes]:
        """``python -m distfork [--keys-dir KEYS] ARGS``."""
        key_args = ("--keys-dir", str(keys)) if keys is not None else ()
        return self.start(PY, "-m", "distfork", *key_args, *args, prefix=prefix, **env_extra)

    def stderr(self, p: subprocess.Popen[bytes]) -> str:
        return next(log for q, log in self.started if q is p).read_text(errors="replace")

    def stdout(self, p: subprocess.Popen[bytes]) -> str:
        return next(log for q, log in self.started if q is p).with_suffix(".out").read_text(errors="replace")

    def stop(self, p: subprocess.Popen[bytes], timeout_s: float = 15.0) -> int | None:
        """SIGTERM ``p`` and wait; SIGKILL it if it does not stop. Its exit code, or None if it had to be killed."""
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            return p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            return None

    def stop_all(self) -> None:
        stop_processes(p for p, _ in reversed(self.started))  # drivers and workers before their broker


def run_cli(*args: str, keys: Path | None = None, prefix: tuple[str, ...] = (), timeout_s: float = 30.0,
            **env_extra: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m distfork [--keys-dir KEYS] ARGS`` to completion."""
    env = cli_env(DISTFORK_HEARTBEAT_S="0.2", **env_extra)
    if "DISTFORK_KEYS_DIR" not in env_extra:
        env.pop("DISTFORK_KEYS_DIR", None)
    if keys is None and "DISTFORK_KEYS_DIR" not in env_extra:
        env.setdefault("DISTFORK_DEFAULT_KEYS", "0")  # no keys: not the user's default ones either
    key_args = ("--keys-dir", str(keys)) if keys is not None else ()
    return subprocess.run([*prefix, PY, "-m", "distfork", *key_args, *args], env=env, capture_output=True,
                          text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


# -- a raw ZMTP 3.0 peer ----------------------------------------------------------------


def _greeting(mechanism: bytes = b"NULL") -> bytes:
    # signature, version 3.0, mechanism (20 bytes), as-server 0, filler (31 bytes): 64 bytes
    return b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + mechanism.ljust(20, b"\0") + b"\0" + b"\0" * 31


def _frame(body: bytes, more: bool = False, command: bool = False) -> bytes:
    flags = (0x01 if more else 0) | (0x04 if command else 0)
    if len(body) > 255:
        return bytes([flags | 0x02]) + struct.pack("!Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def _ready(socket_type: bytes = b"DEALER") -> bytes:
    name = b"Socket-Type"
    body = bytes([5]) + b"READY" + bytes([len(name)]) + name + struct.pack("!I", len(socket_type)) + socket_type
    return _frame(body, command=True)


class ZmtpPeer:
    """A DEALER peer speaking ZMTP 3.0 (NULL mechanism) written by hand over a TCP socket.

    It is what an attacker without keys would use: nothing of libzmq on our side,
    so whatever the broker does to it is the broker's own doing.
    """

    def __init__(self, host: str, port: int, timeout_s: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ZmtpPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def handshake(self) -> None:
        self.sock.sendall(_greeting() + _ready())
        theirs = self._read(64)
        assert theirs[0] == 0xFF and theirs[9] == 0x7F and theirs[12:16] == b"NULL", theirs
        flags, body = self._read_frame()
        assert flags & 0x04 and body[1:6] == b"READY", (flags, body[:16])

    def _read_frame(self) -> tuple[int, bytes]:
        flags = self._read(1)[0]
        size = struct.unpack("!Q", self._read(8))[0] if flags & 0x02 else self._read(1)[0]
        return flags, self._read(size)

    def send(self, frames: list[bytes]) -> None:
        self.sock.sendall(b"".join(_frame(f, more=i < len(frames) - 1) for i, f in enumerate(frames)))

    def send_oversized_header(self, size: int) -> None:
        """Announce a frame of ``size`` bytes and send the first 64 KiB of it (or all, if smaller)."""
        self.sock.sendall(bytes([0x02]) + struct.pack("!Q", size) + b"\0" * min(size, 65536))

    def recv(self) -> list[bytes]:
        """The next message (commands skipped)."""
        frames: list[bytes] = []
        while True:
            flags, body = self._read_frame()
            if flags & 0x04:
                continue
            frames.append(body)
            if not flags & 0x01:
                return frames


def closed_within(sock: socket.socket, timeout_s: float) -> float | None:
    """Seconds until the peer closed ``sock`` (reading and discarding what it sends), or None if it did not."""
    start = time.monotonic()
    while (left := timeout_s - (time.monotonic() - start)) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
        except TimeoutError:
            return None
    return None


# -- network namespaces ---------------------------------------------------------------


def netns_unavailable() -> str | None:
    """Why we cannot make a network namespace here, or None."""
    return unavailable(bridge=False, own_shm=False, hostnames=False)


Netns = Namespace  # a namespace of our own with only a loopback (up): .prefix, .run(), .delete()


# The capture: every TCP payload on the namespace's loopback, once (not the
# looped-back outgoing copy), appended to a file; "ready" once the socket is bound.
SNIFFER = r"""
import signal, socket, struct, sys

ETH_P_ALL, PACKET_OUTGOING = 0x0003, 4
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)

s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
try:
    s.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)  # SO_RCVBUFFORCE (root): drop nothing
except OSError:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
s.bind(("lo", 0))
out = open(sys.argv[1], "wb")
packets = 0

def take(frame, addr):
    global packets
    if addr[2] == PACKET_OUTGOING or len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[9] != 6:  # TCP only
        return
    total = struct.unpack("!H", ip[2:4])[0] or len(ip)
    tcp = ip[ihl:total]
    payload = tcp[(tcp[12] >> 4) * 4:]
    if payload:
        packets += 1
        out.write(payload)

print("ready", flush=True)
s.settimeout(0.05)
while not stop:
    try:
        take(*s.recvfrom(1 << 18))
    except socket.timeout:
        pass
s.setblocking(False)
while True:  # what the kernel still holds
    try:
        take(*s.recvfrom(1 << 18))
    except BlockingIOError:
        break
out.close()
print(f"packets {packets}", flush=True)
"""
