"""Who may talk to a broker: CurveZMQ keys, the allow-list, and clear refusals.

Whoever can send a task runs code on the workers (they unpickle it), so a
broker reachable from other machines must know its peers. With keys
configured, every socket speaks CURVE (libzmq's authenticated encryption):

    broker   ROUTER, curve server with its secret key; a ZAP handler
             (pyzmq's ThreadAuthenticator) admits only the public keys
             found in the allow-list directory, re-read on SIGHUP
    clients  drivers, workers, status queries, supervisors: curve clients
             with their own key pair and the broker's public key

``distfork keygen DIR`` writes the usual layout, which ``keys_dir``
(``DISTFORK_KEYS_DIR``) then wires up for every role::

    DIR/broker.key, DIR/broker.key_secret     the broker's pair
    DIR/client.key, DIR/client.key_secret     a pair for drivers and workers
    DIR/allowed/client.key                    the allow-list: public keys only

The explicit settings ``curve_secret_file``, ``curve_server_key`` (a
public-key file or its 40-character Z85 text) and ``curve_allow_dir``
override the layout. A client that the broker refuses sees a handshake
failure on its socket monitor within the handshake interval and raises
:class:`~distfork.errors.AuthenticationError` (drivers) or exits with
``EXIT_REFUSED`` (workers), never hangs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from typing import Any

import zmq
import zmq.auth

from .config import Config

__all__ = [
    "EXIT_REFUSED",
    "ServerAuth",
    "client_keys",
    "DROPPED_HANDSHAKES",
    "HandshakeWatch",
    "failure_text",
    "reconnect_quickly",
    "keygen",
    "secure_client",
    "server_keys",
    "watch_handshake",
]

log = logging.getLogger(__name__)

#: Exit code of a worker whose key the broker refused (EX_CONFIG): its supervisor does not restart it.
EXIT_REFUSED = 78

_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


@dataclasses.dataclass(frozen=True)
class ClientKeys:
    public: bytes
    secret: bytes
    server_public: bytes


@dataclasses.dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    allow_dir: str


def keygen(directory: str, overwrite: bool = False) -> dict[str, str]:
    """Write the broker's and a client's key pairs and an allow-list holding the client."""
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for name in ("broker", "client"):
        public = os.path.join(directory, f"{name}.key")
        if os.path.exists(public) and not overwrite:
            raise FileExistsError(f"{public} exists; pass --force to replace the keys in {directory}")
        pub, sec = zmq.auth.create_certificates(directory, name)
        os.chmod(sec, 0o600)
        paths[name] = pub
        paths[f"{name}_secret"] = sec
    allowed = os.path.join(directory, "allowed")
    os.makedirs(allowed, exist_ok=True)
    paths["allowed"] = shutil.copy(paths["client"], os.path.join(allowed, "client.key"))
    return paths


def _load(path: str, want_secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"cannot read the CURVE key file {path}: {exc}; make keys with `distfork keygen DIR`"
        ) from None
    if want_secret and secret is None:
        raise ValueError(f"{path} holds no secret key; give the *.key_secret file of `distfork keygen`")
    return public, secret


def _server_public(value: str) -> bytes:
    if len(value) == 40 and not os.path.exists(value):
        return value.encode()  # Z85 text of the key itself
    return _load(value, want_secret=False)[0]


def client_keys(config: Config) -> ClientKeys | None:
    """The keys a driver or worker uses, or None for a cluster without keys."""
    secret_file = config.curve_secret_file or (
        os.path.join(config.keys_dir, "client.key_secret") if config.keys_dir else ""
    )
    server = config.curve_server_key or (os.path.join(config.keys_dir, "broker.key") if config.keys_dir else "")
    if not secret_file and not server:
        return None
    if not secret_file or not server:
        raise ValueError(
            "CURVE needs both our own secret key (DISTFORK_CURVE_SECRET_FILE) and the broker's public key "
            "(DISTFORK_CURVE_SERVER_KEY), or DISTFORK_KEYS_DIR with the layout of `distfork keygen`"
        )
    public, secret = _load(secret_file, want_secret=True)
    assert secret is not None
    return ClientKeys(public, secret, _server_public(server))


def server_keys(config: Config) -> ServerKeys | None:
    """The broker's keys and allow-list, or None for a broker without keys."""
    secret_file = config.curve_secret_file or (
        os.path.join(config.keys_dir, "broker.key_secret") if config.keys_dir else ""
    )
    allow = config.curve_allow_dir or (os.path.join(config.keys_dir, "allowed") if config.keys_dir else "")
    if not secret_file and not allow:
        return None
    if not secret_file or not allow:
        raise ValueError(
            "a broker with keys needs its secret key (DISTFORK_CURVE_SECRET_FILE) and an allow-list directory "
            "of client public keys (DISTFORK_CURVE_ALLOW_DIR), or DISTFORK_KEYS_DIR from `distfork keygen`"
        )
    if not os.path.isdir(allow):
        raise ValueError(f"the allow-list {allow} is not a directory of public key files")
    public, secret = _load(secret_file, want_secret=True)
    assert secret is not None
    return ServerKeys(public, secret, allow)


