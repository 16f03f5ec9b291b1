"""A full disk under ``rdzv serve --data-dir`` (issue 16, item 1): a write whose commit failed
is never acknowledged, writes are refused (rdzv clients: a read-only error; torch clients:
their connection is closed) until a commit succeeds again, logged once, and nothing
acknowledged is lost.

The disk fills through RLIMIT_FSIZE on the server process (writes past the limit fail with
EFBIG; Python ignores SIGXFSZ), raised again with prlimit to "free space"."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rdzv import wire
from rdzv.engine import Engine
from rdzv.errors import NetworkError, StoreError
from rdzv.server.persistence import recover
from rdzv.store.tcp import TCPStore
from tests.conftest import subprocess_env
from tests.server.helpers import Raw

LIMIT = 64 * 1024  # bytes the server may write to a file
VALUE = b"v" * 1000


@contextlib.contextmanager
def serve_with_file_limit(data_dir: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))

    proc = subprocess.Popen(
        # fsync never: a loaded machine's slow fsync must not pass for a held reply.
        [
            sys.executable,
            "-m",
            "rdzv",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
            "--fsync",
            "never",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        preexec_fn=limit,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        yield proc, int(line.rsplit(":", 1)[1])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def free_space(pid: int) -> None:
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def held(conn: Raw, n: int, timeout: float) -> bytes | None:
    """``n`` reply bytes, or None if none arrive within ``timeout`` (the reply is held)."""
    try:
        return conn.recv_exact(n, timeout=timeout)
    except TimeoutError:
        return None


@pytest.mark.timeout(60)
def test_full_disk_acknowledges_nothing_unwritten_and_refuses_writes(tmp_path: Path) -> None:
    with serve_with_file_limit(tmp_path) as (proc, port):
        # A torch-protocol writer: SETs (no reply), every 10th followed by a GET whose
        # reply acknowledges them. It writes until a GET's reply does not come.
        writer = Raw(port)
        acked = 0
        waiting = None
        for i in range(0, 10 * LIMIT // len(VALUE), 10):
            batch = b"".join(wire.encode_set(b"/k%d" % j, VALUE) for j in range(i, i + 10))
            writer.send(batch + wire.encode_key(wire.Op.GET, b"/k%d" % (i + 9)))
            reply = held(writer, 8 + len(VALUE), timeout=2.0)
            if reply is None:
                waiting = i + 10  # its commit failed: the reply must not come yet
                break
            assert reply == wire.reply_blob(VALUE)
            acked = i + 10
        assert waiting is not None, "the file size limit was never reached"
        assert acked * len(VALUE) < LIMIT

        # Read-only: an rdzv client's write gets an error saying why; reads wait.
        store = TCPStore("127.0.0.1", port, timeout=5, reconnect=False)
        with pytest.raises(StoreError, match=r"read-only: the disk is full"):
            store.add("counter", 1)
        # rdzv's set uses torch's opcode, which has no error reply either: the connection is
        # closed, the replay after reconnecting too; the new handshake said read-only.
        setter = TCPStore("127.0.0.1", port, timeout=5)
        setter.set("refused", b"1")
        with pytest.raises(NetworkError, match=r"the store is read-only: its server cannot"):
            setter.check(["refused"])
        setter.close()
        # A torch client's write has no error reply: its connection is closed.
        torch_writer = Raw(port)
        torch_writer.send(wire.encode_set(b"/refused", b"1"))
        torch_writer.assert_closed()
        assert held(writer, 1, timeout=0.5) is None  # still nothing acknowledged

        # Space again: the kept commit is written, the held reply released, writes accepted.
        free_space(proc.pid)
        assert held(writer, 8 + len(VALUE), timeout=10) == wire.reply_blob(VALUE)
        acked = waiting
        assert store.add("counter", 1) == 1
        store.close()
        writer.close()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert proc.stderr is not None
        log = proc.stderr.read()
    assert log.count("the store is read-only: the disk is full") >= 1
    assert log.count("retrying every") == 1, log  # logged once, not per request or retry
    assert log.count("writable again") == 1, log
    engine = Engine()
    recover(tmp_path, engine)
    for i in range(acked):
        assert engine.get(b"/k%d" % i) == VALUE, f"acknowledged write {i} of {acked} lost"
    assert engine.get(b"/counter") == b"1" and engine.get(b"/refused") is None


@pytest.mark.timeout(60)
def test_writes_without_a_reply_are_not_acknowledged_by_a_later_reply(tmp_path: Path) -> None:
    """The issue's loss: a commit that failed while no reply waited dropped its records, and
    the next reply acknowledged them anyway."""
    with serve_with_file_limit(tmp_path) as (proc, port):
        writer = Raw(port)
        writes = 2 * LIMIT // len(VALUE)
        with contextlib.suppress(OSError):  # the server may close it: a refused write
            for i in range(writes):
                writer.send(wire.encode_set(b"/w%d" % i, VALUE))
            writer.send(wire.encode_keys(wire.Op.GETNUMKEYS, []))
        try:
            reply = held(writer, 8, timeout=1.0)
        except (ConnectionError, OSError):
            reply = b""  # closed: its last writes were refused, nothing acknowledged
        assert reply in (None, b""), "a reply acknowledged writes that are not on disk"
        free_space(proc.pid)
        count = None
        if reply is None:
            count = int.from_bytes(writer.recv_exact(8, timeout=10), "little", signed=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    engine = Engine()
    recover(tmp_path, engine)
    assert engine.num_keys() < writes  # the disk did fill
    if count is not None:
        assert engine.num_keys() >= count


def test_a_failed_commit_is_undone_and_written_again(tmp_path: Path) -> None:
    """The journal alone: a failing write leaves no partial commit in the log, keeps its
    records and writes them with the next commit."""
    from rdzv.server.persistence import DurableJournal

    engine = Engine()
    journal = DurableJournal(tmp_path, fsync="never")
    journal.open(engine)
    engine.set(b"a", b"1")
    journal.commit()
    size = (tmp_path / "log-0000000000.rdzv").stat().st_size
    real_write = os.write
    calls = []

    def failing(fd: int, data: bytes | memoryview) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:10]))  # a partial write, then the disk is full
        raise OSError(28, "No space left on device")

    engine.set(b"b", b"2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "write", failing)
        with pytest.raises(OSError):
            journal.commit()
    assert journal.failed is not None and journal.dirty
    assert (tmp_path / "log-0000000000.rdzv").stat().st_size == size  # undone
    journal.commit()
    assert journal.failed is None and not journal.dirty
    journal.close()
    again = Engine()
    recover(tmp_path, again)
    assert dict(again.items()) == {b"a": b"1", b"b": b"2"}


def test_a_failed_interval_fsync_refuses_writes_until_an_fsync_succeeds(tmp_path: Path) -> None:
    from rdzv.server.persistence import DurableJournal

    engine = Engine()
    journal = DurableJournal(tmp_path, fsync="interval", fsync_interval=3600.0)
    journal.open(engine)
    engine.set(b"a", b"1")
    journal.commit()  # the first commit fsyncs
    engine.set(b"b", b"2")
    journal.commit()  # written; its fsync is due within the interval
    assert journal.unsynced
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")))
        with pytest.raises(OSError):
            journal.sync()
        assert journal.failed is not None
        with pytest.raises(OSError):
            journal.commit()  # nothing buffered: probes with an fsync, which fails
    journal.commit()
    assert journal.failed is None
    journal.close()


def test_a_snapshot_that_cannot_open_its_new_log_is_retried_by_the_next_commit(
    tmp_path: Path,
) -> None:
    from rdzv.server.persistence import DurableJournal

    engine = Engine()
    journal = DurableJournal(tmp_path, fsync="never", snapshot_bytes=1 << 30)
    journal.open(engine)
    engine.set(b"a", b"1")
    journal.commit()
    real_open = os.open

    def no_new_log(path: str, flags: int, mode: int = 0o777) -> int:
        if str(path).endswith("log-0000000001.rdzv"):
            raise OSError(24, "Too many open files")
        return real_open(path, flags, mode)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "open", no_new_log)
        with pytest.raises(OSError):
            journal.snapshot()  # renamed into place, but its log cannot be opened
        engine.set(b"b", b"2")
        with pytest.raises(OSError):
            journal.commit()  # not acknowledged: the records stay
        assert journal.failed is not None and journal.dirty
    journal.commit()  # opens the new log and writes them
    assert journal.failed is None and not journal.dirty
    journal.close()
    again = Engine()
    recover(tmp_path, again)
    assert dict(again.items()) == {b"a": b"1", b"b": b"2"}
