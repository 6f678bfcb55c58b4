"""Every tunable of distfork, in one place, each with a ``DISTFORK_*`` override.

Durations are float seconds with the unit in the name. A value is read from
the environment when :func:`load` is called (``Config.from_env``), so a test
or a user can set ``DISTFORK_HEARTBEAT_S=0.2`` before starting a process and
every role started from that environment agrees on it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, get_type_hints

__all__ = ["DEFAULT_ADDRESS", "DEFAULT_PORT", "Config", "load"]

#: The port a standalone broker binds when none is given (``distfork broker``).
DEFAULT_PORT = 7340
#: The address drivers and workers use when none is given.
DEFAULT_ADDRESS = f"tcp://127.0.0.1:{DEFAULT_PORT}"


@dataclasses.dataclass(frozen=True)
class Config:
    """Tunables. Field ``x_y`` is overridden by the environment variable ``DISTFORK_X_Y``."""

    #: Seconds between heartbeats, in both directions.
    heartbeat_s: float = 1.0
    #: Heartbeats a peer may miss before it is declared lost.
    liveness: int = 5
    #: How many times a task is re-run after the worker running it was lost.
    max_retries: int = 3
    #: Tasks a driver may have unfinished at once; ``fork`` blocks beyond it.
    window: int = 100_000
    #: Seconds of work the broker hands a worker beyond its free slots, judged
    #: by the worker's recent task run times, to hide the round trip for short
    #: tasks; tasks longer than this are never prefetched, so long tasks spread
    #: evenly. A prefetched task is re-queued for free if the worker is lost.
    prefetch_s: float = 0.002
    #: Most tasks prefetched to one worker slot.
    prefetch_max: int = 128
    #: Buffers of at least this many bytes leave the pickle stream (pickle
    #: protocol 5 out-of-band buffers) and travel as their own frame.
    oob_threshold_bytes: int = 64 * 1024
    #: Move large buffers through POSIX shared memory between processes that
    #: see the same /dev/shm (``DISTFORK_SHM=0``: always ZeroMQ frames).
    shm: bool = True
    #: Bytes of pre-touched shared-memory segments a process keeps ready, so
    #: a large copy runs at memory bandwidth instead of page-fault speed.
    shm_spare_bytes: int = 512 * 1024 * 1024
    #: Bytes of large arguments a driver may have in flight at once; ``fork``
    #: blocks beyond it (one task is always let through, whatever its size).
    window_bytes: int = 1024 * 1024 * 1024
    #: Largest message frame the broker accepts from a peer, in bytes (0: no
    #: limit). Checked by libzmq before anything else, authenticated or not.
    max_message_bytes: int = 4 * 1024**3
    #: Seconds a peer has to finish its handshake (and CURVE authentication).
    handshake_s: float = 5.0
    #: Connections the broker lets wait to be accepted (the listen backlog).
    backlog: int = 100
    #: Directory laid out by ``distfork keygen``: every role takes its keys from
    #: it (see distfork/security.py). Empty: no keys, loopback only.
    keys_dir: str = ""
    #: Our own secret key file (overrides keys_dir).
    curve_secret_file: str = ""
    #: The broker's public key, a file or its Z85 text (clients; overrides keys_dir).
    curve_server_key: str = ""
    #: Directory of admitted client public keys (broker; overrides keys_dir).
    curve_allow_dir: str = ""
    #: ZeroMQ high-water mark (messages) on every socket.
    hwm: int = 100_000
    #: Seconds the driver waits for the broker to answer its hello before
    #: ``BrokerUnavailableError``.
    connect_timeout_s: float = 10.0
    #: Seconds to wait for a role to stop after SIGTERM before SIGKILL.
    stop_timeout_s: float = 5.0
    #: Worker processes the embedded cluster starts (0: one per core).
    local_workers: int = 0
    #: Task slots per worker process (tasks run at once in threads).
    slots: int = 1
    #: Top-level forks a ``distfork.trace()`` keeps (a ring: the oldest drop out).
    trace_capacity: int = 100_000

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Config:
        """Defaults, then ``DISTFORK_*`` variables, then ``overrides``."""
        env = dict(os.environ) if env is None else env
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = env.get("DISTFORK_" + field.name.upper())
            if raw is None:
                continue
            kind = hints[field.name]
            try:
                values[field.name] = _parse_bool(raw) if kind is bool else kind(raw)
            except ValueError:
                raise ValueError(
                    f"DISTFORK_{field.name.upper()}={raw!r} is not a valid {kind.__name__}; "
                    f"unset it or give a number like {field.default!r}"
                ) from None
        values.update(overrides)
        return cls(**values)

    @property
    def peer_timeout_s(self) -> float:
        """Silence after which a peer is considered lost."""
        return self.heartbeat_s * self.liveness


def _parse_bool(raw: str) -> bool:
    text = raw.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(raw)


def load(**overrides: Any) -> Config:
    """The configuration of this process: defaults, environment, then ``overrides``."""
    return Config.from_env(**overrides)
