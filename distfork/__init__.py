"""distfork: ``torch.jit.fork`` / ``torch.jit.wait`` for a cluster of processes.

>>> import distfork
>>> fut = distfork.fork(pow, 2, 10)   # returns at once; runs in a worker
>>> distfork.wait(fut)
1024
"""

from .api import Options, fork, init, options, shutdown, wait
from .errors import (
    AuthenticationError,
    BrokerUnavailableError,
    DistforkError,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    WorkerLostError,
)
from .executor import Executor
from .future import Future, as_completed, collect_all, wait_all
from .progressbar import progress
from .shared import Shared, share
from .slurm import SlurmCluster
from .tracing import Trace, trace

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "BrokerUnavailableError",
    "DistforkError",
    "Executor",
    "Future",
    "Options",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "Shared",
    "SlurmCluster",
    "Trace",
    "WorkerLostError",
    "as_completed",
    "collect_all",
    "fork",
    "init",
    "options",
    "progress",
    "share",
    "shutdown",
    "trace",
    "wait",
    "wait_all",
]
