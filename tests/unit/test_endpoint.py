"""Which addresses a broker may bind: only forms we understand (distfork/endpoint.py)."""

from __future__ import annotations

import pytest

from distfork.endpoint import check_bind, check_host, is_loopback_ip


@pytest.mark.parametrize("address", [
    "tcp://127.0.0.1:7340", "tcp://0.0.0.0:0", "tcp://*:7340", "tcp://[::1]:7340", "tcp://[::]:1",
    "tcp://localhost:7340", "tcp://broker-host.example.org:7340", "tcp://eth0:7340", "tcp://127.0.0.1:*",
    "ipc:///tmp/distfork-x/broker",
])
def test_forms_we_understand_are_accepted(address: str) -> None:
    assert check_bind(address) == address


@pytest.mark.parametrize("address", [
    "tcp://127.0.0.1:0;0.0.0.0:7340",  # libzmq's source;destination: binds 0.0.0.0
    "tcp://127.0.0.1:1;10.1.2.3:7340",
    "tcp://lo;eth0:7340", "tcp://user@host:7340", "tcp://127.0.0.1 :7340", "tcp://[::1%lo]:7340",
    "tcp://::1:7340",  # IPv6 without brackets
    "tcp://127.0.0.1", "tcp://:7340", "tcp://127.0.0.1:70000", "tcp://127.0.0.1:port",
    "ipc://@abstract", "ipc://", "inproc://x", "udp://127.0.0.1:7340", "127.0.0.1:7340", "pgm://eth0;239.1.1.1:5555",
])
def test_anything_else_is_refused_with_the_forms_we_accept(address: str) -> None:
    with pytest.raises(ValueError, match="cannot bind"):
        check_bind(address)


@pytest.mark.parametrize("host", ["127.0.0.1;0.0.0.0", "a@b", "", "x y", "[::1"])
def test_metrics_hosts_are_checked_the_same_way(host: str) -> None:
    with pytest.raises(ValueError, match="--metrics-host"):
        check_host(host, "--metrics-host")


@pytest.mark.parametrize(("ip", "loopback"), [
    ("127.0.0.1", True), ("127.5.5.5", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("::", False), ("::ffff:0.0.0.0", False), ("10.0.0.1", False), ("localhost", False),
])
def test_loopback_is_judged_on_ip_addresses_only(ip: str, loopback: bool) -> None:
    assert is_loopback_ip(ip) is loopback
