"""Issue 11: no way around the safeguards, closed to other local users by default.

::

    bind check      the broker accepts only address forms we understand, then asks
                    the kernel what it really listens on before serving (endpoint.py)

Every process is started through the CLI, as users run them (secsupport.Procs),
inside a network namespace of its own where a test binds beyond loopback.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

import distfork
from conftest import free_port, wait_until

from .secsupport import Netns, Procs, netns_unavailable, run_cli

pytestmark = pytest.mark.timeout(120)

NO_DEFAULT_KEYS = {"DISTFORK_DEFAULT_KEYS": "0"}  # a broker without any keys: what the bind check guards


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    logs = tmp_path / "logs"
    logs.mkdir()
    started = Procs(logs)
    try:
        yield started
    finally:
        distfork.shutdown()
        started.stop_all()


@pytest.fixture
def netns() -> Iterator[Netns]:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    ns = Netns()
    try:
        yield ns
    finally:
        ns.delete()


def _nothing_listens(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


# -- the bind check -------------------------------------------------------------------------------


@pytest.mark.parametrize("bind", [
    "tcp://127.0.0.1:0;0.0.0.0:{port}",  # libzmq binds the part after ';': every interface
    "tcp://127.0.0.1:1;127.0.0.1:{port}",
    "tcp://localhost@x:{port}",
    "tcp://::1:{port}",
    "ipc://@distfork-{port}",  # an abstract socket: no file permissions, any local user connects
])
def test_broker_refuses_address_forms_it_does_not_understand(bind: str) -> None:
    port = free_port()
    address = bind.format(port=port)
    done = run_cli("broker", "--bind", address, timeout_s=30, **NO_DEFAULT_KEYS)  # old brokers served: timeout
    assert done.returncode == 2, done
    assert f"cannot bind {address!r}" in done.stderr, done.stderr
    assert "tcp://HOST:PORT" in done.stderr or "ipc://PATH" in done.stderr, done.stderr
    assert _nothing_listens(port)


def test_an_interface_named_like_a_loopback_host_is_judged_by_what_it_binds(netns: Netns) -> None:
    # libzmq binds the address of an interface whose name is the host; /etc/hosts says localhost is 127.0.0.1.
    netns.ip("link", "add", "localhost", "type", "veth", "peer", "name", "lh-peer")
    netns.ip("addr", "add", "10.213.9.1/24", "dev", "localhost")
    netns.ip("link", "set", "localhost", "up")
    address = f"tcp://localhost:{free_port()}"
    done = run_cli("broker", "--bind", address, prefix=netns.prefix, timeout_s=30, **NO_DEFAULT_KEYS)
    assert done.returncode == 1, done
    assert f"refusing to bind {address} without keys: the broker listens on 10.213.9.1:" in done.stderr, done.stderr
    assert "--insecure" in done.stderr and "distfork keygen" in done.stderr


def test_metrics_host_is_checked_by_form_and_by_what_it_binds(netns: Netns) -> None:
    bind = f"tcp://127.0.0.1:{free_port()}"
    done = run_cli("broker", "--bind", bind, "--metrics-port", "0", "--metrics-host", "127.0.0.1;0.0.0.0",
                   prefix=netns.prefix, timeout_s=30, **NO_DEFAULT_KEYS)
    assert done.returncode == 2 and "--metrics-host '127.0.0.1;0.0.0.0'" in done.stderr, done
    done = run_cli("broker", "--bind", bind, "--metrics-port", "0", "--metrics-host", "0.0.0.0",
                   prefix=netns.prefix, timeout_s=30, **NO_DEFAULT_KEYS)
    assert done.returncode == 1, done
    assert "without keys: the broker listens on 0.0.0.0:" in done.stderr, done.stderr


def _serves(address: str, prefix: tuple[str, ...] = (), **env: str) -> bool:
    return run_cli("status", "--address", address, "--timeout", "1", prefix=prefix, **env).returncode == 0


def test_up_insecure_passes_insecure_to_its_broker(procs: Procs, netns: Netns) -> None:
    port = free_port()
    up = procs.distfork("up", "--workers", "1", "--insecure", "--bind", f"tcp://0.0.0.0:{port}", prefix=netns.prefix,
                        DISTFORK_INSECURE="1")
    wait_until(lambda: _serves(f"tcp://127.0.0.1:{port}", netns.prefix, DISTFORK_INSECURE="1") or up.poll() is not None,
               60, what="`distfork up --insecure` to serve")
    assert up.poll() is None, procs.stderr(up)
    assert "INSECURE: broker bound to tcp://0.0.0.0" in procs.stderr(up)
    assert procs.stop(up) == 0


def test_up_serves_an_ipv6_loopback_address(procs: Procs) -> None:
    address = f"tcp://[::1]:{free_port()}"
    up = procs.distfork("up", "--workers", "1", "--bind", address)
    wait_until(lambda: _serves(address) or up.poll() is not None, 60, what="`distfork up` on [::1] to serve")
    assert up.poll() is None, procs.stderr(up)
    assert "Traceback" not in procs.stderr(up)
    assert procs.stop(up) == 0
