"""Root causes pushed to every agent of a generation (one blocked pop per agent, no polling).

The agent that sees a failure first (a worker exited non-zero or was killed, a worker hung,
the watched peer node was lost) calls :meth:`CauseChannel.publish`: the record becomes the
generation's root cause in the round's store (:func:`rdzv.launcher.failures.publish`, the
first one wins) and a doorbell is pushed to every other agent's queue ``{ns}/news/{node}``.
Each agent keeps one thread blocked in ``queue_pop`` of its own queue on a second connection
(:meth:`Store.clone`), so the news arrives as soon as the store delivers it; the thread reads
the root cause and hands it to the agent's callback. :meth:`CauseChannel.close` pushes
``stop`` into the agent's own queue to end the thread.

The publisher also writes the record into the workers' store under
:func:`~rdzv.launcher.failures.worker_failure_key`, where the store that ``rdzv.connect()``
returns is watching (:mod:`rdzv.launcher.peerwatch`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

from rdzv.errors import RdzvError, StoreTimeoutError
from rdzv.launcher.failures import FailureRecord, publish, read_root_cause
from rdzv.store.base import Store

__all__ = ["CauseChannel"]

_log = logging.getLogger("rdzv.launcher.causes")

#: Timeout of one blocked pop (seconds); the pop is simply repeated after it.
_POP_TIMEOUT = 3600.0
_STOP = b"stop"
_FAILURE = b"failure"


class CauseChannel:
    """The root-cause channel of one agent in one generation.

    Args:
        store: the round's store (shared by all agents).
        namespace: the generation's key prefix (``Assignment.namespace``).
        group_rank, group_world_size: this node and the number of nodes.
        on_cause: called (from the channel's thread) with the root cause another agent
            published.
    """

    def __init__(
        self,
        store: Store,
        namespace: str,
        group_rank: int,
        group_world_size: int,
        on_cause: Callable[[FailureRecord], None],
    ) -> None:
        self._store = store
        self._ns = namespace
        self._rank = group_rank
        self._nodes = group_world_size
        self._on_cause = on_cause
        self._closed = False
        self._thread: threading.Thread | None = None
        if group_world_size > 1:
            self._thread = threading.Thread(
                target=self._listen, name=f"rdzv-causes-{group_rank}", daemon=True
            )
            self._thread.start()

    def _queue(self, node: int) -> str:
        return f"{self._ns}/news/{node}"

    def _listen(self) -> None:
        try:
            conn = self._store.clone()
            conn.set_timeout(_POP_TIMEOUT)
        except (RdzvError, OSError, NotImplementedError) as exc:
            _log.warning("cannot listen for other nodes' failures: %s", exc)
            return
        try:
            while not self._closed:
                try:
                    item = conn.queue_pop(self._queue(self._rank))
                except StoreTimeoutError:
                    continue
                if item == _STOP:
                    return
                record = read_root_cause(conn, self._ns)
                if record is not None and not self._closed:
                    self._on_cause(record)
        except (RdzvError, OSError, ValueError) as exc:
            if not self._closed:
                _log.info("stopped listening for other nodes' failures: %s", exc)
        finally:
            close = getattr(conn, "close", None)
            if callable(close):
                close()

    def publish(self, record: FailureRecord) -> FailureRecord:
        """Publish ``record`` unless another agent published a root cause first, and ring
        every other agent. Returns the root cause in force. Raises the store's errors
        (:class:`~rdzv.errors.RdzvError`) when the round's store is unreachable."""
        root = publish(self._store, self._ns, record)
        for node in range(self._nodes):
            if node != self._rank:
                self._store.queue_push(self._queue(node), _FAILURE)
        return root

    def abandon(self) -> None:
        """Stop listening without telling the store (it is gone); the daemon thread ends
        when its connection fails."""
        self._closed = True

    def close(self) -> None:
        """End the listening thread (best effort; waits at most 1 s)."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        # If the store is gone, the thread's pop fails on its own.
        with contextlib.suppress(RdzvError):
            self._store.queue_push(self._queue(self._rank), _STOP)
        thread.join(1.0)