def secure_client(sock: zmq.Socket[Any], keys: ClientKeys | None) -> bool:
    """Make ``sock`` a CURVE client with ``keys`` (from :func:`client_keys`; before connect). True if it is."""
    sock.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:PORT as well (IPv4 addresses keep working)
    if keys is None:
        return False
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server_public
    return True


class ServerAuth:
    """The broker's ZAP handler: admits the public keys of the allow-list."""

    def __init__(self, ctx: zmq.Context[Any], keys: ServerKeys) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self.keys = keys
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("distfork.security.zap"))
        self._auth.start()
        self.reload()

    def secure(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True

    def reload(self) -> int:
        """Re-read the allow-list directory; returns how many keys it admits."""
        self._auth.configure_curve(domain="*", location=self.keys.allow_dir)
        n = sum(1 for f in os.listdir(self.keys.allow_dir) if f.endswith(".key"))
        log.info("allow-list %s: %d public keys admitted", self.keys.allow_dir, n)
        return n

    def stop(self) -> None:
        self._auth.stop()


def reconnect_quickly(sock: zmq.Socket[Any]) -> None:
    """Retry a connection after 20 ms, backing off to 1 s (libzmq: every 100 ms, flat).

    A driver or worker started together with its broker (the embedded
    cluster) usually connects a few milliseconds before the broker binds;
    the first retry then comes 80 ms sooner. The back-off keeps a long
    outage from costing more than before.
    """
    sock.setsockopt(zmq.RECONNECT_IVL, 20)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)


def watch_handshake(sock: zmq.Socket[Any]) -> zmq.Socket[Any]:
    """A monitor socket reporting ``sock``'s handshake outcomes (poll it; read with failure_text)."""
    return sock.get_monitor_socket(_HANDSHAKE_EVENTS)


#: Handshakes dropped without a reason in a row before we call it a refusal (see HandshakeWatch).
DROPPED_HANDSHAKES = 3


class HandshakeWatch:
    """Reads a handshake monitor and tells a refusal from a handshake cut short.

    A refused key (``AUTH``) or mismatched security (``PROTOCOL``) is final.
    A handshake that ends without a reason (``NO_DETAIL``) is what a wrong
    server key looks like, but also a broker killed or restarting in the
    middle of one: only :data:`DROPPED_HANDSHAKES` of them in a row, with no
    success between, count as a refusal.
    """

    def __init__(self, monitor: zmq.Socket[Any], address: str) -> None:
        self.monitor = monitor
        self.address = address
        self.dropped = 0

    def check(self) -> str | None:
        """Read one event; why we are refused, or None."""
        from zmq.utils.monitor import recv_monitor_message

        event = recv_monitor_message(self.monitor)["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.dropped = 0
            return None
        if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self.dropped += 1
            if self.dropped < DROPPED_HANDSHAKES:
                log.info("a handshake with %s was cut short (%d in a row); trying again", self.address, self.dropped)
                return None
        return _failure_text(event, self.address)


def failure_text(monitor: zmq.Socket[Any], address: str) -> str | None:
    """Read one monitor event; the reason a handshake failed, or None if it did not."""
    from zmq.utils.monitor import recv_monitor_message

    return _failure_text(recv_monitor_message(monitor)["event"], address)


def _failure_text(event: int, address: str) -> str | None:
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            f"the broker at {address} refused our key: our public key is not in its allow-list. "
            "Add our .key file to the broker's allow-list directory (then SIGHUP the broker), "
            "or use a key pair it admits"
        )
    if event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
        return (
            f"the security handshake with the broker at {address} failed: the broker's public key we were "
            "given is wrong, or one side uses keys and the other does not "
            "(check DISTFORK_KEYS_DIR / DISTFORK_CURVE_SERVER_KEY on both)"
        )
    return None
