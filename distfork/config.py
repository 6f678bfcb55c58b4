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

__all__ = [
    "BATCH_MAX",
    "BROKER_GC_THRESHOLD",
    "DEFAULT_ADDRESS",
    "DEFAULT_PORT",
    "DIRECT_NOTICE_S",
    "DRIVER_RECV_BURST",
    "OUTPUT_ROUTES_MAX",
    "REBALANCE_ANY_S",
    "RECV_BURST",
    "RESUBMITS_MAX",
    "STALL_S",
    "STARVED_STALL_S",
    "STEAL_CHECK_S",
    "Config",
    "load",
]

#: The port a standalone broker binds when none is given (``distfork broker``).
DEFAULT_PORT = 7340
#: The address drivers and workers use when none is given.
DEFAULT_ADDRESS = f"tcp://127.0.0.1:{DEFAULT_PORT}"

# Fixed by design rather than tuned per deployment (no DISTFORK_* override), named here so that
# every number that shapes the hot paths is in one place.
#: Tasks or results per batch message (SUBMIT, TASKS, RESULTS, DISCARD); a longer batch is split.
BATCH_MAX = 2000
#: Messages the broker handles before it dispatches and sends what they caused.
RECV_BURST = 2000
#: Messages the driver's I/O thread handles before it looks at its own queues again.
DRIVER_RECV_BURST = 1000
#: How often (seconds) the broker looks for stalled workers while another worker idles.
STEAL_CHECK_S = 0.005
#: A worker busy this long without a result (and 4x its usual task time) is stalled: no prefetch,
#: and what it holds beyond its slots may be stolen.
STALL_S = 0.05
#: While a slot idles and nothing is queued: a worker busy this long without a result gives
#: back what it holds beyond its slots, however long its tasks usually take.
STARVED_STALL_S = 0.02
#: While a slot idles and nothing is queued: a worker whose tasks take this long on average gives
#: back everything it holds beyond its slots and its prefetch room (a long task may hide among
#: them); one with shorter tasks, only once that is more than ``rebalance_s`` of work.
REBALANCE_ANY_S = 0.0005
#: A task whose future arguments keep vanishing from the broker (restarts) fails after this many tries.
RESUBMITS_MAX = 5
#: Longest a driver holds back its DIRECT notices (distfork/direct.py) to batch them, off the
#: path of the task's own round trip; anything else it sends the broker takes them along first.
DIRECT_NOTICE_S = 0.001
#: (slot, task) routes of task output the broker remembers for lines that come after the result.
OUTPUT_ROUTES_MAX = 10_000
#: The broker's first garbage-collector threshold (Python's default: 700 allocations). Its task table
#: makes few reference cycles, and a collection every 700 objects cost it about a fifth of its CPU.
BROKER_GC_THRESHOLD = 50_000


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
    #: Work (seconds, by the worker's recent run times) prefetched to a worker
    #: beyond what ``prefetch_s`` would give it now, above which, while a slot
    #: idles and nothing is queued, the excess is taken back for that slot:
    #: tasks prefetched while they looked short must not wait there when they
    #: turn out longer.
    rebalance_s: float = 0.01
    #: Buffers of at least this many bytes leave the pickle stream (pickle
    #: protocol 5 out-of-band buffers) and travel as their own frame.
    oob_threshold_bytes: int = 64 * 1024
    #: Move large buffers through POSIX shared memory between processes that
    #: see the same /dev/shm (``DISTFORK_SHM=0``: always ZeroMQ frames).
    shm: bool = True
    #: Bytes of pre-touched shared-memory segments a process keeps ready, so
    #: a large copy runs at memory bandwidth instead of page-fault speed.
    shm_spare_bytes: int = 512 * 1024 * 1024
    #: A ``torch.nn.Parameter`` or read-only numpy array of at least this
    #: many bytes is copied into shared memory once and later forks of it,
    #: unchanged, send a reference (see distfork/shared.py; 0: never).
    share_min_bytes: int = 1024 * 1024
    #: Bytes of large arguments a driver may have in flight at once; ``fork``
    #: blocks beyond it (one task is always let through, whatever its size).
    window_bytes: int = 1024 * 1024 * 1024
    #: Largest message frame the broker accepts from a peer, in bytes (0: no
    #: limit). Checked by libzmq before anything else, authenticated or not: it
    #: bounds what a peer that never authenticates can make the broker hold.
    #: Payloads are split into frames of ``serialize.FRAME_BYTES`` (16 MiB), so
    #: arrays of any size still travel.
    max_message_bytes: int = 32 * 1024**2
    #: Seconds a peer has to finish its handshake (and CURVE authentication).
    handshake_s: float = 5.0
    #: Connections the broker lets wait to be accepted (the listen backlog).
    backlog: int = 100
    #: Directory laid out by ``distfork keygen``: every role takes its keys from
    #: it (see distfork/security.py). Empty: this user's default keys (see default_keys).
    keys_dir: str = ""
    #: Our own secret key file (overrides keys_dir).
    curve_secret_file: str = ""
    #: The broker's public key, a file or its Z85 text (clients; overrides keys_dir).
    curve_server_key: str = ""
    #: Directory of admitted public keys, with ``clients/`` and ``workers/`` inside (broker; overrides keys_dir).
    curve_allow_dir: str = ""
    #: Without any key setting, a ``tcp://`` cluster uses this user's default credentials, made on
    #: first use under ``$XDG_CONFIG_HOME/distfork`` (or ``~/.config/distfork``): closed to other
    #: local users. 0: no keys unless configured (a broker then serves loopback only).
    default_keys: bool = True
    #: No keys at all, on every role (``--insecure``): anyone who reaches the broker runs code.
    insecure: bool = False
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
    #: Ship the driver's own modules (imported from outside site-packages and
    #: the standard library) to the workers of a cluster it connects to
    #: (distfork/codeship.py). ``DISTFORK_CODE_SHIP=0``: install them there instead.
    code_ship: bool = True
    #: More code to ship: paths or module names, separated by commas or
    #: ``os.pathsep`` (``distfork.init(code=[...])`` adds to it).
    code: str = ""
    #: Largest code package a driver ships, in bytes (0: no limit).
    code_max_bytes: int = 64 * 1024 * 1024
    #: Bytes of code packages the broker keeps (least recently used dropped).
    code_store_bytes: int = 512 * 1024 * 1024
    #: Where a worker host caches code packages (empty: ``$XDG_CACHE_HOME/distfork/code``,
    #: else ``~/.cache/distfork/code``); private to its user (0700).
    code_cache_dir: str = ""
    #: Seconds a worker waits for the broker to hand it a code package.
    code_fetch_timeout_s: float = 30.0
    #: Where a driver shows what its tasks print and log (distfork/output.py):
    #: ``terminal`` (its stdout and stderr, each line prefixed with the task,
    #: worker, host and pid), ``off``, or the path of a file to append to.
    #: Each future keeps its task's lines either way (``fut.output``).
    output: str = "terminal"
    #: Bytes of output one task may send to its driver; further lines are
    #: dropped and counted ("N lines dropped"). 0: no limit.
    output_task_bytes: int = 8 * 1024 * 1024
    #: What a worker process has beyond what it finds itself (slots, cpu,
    #: memory_gb, gpu from visible CUDA devices): ``gpu=2,ram_gb=64,ssd=1``
    #: (``distfork worker --resources``). Tasks ask with ``options(resources=...)``.
    resources: str = ""
    #: A worker's labels, ``zone=a,rack=3`` (``distfork worker --label``); tasks
    #: select with ``options(labels=...)``.
    labels: str = ""
    #: Seconds a task that fits on no worker of the cluster waits for one to
    #: join before it fails (broker).
    resource_grace_s: float = 3.0
    #: Top-level forks a ``distfork.trace()`` keeps (a ring: the oldest drop out).
    trace_capacity: int = 100_000
    #: The direct path (distfork/direct.py): a lone fork of a driver of the embedded cluster goes
    #: straight to an idle worker slot over a private ipc:// socket, not through the broker (which is
    #: still told of it). ``DISTFORK_DIRECT=0``: every task goes through the broker.
    direct: bool = True

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
