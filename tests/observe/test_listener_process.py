"""``rdzv serve --metrics-port`` serves HTTP from a process of its own, fed by the store
process: it exits with the store, the store survives it, and key listings are rate-limited."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from rdzv.observe.channel import WATCH_TIMEOUT, Channel
from rdzv.observe.http import KEYS_INTERVAL, Unavailable
from rdzv.observe.listener import NICENESS, RemoteStore
from rdzv.server import ServerThread
from rdzv.stats import HistogramSnapshot, ServerSnapshot
from rdzv.store.tcp import TCPStore
from tests.observe.helpers import scrape, serve_with_metrics, value
from tests.server.helpers import eventually

SNAPSHOT = ServerSnapshot(
    requests={"SET": 2},
    request_time=HistogramSnapshot((0.001, 0.01), (1, 1, 0), 0.004),
    open={"torch": 0, "rdzv": 1},
    accepted=1,
    closed={},
    waiters=0,
    keys=1,
    value_bytes=None,
    auth_failures={},
    limit_hits={},
    protocol_errors=0,
    commits=None,
    fsync_time=None,
)


def test_snapshots_cross_to_the_listener_as_json(tmp_path: Path) -> None:
    """What the store process sends its listener is JSON (no pickle crosses a process
    boundary) and reads back as the same snapshot, durable counters included."""
    server = ServerThread(data_dir=str(tmp_path), metrics=True).start()
    try:
        store = TCPStore("127.0.0.1", server.port, timeout=10)
        store.set("k", b"v" * 10)
        store.add("n", 3)
        snap = server.call(lambda s: s.snapshot())
        store.close()
    finally:
        server.stop()
    assert snap.fsync_time is not None and snap.commits
    ours, theirs = socket.socketpair()
    Channel(ours).send(["state", snap.to_json(), None])
    message = Channel(theirs).receive()
    assert ServerSnapshot.from_json(message[1]) == snap
    assert ServerSnapshot.from_json(SNAPSHOT.to_json()) == SNAPSHOT
    ours.close()
    theirs.close()


def listener_pid(store_pid: int) -> int:
    """The one child of the store process: the listener."""
    children = Path(f"/proc/{store_pid}/task/{store_pid}/children").read_text().split()
    [pid] = [int(c) for c in children]
    assert b"rdzv.observe.listener" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return pid


def exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def refused(url: str) -> bool:
    host, port = url[len("http://") :].rstrip("/").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_listener_process_exits_when_the_store_is_killed() -> None:
    with serve_with_metrics() as (proc, port, url):
        child = listener_pid(proc.pid)
        niceness = os.getpriority(os.PRIO_PROCESS, proc.pid) + NICENESS
        assert os.getpriority(os.PRIO_PROCESS, child) == min(19, niceness)  # scrapes yield
        if hasattr(os, "SCHED_BATCH"):  # and do not preempt the store or its clients
            assert os.sched_getscheduler(child) == os.SCHED_BATCH
        store = TCPStore("127.0.0.1", port, timeout=10)
        store.set("k", "v")
        eventually(lambda: value(scrape(url), "rdzv_store_keys") == 1, what="a published snapshot")
        store.close()
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup in the store: the channel just closes
        proc.wait(10)
        eventually(lambda: exited(child), what="the listener exits with the store")
        assert refused(url)


def test_the_store_survives_its_listener_being_killed() -> None:
    with serve_with_metrics() as (proc, port, url):
        child = listener_pid(proc.pid)
        os.kill(child, signal.SIGKILL)
        eventually(lambda: exited(child) and refused(url), what="the listener is gone")
        store = TCPStore("127.0.0.1", port, timeout=10)
        store.set("still", "served")
        assert store.get("still") == b"served"
        assert proc.poll() is None
        store.close()


def test_key_listings_are_paced_and_answered_from_the_last_answer_when_busy() -> None:
    ours, theirs = socket.socketpair()
    store_end = Channel(ours)
    remote = RemoteStore(Channel(theirs), snapshot=None, status={})  # type: ignore[arg-type]
    answers: list[Any] = []
    first = threading.Thread(target=lambda: answers.append(remote.keys("job/", 5)))
    first.start()
    request = store_end.receive()
    asked_at = time.monotonic()
    assert request == {"keys": 1, "prefix": "job/", "limit": 5}
    # While a listing is under way, another one is refused (nothing cached for it yet).
    with pytest.raises(Unavailable, match="rate-limited"):
        remote.keys("job/", 5)
    answer = {"prefix": "job/", "total": 0, "keys": []}
    remote.receive(["keys", 1, answer])
    first.join(10)
    assert answers == [answer]
    # The next listing is paced KEYS_INTERVAL after the first; a store that refuses it
    # (None) gets the last answer to the same query served instead.
    second = threading.Thread(target=lambda: answers.append(remote.keys("job/", 5)))
    second.start()
    assert store_end.receive() == {"keys": 2, "prefix": "job/", "limit": 5}
    assert time.monotonic() - asked_at >= KEYS_INTERVAL * 0.9
    remote.receive(["keys", 1, {"stale": "reply to an earlier request"}])  # ignored
    remote.receive(["keys", 2, None])
    second.join(10)
    assert answers == [answer, answer]
    store_end.close()
    with pytest.raises(Unavailable, match="gone"):
        remote.keys("other/", 5)


def test_the_status_document_is_asked_for_while_read_and_waited_for_after_a_pause() -> None:
    ours, theirs = socket.socketpair()
    store_end = Channel(ours)
    first = {"kind": "store", "n": 1}
    remote = RemoteStore(Channel(theirs), snapshot=None, status=first)  # type: ignore[arg-type]
    assert remote.status() == first  # the first state carries a document
    remote.receive(["state", SNAPSHOT.to_json(), None])  # a state without one keeps the last
    assert remote.status() == first
    remote._watch_sent -= WATCH_TIMEOUT  # nobody read it for a while: the store stopped
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(remote.status()))
    reader.start()
    assert store_end.receive() == {"watch": 1}
    assert got == []  # waiting for a fresh document
    fresh = {"kind": "store", "n": 2}
    remote.receive(["state", SNAPSHOT.to_json(), fresh])
    reader.join(10)
    assert got == [fresh]
    assert remote.status() == fresh  # renewed at most every WATCH_RENEW s: no message now
    ours.setblocking(False)
    with pytest.raises(BlockingIOError):
        ours.recv(1)
    store_end.close()
