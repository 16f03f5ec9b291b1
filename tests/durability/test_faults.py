"""Fault injection on the durable store: corrupt and torn files, recovery reports and their
cost, a second server on one directory, bad durability flags (issue 16).

The full-disk and non-reading-client faults are in tests/durability/test_disk_full.py and
tests/durability/test_output_bounds.py."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from rdzv.engine import Engine
from rdzv.errors import StoreError
from rdzv.server import persistence
from rdzv.server.persistence import DurableJournal, recover
from tests.conftest import subprocess_env
from tests.server.helpers import rdzv_serve


def journaled(data_dir: Path, **options: object) -> tuple[Engine, DurableJournal]:
    engine = Engine()
    journal = DurableJournal(data_dir, **options)  # type: ignore[arg-type]
    journal.open(engine)
    return engine, journal


def fill(data_dir: Path, keys: int, per_commit: int = 1, **options: object) -> None:
    """``keys`` keys ``k<i>`` = ``v<i>``, ``per_commit`` sets per commit."""
    engine, journal = journaled(data_dir, **options)
    for i in range(keys):
        engine.set(b"k%d" % i, b"v%d" % i)
        if (i + 1) % per_commit == 0:
            journal.commit()
    journal.close()


def serve(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``rdzv serve --data-dir`` that is expected to exit at once (bounded)."""
    return subprocess.run(
        [sys.executable, "-m", "rdzv", "serve", "--port", "0", "--data-dir", str(data_dir), *extra],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def snapshot_of(data_dir: Path) -> Path:
    (snapshot,) = data_dir.glob("snapshot-*.rdzv")
    return snapshot


def log_of(data_dir: Path) -> Path:
    (log,) = data_dir.glob("log-*.rdzv")
    return log


# ----------------------------------------------------------------------- corrupt snapshots


@pytest.mark.parametrize("where", ["flipped byte", "bad magic"])
def test_a_corrupt_snapshot_refuses_to_start(tmp_path: Path, where: str) -> None:
    fill(tmp_path, 221, per_commit=20, snapshot_bytes=2048)
    snapshot = snapshot_of(tmp_path)
    offset = snapshot.stat().st_size // 2 if where == "flipped byte" else 0
    flip(snapshot, offset)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = serve(tmp_path)
    assert out.returncode == 1, out
    assert "listening" not in out.stdout
    assert str(snapshot) in out.stderr and "corrupt at offset" in out.stderr
    assert "--recover=discard-corrupt" in out.stderr and "bytes" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing touched


def test_discard_corrupt_keeps_the_intact_part_and_says_what_is_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill(tmp_path, 221, per_commit=20, snapshot_bytes=2048)
    whole = Engine()
    recover(tmp_path, whole)
    snapshot = snapshot_of(tmp_path)
    flip(snapshot, snapshot.stat().st_size // 2)
    engine = Engine()
    caplog.set_level(logging.WARNING, "rdzv.server.persistence")
    journal = DurableJournal(tmp_path, recovery="discard-corrupt")
    result = journal.open(engine)
    journal.close()
    # The snapshot's records before the damage plus the whole log: fewer keys, none wrong.
    assert 0 < engine.num_keys() < whole.num_keys()
    for key, value in engine.items():
        assert whole.get(key) == value
    assert result.dropped_records == whole.num_keys() - engine.num_keys()
    assert result.dropped_bytes > 0 and str(snapshot) in result.losses[0]
    assert [p.name for p in result.set_aside] == [snapshot.name + ".corrupt"]
    assert "discarded damaged data" in caplog.text
    # A fresh snapshot was written: the next start is clean and has the same state.
    again = Engine()
    assert not recover(tmp_path, again).losses
    assert dict(again.items()) == dict(engine.items())


def test_an_older_snapshot_with_its_logs_still_reaches_the_last_state(tmp_path: Path) -> None:
    engine, journal = journaled(tmp_path, snapshot_bytes=1 << 30)
    for i in range(50):
        engine.set(b"a%d" % i, b"1")
    journal.commit()
    journal.snapshot()  # generation 1
    for i in range(50):
        engine.set(b"b%d" % i, b"2")
    journal.commit()
    kept = {p.name: p.read_bytes() for p in tmp_path.glob("*-0000000001.rdzv")}
    journal.snapshot()  # generation 2 (removes generation 1, as after a crash it may not)
    engine.set(b"c", b"3")
    journal.commit()
    expected = dict(engine.items())
    journal.close()
    for name, data in kept.items():
        (tmp_path / name).write_bytes(data)
    flip(tmp_path / "snapshot-0000000002.rdzv", 30)
    again = Engine()
    result = recover(tmp_path, again)
    assert dict(again.items()) == expected
    assert result.rewrite and result.dropped_records == 0


def test_a_missing_log_before_the_last_refuses(tmp_path: Path) -> None:
    fill(tmp_path, 10)
    (tmp_path / "log-0000000003.rdzv").write_bytes(b"")  # a generation without snapshot
    with pytest.raises(StoreError, match=r"snapshot-0000000003.rdzv is missing"):
        recover(tmp_path, Engine())


def test_a_deleted_snapshot_refuses_to_start(tmp_path: Path) -> None:
    fill(tmp_path, 221, per_commit=20, snapshot_bytes=2048)
    snapshot = snapshot_of(tmp_path)
    snapshot.unlink()
    with pytest.raises(StoreError, match=rf"{snapshot.name} is missing"):
        recover(tmp_path, Engine())


# ----------------------------------------------------------------------- damaged logs


def test_a_log_of_random_bytes_is_refused_not_emptied(tmp_path: Path) -> None:
    log = tmp_path / "log-0000000000.rdzv"
    log.write_bytes(os.urandom(64 * 1024))
    out = serve(tmp_path)
    assert out.returncode == 1, out
    assert f"{log} is corrupt at offset 0" in out.stderr
    assert "65536 bytes" in out.stderr and "--recover=discard-corrupt" in out.stderr
    assert log.stat().st_size == 64 * 1024


def test_a_zeroed_tail_is_refused_and_every_loss_counted(tmp_path: Path) -> None:
    fill(tmp_path, 300, per_commit=5)
    log = log_of(tmp_path)
    data = log.read_bytes()
    zero_from = len(data) - 4096
    log.write_bytes(data[:zero_from] + bytes(4096))
    with pytest.raises(StoreError, match=r"corrupt at offset \d+.*4\d\d\d bytes"):
        recover(tmp_path, Engine())
    engine = Engine()
    result = recover(tmp_path, engine, discard_corrupt=True)
    # Whole commits before the damage are kept; every byte from the damaged one is counted.
    kept = engine.num_keys()
    assert kept % 5 == 0 and kept < 300
    assert result.dropped_bytes == len(data) - _offset_of_commit(data, kept // 5)
    assert result.dropped_bytes >= 4096


def _offset_of_commit(data: bytes, index: int) -> int:
    """File offset of the ``index``-th commit of an intact log."""
    at = 0
    for _ in range(index):
        header = persistence._commit_at(data, at)
        assert header is not None
        at += persistence._COMMIT_SIZE + header[0]
    return at


def test_a_torn_last_commit_is_dropped_whole_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine, journal = journaled(tmp_path)
    engine.set(b"acked", b"1")
    journal.commit()
    good = log_of(tmp_path).stat().st_size
    for i in range(135):
        engine.set(b"unacked%d" % i, b"x" * 20)
    journal.commit()
    journal.close()
    log = log_of(tmp_path)
    with open(log, "r+b") as f:
        f.truncate(log.stat().st_size - 100)  # the crash cut the last commit short
    torn = log.stat().st_size
    caplog.set_level(logging.WARNING, "rdzv.server.persistence")
    again = Engine()
    result = recover(tmp_path, again)
    assert dict(again.items()) == {b"acked": b"1"}
    assert result.dropped_records == 135 and result.dropped_bytes == torn - good
    assert log.stat().st_size == good
    assert "unfinished commit at offset" in caplog.text and "(135 records)" in caplog.text


def test_a_torn_commit_header_is_dropped(tmp_path: Path) -> None:
    fill(tmp_path, 3)
    log = log_of(tmp_path)
    good = log.stat().st_size
    with open(log, "ab") as f:
        f.write(b"\x01\x02\x03\x04\x21\x00")  # the first bytes of a commit header
    engine = Engine()
    assert recover(tmp_path, engine).dropped_bytes == 6
    assert engine.num_keys() == 3 and log.stat().st_size == good


def test_damage_followed_by_commits_is_refused(tmp_path: Path) -> None:
    fill(tmp_path, 30, per_commit=3)
    log = log_of(tmp_path)
    flip(log, persistence._COMMIT_SIZE + 12)  # a record of the first commit
    with pytest.raises(StoreError, match=r"corrupt at offset 0: the record at offset"):
        recover(tmp_path, Engine())
    engine = Engine()
    result = recover(tmp_path, engine, discard_corrupt=True)
    assert engine.num_keys() == 0  # nothing before the damage; later commits depend on it
    assert result.dropped_records == 30


# ----------------------------------------------------------------------- recovery cost


class CountingCrc:
    """Stands in for the zlib module in rdzv.server.persistence: counts the bytes checksummed."""

    def __init__(self) -> None:
        self.bytes = 0

    def crc32(self, data: bytes) -> int:
        self.bytes += len(data)
        return zlib.crc32(data)


def hostile_value(size: int) -> bytes:
    """Client-chosen bytes that look like record and commit headers everywhere: every 41
    bytes a fake commit header (right length, op and magic, wrong checksum), then a fake
    record header claiming to run almost to the end of the value."""
    fake_commit = b"\x00\x00\x00\x00" + persistence._COMMIT_NEEDLE + bytes(20)
    unit = fake_commit + b"\x00\x00\x00\x00" + (size - 64).to_bytes(4, "little") + b"\x01"
    return (unit * (size // len(unit) + 1))[:size]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("damage", ["torn", "middle"])
def test_recovery_is_linear_whatever_the_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    size = 8 * 1024 * 1024
    engine, journal = journaled(tmp_path, snapshot_bytes=1 << 30)
    engine.set(b"big", hostile_value(size))
    journal.commit()
    if damage == "middle":
        engine.set(b"after", b"1")
        journal.commit()
    journal.close()
    log = log_of(tmp_path)
    if damage == "torn":
        with open(log, "r+b") as f:
            f.truncate(log.stat().st_size - size // 2)
    else:
        flip(log, 10)  # the first commit's header
    counter = CountingCrc()
    monkeypatch.setattr(persistence, "zlib", SimpleNamespace(crc32=counter.crc32))
    length = log.stat().st_size
    if damage == "torn":
        assert recover(tmp_path, Engine()).dropped_bytes == length
    else:
        with pytest.raises(StoreError, match="corrupt at offset 0"):
            recover(tmp_path, Engine())
    # Linear: every byte is checksummed at most about once (the old resync scan
    # checksummed O(size^2) bytes for such content and took minutes).
    assert counter.bytes <= 2 * length


# ----------------------------------------------------------------------- one directory, one server


def test_a_second_server_on_the_same_directory_exits_naming_the_holder(tmp_path: Path) -> None:
    with rdzv_serve("--data-dir", str(tmp_path)) as (first, _port):
        out = serve(tmp_path)
        assert out.returncode == 1, out
        assert f"pid {first.pid}" in out.stderr and "in use by another server" in out.stderr
        assert "listening" not in out.stdout
    # Released with the first server: the directory is usable again.
    with rdzv_serve("--data-dir", str(tmp_path)):
        pass


def test_the_lock_is_per_directory_in_one_process_too(tmp_path: Path) -> None:
    _, journal = journaled(tmp_path / "a")
    with pytest.raises(StoreError, match=rf"pid {os.getpid()}"):
        journaled(tmp_path / "a")
    journaled(tmp_path / "b")[1].close()
    journal.close()
    journaled(tmp_path / "a")[1].close()
    shutil.rmtree(tmp_path / "a")


# ----------------------------------------------------------------------- flags


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_bad_fsync_interval_is_rejected(tmp_path: Path, value: str) -> None:
    out = serve(tmp_path, "--fsync", "interval", f"--fsync-interval={value}")
    assert out.returncode == 2, out
    assert "--fsync-interval must be a number of seconds > 0" in out.stderr
    with pytest.raises(ValueError, match="fsync_interval"):
        DurableJournal(tmp_path, fsync_interval=float(value))
