"""Worker side: turn a peer's failure into :class:`~rdzv.errors.PeerFailedError` at once.

Under ``rdzv run``, :func:`rdzv.connect` calls :func:`watch_failures` on the store client it
returns. One daemon thread per store (not per call) opens a second connection and blocks in
``wait`` on :func:`~rdzv.launcher.failures.worker_failure_key`, which the agent that
published a root cause sets in the workers' store. When it fires, the thread reads the
record and :meth:`TCPStore.interrupt`\\ s the worker's connection: the call blocked there
(``get``, ``wait``, ``barrier``, ``queue_pop``, ...) and every later call raise
``PeerFailedError`` naming the root cause, instead of waiting out their timeout.
"""

from __future__ import annotations

import logging
import threading

from rdzv.errors import PeerFailedError, RdzvError, StoreTimeoutError
from rdzv.launcher.failures import FailureRecord
from rdzv.store.tcp import TCPStore

__all__ = ["watch_failures"]

_log = logging.getLogger("rdzv.launcher.peerwatch")

#: Timeout of one blocked wait (seconds); the wait is simply repeated after it.
_WAIT_TIMEOUT = 3600.0


def _watch(store: TCPStore, key: str) -> None:
    try:
        conn = store.clone()
    except RdzvError as exc:
        _log.debug("not watching for peer failures: %s", exc)
        return
    try:
        while True:
            try:
                conn.wait([key], _WAIT_TIMEOUT)
                break
            except StoreTimeoutError:
                continue
        record = FailureRecord.from_json(conn.get(key))
    except (RdzvError, ValueError) as exc:
        _log.debug("stopped watching for peer failures: %s", exc)
        return
    finally:
        conn.close()
    store.interrupt(PeerFailedError(f"a peer failed: {record.describe()}", record))


def watch_failures(store: TCPStore, key: str) -> threading.Thread:
    """Start the daemon thread that interrupts ``store`` when ``key`` is set (see the module
    docstring). Returns the thread."""
    thread = threading.Thread(
        target=_watch, args=(store, key), name="rdzv-peer-failures", daemon=True
    )
    thread.start()
    return thread
