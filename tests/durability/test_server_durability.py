"""A durable StoreServer: recovery, commit before replies (group commit), fsync policies,
volatile keys, corrupt data directories (``rdzv serve --data-dir``)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rdzv import wire
from rdzv.engine import Engine
from rdzv.server import ServerThread
from rdzv.server.persistence import DurableJournal, recover
from rdzv.store.tcp import TCPStore
from tests.conftest import subprocess_env
from tests.server.helpers import Raw, eventually, rdzv_serve


def on_disk(data_dir: Path) -> Engine:
    """What a restart would recover right now (read from the files, not the server)."""
    engine = Engine()
    recover(data_dir, engine)
    return engine


def durable(data_dir: Path, port: int = 0, **kwargs: object) -> ServerThread:
    return ServerThread("127.0.0.1", port, data_dir=data_dir, **kwargs).start()


def test_state_survives_a_restart(tmp_path: Path) -> None:
    server = durable(tmp_path)
    store = TCPStore("127.0.0.1", server.port, timeout=10)
    store.set("k", b"v")
    store.append("k", b"w")
    assert store.add("n", 5) == 5
    store.queue_push("q", b"item")
    store.compare_set("cs", b"", b"x")
    store.multi_set(["m1", "m2"], [b"1", b"2"])
    assert store.delete_key("m2")
    store.close()
    port = server.port
    server.stop()
    again = durable(tmp_path, port)
    try:
        store = TCPStore("127.0.0.1", port, timeout=10)
        assert store.get("k") == b"vw"
        assert store.add("n", 1) == 6
        assert store.queue_pop("q") == b"item"
        assert store.multi_get(["cs", "m1"]) == [b"x", b"1"]
        assert not store.check(["m2"])
        store.close()
    finally:
        again.stop()


def test_reply_is_sent_only_after_its_writes_are_on_disk(tmp_path: Path) -> None:
    server = durable(tmp_path, fsync="never")
    try:
        c = Raw(server.port)
        # SETs have no reply: the GET's reply acknowledges them, so they must be in the log
        # file by the time it arrives.
        sets = b"".join(wire.encode_set(b"/k%d" % i, b"v%d" % i) for i in range(200))
        c.call(sets + wire.encode_key(wire.Op.GET, b"/k199"), 8 + 4)
        engine = on_disk(tmp_path)
        assert engine.num_keys() == 200 and engine.get(b"/k0") == b"v0"
        c.close()
    finally:
        server.stop()


def test_woken_waiter_sees_a_committed_write(tmp_path: Path) -> None:
    server = durable(tmp_path, fsync="never")
    try:
        waiter, writer = Raw(server.port), Raw(server.port)
        waiter.send(wire.encode_keys(wire.Op.WAIT, [b"/late"]))
        eventually(lambda: server.call(lambda s: s.engine.num_waiters()) == 1, what="parked")
        writer.send(wire.encode_set(b"/late", b"1"))  # no reply to the writer
        assert waiter.recv_exact(1) == wire.STOP_WAITING
        assert on_disk(tmp_path).get(b"/late") == b"1"
        waiter.close()
        writer.close()
    finally:
        server.stop()


def test_group_commit_one_commit_for_many_pipelined_requests(tmp_path: Path) -> None:
    server = durable(tmp_path, fsync="never")
    commits: list[int] = []
    try:
        journal = server.call(lambda s: s.journal)
        assert isinstance(journal, DurableJournal)
        inner = journal.commit

        def counting() -> None:
            commits.append(1)
            inner()

        server.call(lambda s: setattr(journal, "commit", counting))
        c = Raw(server.port)
        batch = b"".join(
            wire.encode_set(b"/g%d" % i, b"x") + wire.encode_keys(wire.Op.CHECK, [b"/g%d" % i])
            for i in range(100)
        )
        assert c.call(batch, 100) == wire.CHECK_READY * 100
        # 100 write+reply pairs: replies are held and released by a few group commits (one
        # per event-loop iteration), not one commit per request.
        assert 1 <= len(commits) <= 10
        c.close()
    finally:
        server.stop()


def test_read_only_requests_are_not_held(tmp_path: Path) -> None:
    server = durable(tmp_path)
    commits: list[int] = []
    try:
        store = TCPStore("127.0.0.1", server.port, timeout=10)
        store.set("k", b"v")
        assert store.get("k") == b"v"
        journal = server.call(lambda s: s.journal)
        assert isinstance(journal, DurableJournal)
        inner = journal.commit
        server.call(lambda s: setattr(journal, "commit", lambda: (commits.append(1), inner())))
        for _ in range(20):
            assert store.get("k") == b"v"
        assert commits == []
        store.close()
    finally:
        server.stop()


@pytest.mark.parametrize(("policy", "expect"), [("always", "each"), ("never", "none")])
def test_fsync_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str, expect: str
) -> None:
    calls: list[int] = []
    lock = threading.Lock()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        with lock:
            calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    server = durable(tmp_path, fsync=policy)
    try:
        store = TCPStore("127.0.0.1", server.port, timeout=10)
        calls.clear()
        for _ in range(10):
            store.add("n", 1)  # one reply per write: one commit each
        if expect == "each":
            assert len(calls) >= 10
        else:
            assert calls == []
        store.close()
    finally:
        server.stop()


def test_fsync_interval_bounds_the_fsync_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    server = durable(tmp_path, fsync="interval", fsync_interval=3600.0)
    try:
        store = TCPStore("127.0.0.1", server.port, timeout=10)
        for _ in range(50):
            store.add("n", 1)
        assert len(calls) <= 1  # at most one in an hour-long interval
        assert on_disk(tmp_path).get(b"/n") == b"50"  # written (survives a kill) all the same
        store.close()
    finally:
        server.stop()


def test_fsync_interval_syncs_the_last_writes_without_further_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    server = durable(tmp_path, fsync="interval", fsync_interval=2.0)
    try:
        store = TCPStore("127.0.0.1", server.port, timeout=10)
        store.add("n", 1)  # fsynced: the first commit
        store.add("n", 1)  # written, its fsync is due within 2 s
        count = len(calls)
        journal = server.call(lambda s: s.journal)
        assert isinstance(journal, DurableJournal)
        assert server.call(lambda s: journal.unsynced)
        eventually(lambda: not server.call(lambda s: journal.unsynced), timeout=10)
        assert len(calls) == count + 1
        store.close()
    finally:
        server.stop()


def test_ephemeral_and_leased_keys_do_not_survive(tmp_path: Path) -> None:
    server = durable(tmp_path)
    port = server.port
    store = TCPStore("127.0.0.1", port, timeout=10)
    store.set_ephemeral("alive", b"1")
    store.set_lease("leased", b"1", 3600)
    store.set_ephemeral("made_plain", b"1")
    store.set("made_plain", b"2")  # a plain write makes it ordinary again
    store.set("plain", b"1")
    assert store.num_keys() == 4
    server.stop()  # the connection is still open: nothing was deleted by a disconnect
    store.close()
    engine = on_disk(tmp_path)
    assert sorted(engine.list_keys()) == [b"/made_plain", b"/plain"]
    assert engine.get(b"/made_plain") == b"2"


def test_serve_data_dir_recovers_and_logs_the_key_count(tmp_path: Path) -> None:
    with rdzv_serve("--data-dir", str(tmp_path)) as (proc, port):
        store = TCPStore("127.0.0.1", port, timeout=10)
        store.multi_set(["a", "b", "c"], [b"1", b"2", b"3"])
        assert store.num_keys() == 3
        store.close()
    with rdzv_serve("--data-dir", str(tmp_path), "--fsync", "interval") as (proc, port):
        store = TCPStore("127.0.0.1", port, timeout=10)
        assert store.multi_get(["a", "b", "c"]) == [b"1", b"2", b"3"]
        store.close()
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        log = proc.stderr.read()
    assert "recovered 3 keys" in log and "fsync=interval" in log


def serve_fails(data_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run ``rdzv serve --data-dir data_dir``, which must exit with status 1 at once."""
    out = subprocess.run(
        [sys.executable, "-m", "rdzv", "serve", "--port", "0", "--data-dir", str(data_dir)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1, out
    return out


def test_serve_reports_a_corrupt_data_dir(tmp_path: Path) -> None:
    engine = Engine()
    journal = DurableJournal(tmp_path)
    journal.open(engine)
    for i in range(3):
        engine.set(b"k%d" % i, b"v")
    journal.close()
    log = next(tmp_path.glob("log-*.rdzv"))
    data = bytearray(log.read_bytes())
    data[10] ^= 0xFF  # inside the first record; valid records follow
    log.write_bytes(bytes(data))
    out = serve_fails(tmp_path)
    assert str(log) in out.stderr and "corrupt at offset 0" in out.stderr
    assert "listening" not in out.stdout


def test_serve_reports_an_unusable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = serve_fails(blocker)
    assert str(blocker) in out.stderr and "--data-dir" in out.stderr
