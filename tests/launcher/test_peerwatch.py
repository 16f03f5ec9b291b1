"""PeerFailedError: a watched worker store is interrupted as soon as the root cause is set."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from rdzv import TCPStore
from rdzv.errors import PeerFailedError
from rdzv.launcher.failures import FailureRecord
from rdzv.launcher.peerwatch import watch_failures

KEY = "rdzv.failure/job/abc"


def _blocked(call: Callable[[TCPStore], object]) -> None:
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    worker = TCPStore("127.0.0.1", server.port, timeout=60)
    watcher = watch_failures(worker, KEY)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            call(worker)
        except BaseException as exc:  # checked below
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.2)  # let it block (a late block raises the same way: see below)
    record = FailureRecord(kind="exit", node_rank=1, host="h", rank=3, exit_code=3, pid=9)
    started = time.monotonic()
    server.set(KEY, record.to_json())
    thread.join(10)
    watcher.join(10)
    assert not thread.is_alive() and len(outcome) == 1
    assert time.monotonic() - started < 5  # not the 60 s timeout
    error = outcome[0]
    assert isinstance(error, PeerFailedError)
    assert "root cause: rank 3 on node 1 (h): exit code 3" in str(error)
    assert error.record == record
    with pytest.raises(PeerFailedError, match="rank 3 on node 1"):
        worker.get("anything")  # every later call fails the same way
    worker.close()
    server.close()


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.get("never"),
        lambda s: s.wait(["never"]),
        lambda s: s.barrier("b", 2),
        lambda s: s.queue_pop("q"),
    ],
    ids=["get", "wait", "barrier", "queue_pop"],
)
def test_blocked_call_raises_peer_failed(call: Callable[[TCPStore], object]) -> None:
    _blocked(call)
