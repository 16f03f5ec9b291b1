"""The exception hierarchy of rdzv.

Every error rdzv raises on purpose derives from :class:`RdzvError`, which is a
:class:`RuntimeError` like torch's ``torch.distributed.DistError``, so code written for torch
(``except RuntimeError``) keeps working. The mapping to torch's classes:

=============================  ====================================================
rdzv                           torch
=============================  ====================================================
``RdzvError``                  ``torch.distributed.DistError``
``StoreError``                 ``torch.distributed.DistStoreError``
``StoreTimeoutError``          ``DistStoreError`` raised on a timeout (also a
                               builtin ``TimeoutError`` here)
``QueueEmptyError``            ``torch.distributed.QueueEmptyError``
``CounterError``               the ``ValueError('stoll')`` of ``add``
``NetworkError``               ``torch.distributed.DistNetworkError``
``ProtocolError``              ``DistStoreError`` on a protocol violation
``AuthError``                  (none: torch has no authentication)
``ConnectionLimitError``       (none: torch closes the connection, or fails accept())
``PeerFailedError``            (none: torch waits out its timeout)
``RendezvousError`` and kin    ``torch.distributed.elastic.rendezvous`` errors
=============================  ====================================================

Messages always name what was involved (the key, the path or endpoint) and the limit that
was hit, and say what to do about it where there is something to do.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConnectionLimitError",
    "CounterError",
    "NetworkError",
    "PeerFailedError",
    "ProtocolError",
    "QueueEmptyError",
    "RdzvError",
    "RendezvousClosedError",
    "RendezvousConnectionError",
    "RendezvousError",
    "RendezvousGracefulExitError",
    "RendezvousStateError",
    "RendezvousTimeoutError",
    "StoreError",
    "StoreTimeoutError",
]


class RdzvError(RuntimeError):
    """Base class of every error raised by rdzv (like ``torch.distributed.DistError``)."""


class StoreError(RdzvError):
    """A store operation failed (like ``torch.distributed.DistStoreError``)."""


class StoreTimeoutError(StoreError, TimeoutError):
    """A blocking store operation (get, wait, multi_get, queue_pop, barrier) ran out of time.

    It is both a :class:`StoreError` (torch raises ``DistStoreError`` here) and a builtin
    :class:`TimeoutError`. The message names the keys waited for and the timeout in ms.
    """


class QueueEmptyError(StoreError):
    """A non-blocking ``queue_pop`` found the queue empty (like torch's ``QueueEmptyError``)."""


class CounterError(StoreError, ValueError):
    """``add`` found a value that is not a base-10 int64, or the sum left the int64 range.

    Also a :class:`ValueError`, which is what torch's HashStore and FileStore raise.
    """


class NetworkError(RdzvError, ConnectionError):
    """Connecting to, sending to or receiving from a store server failed.

    Like ``torch.distributed.DistNetworkError``; also a builtin :class:`ConnectionError`.
    """


class ConnectionLimitError(NetworkError):
    """The store server refused the connection: it serves as many connections as its limit
    allows (``rdzv serve --max-connections``, or its descriptor limit, ``ulimit -n``). The
    message is the server's: which limit and what raises it. Not retried by the client."""


class PeerFailedError(StoreError):
    """Another worker of the job failed (or hung, or its node was lost) while this one was
    blocked in a store call of :func:`rdzv.connect`'s store; raised at once instead of
    waiting out the call's timeout.

    ``record`` is the :class:`rdzv.launcher.failures.FailureRecord` of the root cause (typed
    ``object`` here so that this module imports nothing); the message names its rank, node,
    host and exit code.
    """

    def __init__(self, message: str, record: object = None) -> None:
        super().__init__(message)
        self.record = record


class ProtocolError(StoreError):
    """A peer sent bytes that violate the TCPStore wire protocol or one of its limits."""


class AuthError(StoreError):
    """Authentication with a store server failed (wrong, missing or replayed credentials)."""


class RendezvousError(RdzvError):
    """Base class of rendezvous errors (same name as torch's elastic ``RendezvousError``)."""


class RendezvousClosedError(RendezvousError):
    """The rendezvous is closed: no further round can be joined."""


class RendezvousTimeoutError(RendezvousError, TimeoutError):
    """The rendezvous did not complete in time (join, last-call, close or heartbeat timeout)."""


class RendezvousConnectionError(RendezvousError):
    """The rendezvous backend (store or etcd) could not be reached."""


class RendezvousStateError(RendezvousError):
    """The rendezvous state read from the backend is corrupt, hostile or inconsistent."""


class RendezvousGracefulExitError(RendezvousError):
    """This node was not admitted to the rendezvous and should exit cleanly (not a failure)."""
