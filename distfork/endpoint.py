"""What a broker may bind, judged twice: by the form of the address, then by what the kernel listens on.

A ZeroMQ address is richer than it looks: ``tcp://127.0.0.1:0;0.0.0.0:7340``
(libzmq's ``source;destination`` form) binds ``0.0.0.0:7340``, and
``tcp://NAME:PORT`` binds the address of the *network interface* NAME if
there is one, whatever /etc/hosts says NAME resolves to. So:

1. :func:`check_bind` accepts only the forms we understand
   (``tcp://HOST:PORT`` with HOST an IP literal, ``[IPv6]``, ``*`` or a
   plain host name; ``ipc://PATH``) and refuses anything else (``;``,
   ``@``, empty parts) with an error that names the cause;
2. after binding, :func:`exposed` asks the kernel which TCP addresses this
   process really listens on (psutil, the same facts as ``ss -ltnp``): the
   broker refuses to serve when one of them is not loopback and it has no
   keys and no ``--insecure``. The string is never trusted for that.
"""

from __future__ import annotations

import ipaddress
import re

import psutil

from .errors import DistforkError

__all__ = ["ExposedError", "check_bind", "check_host", "exposed", "is_loopback_ip", "listening"]

# RFC 1123 host names (and interface names like eth0, lo): letters, digits, '-', '_', dots.
_LABEL = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")
_FORMS = "tcp://HOST:PORT (HOST an IP address, [IPv6 address], * or a host name; PORT a number) or ipc://PATH"


class ExposedError(DistforkError):
    """A broker without keys (and without ``--insecure``) found itself listening beyond loopback: it did not serve."""


def check_host(host: str, what: str = "host") -> str:
    """``host`` if it is an IP literal (IPv6 with or without brackets), ``*`` or a plain host name; else ValueError."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare == "*":
        return host
    try:
        if "%" in bare:  # a scope (interface) name: we judge addresses, not interfaces
            raise ValueError(bare)
        ipaddress.ip_address(bare)
        return host
    except ValueError:
        pass
    if bare is host and _HOSTNAME.match(host):
        return host
    raise ValueError(
        f"{what} {host!r} is not an IP address, [IPv6 address], * or a host name; "
        "characters such as ';', '@', '%' or spaces are refused (libzmq gives some of them meanings "
        "such as 'source;destination' that would bind another address than the one checked)"
    )


def check_bind(address: str) -> str:
    """``address`` if it is a form a broker may bind; ValueError naming the problem otherwise."""
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in ("tcp", "ipc"):
        raise ValueError(f"cannot bind {address!r}: the address must be {_FORMS}")
    if scheme == "ipc":
        if not rest or rest.startswith("@") or "\0" in rest or ";" in rest:
            raise ValueError(
                f"cannot bind {address!r}: give ipc://PATH with a file-system path (abstract '@' sockets have no "
                "permissions: any local user could connect)"
            )
        return address
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        raise ValueError(f"cannot bind {address!r}: the address must be {_FORMS}")
    if not (port.isdigit() and int(port) <= 65535) and port != "*":
        raise ValueError(f"cannot bind {address!r}: the port {port!r} is not a number from 0 to 65535 (or *)")
    try:
        if ":" in host and not host.startswith("["):
            raise ValueError(f"host {host!r}: write an IPv6 address in brackets, tcp://[{host}]:{port}")
        check_host(host)
    except ValueError as exc:
        raise ValueError(f"cannot bind {address!r}: {exc}. The address must be {_FORMS}") from None
    return address


def is_loopback_ip(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def listening() -> list[tuple[str, int]]:
    """The TCP (IPv4 and IPv6) addresses this process listens on, as the kernel sees them."""
    out = []
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr:
            out.append((str(conn.laddr.ip), int(conn.laddr.port)))
    return out


def exposed() -> list[str]:
    """The addresses this process listens on that are not loopback (empty: only this machine can connect)."""
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip, port in listening() if not is_loopback_ip(ip)]
