"""Durable journal: recovery, torn tails, corruption, snapshots, and a real kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdzv.engine import Engine
from rdzv.errors import StoreError
from rdzv.server.persistence import DurableJournal, recover
from tests.conftest import subprocess_env


def state(engine: Engine) -> tuple[dict[bytes, bytes], dict[bytes, list[bytes]]]:
    return dict(engine.items()), {k: list(v) for k, v in engine.queues()}


def journaled(data_dir: Path, **options: object) -> tuple[Engine, DurableJournal]:
    engine = Engine()
    journal = DurableJournal(data_dir, **options)  # type: ignore[arg-type]
    journal.open(engine)
    return engine, journal


def reopen(data_dir: Path) -> Engine:
    engine = Engine()
    recover(data_dir, engine)
    return engine


def test_every_kind_of_change_survives(tmp_path: Path) -> None:
    engine, journal = journaled(tmp_path)
    engine.set(b"a", b"1")
    engine.append(b"a", b"2")
    engine.add(b"c", 5)
    engine.compare_set(b"cs", b"", b"x")
    engine.compare_set(b"cs", b"x", b"y")
    engine.set(b"gone", b"1")
    engine.delete_key(b"gone")
    engine.queue_push(b"q", b"1")
    engine.queue_push(b"q", b"2")
    engine.queue_pop(b"q")
    engine.barrier(b"b", 3, lambda w: None)
    journal.commit()
    expected = state(engine)
    journal.close()
    assert state(reopen(tmp_path)) == expected
    assert expected[0][b"a"] == b"12" and expected[1] == {b"q": [b"2"]}


def test_uncommitted_records_are_not_on_disk(tmp_path: Path) -> None:
    engine, journal = journaled(tmp_path)
    engine.set(b"acked", b"1")
    journal.commit()
    engine.set(b"not-acked", b"1")  # buffered, never committed: like a crash before reply
    assert state(reopen(tmp_path))[0] == {b"acked": b"1"}


def test_torn_tail_is_dropped_and_truncated(tmp_path: Path) -> None:
    engine, journal = journaled(tmp_path)
    engine.set(b"k", b"v")
    journal.commit()
    journal.close()
    log = next(tmp_path.glob("log-*.rdzv"))
    good_size = log.stat().st_size
    with open(log, "ab") as f:
        f.write(b"\x01\x02\x03\x04\x40\x00")  # half a header of a record being written
    assert state(reopen(tmp_path))[0] == {b"k": b"v"}
    assert log.stat().st_size == good_size


def test_corruption_in_the_middle_is_reported(tmp_path: Path) -> None:
    engine, journal = journaled(tmp_path)
    for i in range(3):
        engine.set(f"k{i}".encode(), b"value")
    journal.commit()
    journal.close()
    log = next(tmp_path.glob("log-*.rdzv"))
    data = bytearray(log.read_bytes())
    data[12] ^= 0xFF  # inside the first record's payload
    log.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"corrupt at offset 0.*--recover=discard-corrupt"):
        reopen(tmp_path)


def test_snapshots_rotate_and_recover(tmp_path: Path) -> None:
    engine, journal = journaled(tmp_path, fsync="never", snapshot_bytes=2048)
    for i in range(500):
        engine.set(f"k{i % 50}".encode(), str(i).encode())
        engine.queue_push(b"q", str(i).encode())
        if i % 3 == 0:
            engine.queue_pop(b"q")
        journal.commit()
    expected = state(engine)
    journal.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len([n for n in names if n.startswith("snapshot-")]) == 1
    assert len([n for n in names if n.startswith("log-")]) == 1
    assert state(reopen(tmp_path)) == expected


def test_bad_policy_and_unusable_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fsync policy"):
        DurableJournal(tmp_path, fsync="sometimes")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot use data directory"):
        DurableJournal(blocker / "sub").open(Engine())


OPS = st.lists(
    st.tuples(
        st.sampled_from(["set", "append", "add", "delete", "push", "pop", "cas"]),
        st.sampled_from([b"a", b"b", b""]),
        st.sampled_from([b"", b"1", b"xy"]),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=OPS)
def test_replay_equals_live_state(tmp_path_factory: pytest.TempPathFactory, ops: list) -> None:  # type: ignore[type-arg]
    data_dir = tmp_path_factory.mktemp("journal")
    engine, journal = journaled(data_dir, fsync="never", snapshot_bytes=300)
    for op, key, value in ops:
        try:
            if op == "set":
                engine.set(key, value)
            elif op == "append":
                engine.append(key, value)
            elif op == "add":
                engine.add(key, 3)
            elif op == "delete":
                engine.delete_key(key)
            elif op == "push":
                engine.queue_push(key, value)
            elif op == "pop":
                engine.queue_pop(key)
            else:
                engine.compare_set(key, value, b"new")
        except ValueError:
            pass  # add on a non-integer: no change, nothing journaled
        journal.commit()
    expected = state(engine)
    journal.close()
    assert state(reopen(data_dir)) == expected


WRITER = """
import sys
from rdzv.engine import Engine
from rdzv.server.persistence import DurableJournal
engine = Engine()
journal = DurableJournal(sys.argv[1], fsync=sys.argv[2])
journal.open(engine)
for i in range(1_000_000):
    engine.set(f"k{i}".encode(), str(i).encode())
    engine.add(b"count", 1)
    journal.commit()
    print(i, flush=True)  # the acknowledgement, sent only after commit
"""


@pytest.mark.parametrize("policy", ["always", "never"])
def test_kill_9_keeps_every_acknowledged_write(tmp_path: Path, policy: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), policy],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    assert proc.stdout is not None
    acked = -1
    for line in proc.stdout:
        acked = int(line)
        if acked >= 2000:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    for line in proc.stdout:  # acknowledgements already in the pipe also count
        acked = int(line)
    values, _ = state(reopen(tmp_path))
    for i in range(acked + 1):
        assert values[f"k{i}".encode()] == str(i).encode()
    assert int(values[b"count"]) >= acked + 1
