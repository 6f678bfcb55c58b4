"""The errors distfork raises.

::

    Exception
     ├── DistforkError                 every error of distfork's own
     │    ├── SerializationError       something could not be pickled or unpickled
     │    ├── WorkerLostError          the worker running a task died, too often
     │    ├── BrokerUnavailableError   no broker answers at the address
     │    ├── AuthenticationError      the broker refused our key, or the handshake failed
     │    ├── ProtocolError            a message on the wire is malformed (dropped)
     │    └── RemoteError              a task raised something that could not travel back, or whose
     │                                 class the driver cannot import (type name, message, traceback kept)
     └── TimeoutError (builtin)        ``wait(fut, timeout)`` expired; the task goes on

An exception raised by the user's function is re-raised by ``wait`` as its
own type; its ``__cause__`` is a :class:`RemoteTraceback` carrying the
traceback text from the worker (host, pid), as ``concurrent.futures`` does.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BrokerUnavailableError",
    "DistforkError",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "WorkerLostError",
]


class DistforkError(Exception):
    """Base class of every error distfork raises itself."""


class SerializationError(DistforkError):
    """An object could not be pickled (in ``fork``, or a task's result) or unpickled.

    The message names the object. Make it picklable (define the function at
    module level or make its captured state picklable), or return/pass
    something else.
    """


class WorkerLostError(DistforkError):
    """The worker process running the task died (crash, signal, lost host) on every try.

    The message names the worker, its host and its exit code or signal. A
    task that crashes its process each time it runs ends here after
    ``max_retries`` retries; raise ``max_retries`` with ``distfork.options``
    if the losses were not the task's fault.
    """


class BrokerUnavailableError(DistforkError):
    """No broker answered at the configured address within ``connect_timeout_s``.

    Start one (``distfork broker`` or ``distfork up``), or check the address
    given to ``distfork.init`` / ``DISTFORK_ADDRESS``.
    """


class AuthenticationError(DistforkError):
    """The broker refused our CURVE key, or the security handshake failed.

    The message says which: an unknown public key (add it to the broker's
    allow-list and SIGHUP the broker), or a wrong broker public key / keys
    on one side only (check ``DISTFORK_KEYS_DIR`` on both sides).
    """


class ProtocolError(DistforkError):
    """A message did not follow distfork's wire protocol. It is logged and dropped."""


class RemoteError(DistforkError):
    """A task raised an exception that could not be sent back as itself, or rebuilt here.

    The message holds the original type name and its text; ``type_name`` is
    that type's ``module.qualname``; ``__cause__`` is the remote traceback.
    Make the exception class importable in the driver and picklable to get
    it back as its own type.
    """

    def __init__(self, message: str, type_name: str = "") -> None:
        super().__init__(message)
        #: ``module.qualname`` of the exception the task raised ("" if unknown).
        self.type_name = type_name

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str]]:
        return type(self), (str(self), self.type_name)


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
