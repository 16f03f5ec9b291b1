"""FailureRecord: the JSON form and its place in the round's store."""

from __future__ import annotations

import pytest

from rdzv.launcher.failures import (
    FailureRecord,
    WorkerFailure,
    publish,
    read_failure_log,
    read_root_cause,
    root_cause_key,
)
from rdzv.store.hash import HashStore


def _worker_failure(returncode: int, rank: int = 3) -> WorkerFailure:
    return WorkerFailure(
        rank=rank,
        local_rank=1,
        group_rank=1,
        pid=4242,
        returncode=returncode,
        exit_time=1_700_000_000.0,
        run_time=2.5,
        restart_count=0,
        host="nodeB",
        stderr_tail=["Traceback (most recent call last):", "ValueError: boom"],
    )


def test_record_round_trips_through_json() -> None:
    record = FailureRecord(
        kind="hang",
        node_rank=1,
        host="h",
        rank=2,
        local_rank=0,
        pid=7,
        last_step=41,
        frame="train.py:12 in step",
        message="x",
    )
    assert FailureRecord.from_json(record.to_json()) == record
    assert FailureRecord.from_json(record.to_json().encode()) == record


def test_from_json_ignores_unknown_fields_and_rejects_garbage() -> None:
    raw = '{"kind":"lost","node_rank":2,"host":"h","future_field":1}'
    assert FailureRecord.from_json(raw).kind == "lost"
    with pytest.raises(ValueError, match="invalid JSON"):
        FailureRecord.from_json("{nope")
    with pytest.raises(ValueError, match="not a JSON object"):
        FailureRecord.from_json("[1]")
    with pytest.raises(ValueError, match="kind"):
        FailureRecord.from_json('{"kind":"sad","node_rank":0,"host":"h"}')
    with pytest.raises(ValueError, match="not a failure record"):
        FailureRecord.from_json('{"kind":"exit"}')


def test_from_failure_exit_and_signal() -> None:
    record = FailureRecord.from_failure(_worker_failure(3), "ns")
    assert (record.kind, record.exit_code, record.signal, record.rank) == ("exit", 3, None, 3)
    assert record.message == "Traceback (most recent call last):\nValueError: boom"
    line = record.describe()
    assert line.startswith("root cause: rank 3 on node 1 (nodeB): exit code 3 (pid 4242")
    killed = FailureRecord.from_failure(_worker_failure(-9))
    assert (killed.kind, killed.exit_code, killed.signal) == ("signal", 137, "SIGKILL")
    assert "signal SIGKILL (exit code 137)" in killed.describe()


def test_message_is_capped() -> None:
    record = FailureRecord(kind="exit", node_rank=0, host="h", message="x" * 10_000)
    assert record.message is not None and len(record.message) == 2000


def test_publish_first_writer_wins_and_log_keeps_all() -> None:
    store = HashStore()
    assert read_root_cause(store, "rdzv.agent/0") is None
    assert read_failure_log(store) == []
    first = FailureRecord.from_failure(_worker_failure(3, rank=3))
    second = FailureRecord.from_failure(_worker_failure(1, rank=2))
    assert publish(store, "rdzv.agent/0", first) == first
    assert publish(store, "rdzv.agent/0", second) == first  # the earlier one stays
    assert read_root_cause(store, "rdzv.agent/0") == first
    assert [r.rank for r in read_failure_log(store)] == [3, 2]
    assert store.check([root_cause_key("rdzv.agent/0")])
    # Another generation has its own root cause.
    assert publish(store, "rdzv.agent/1", second).rank == 2
