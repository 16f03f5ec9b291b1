"""Events: types, JSON shapes, destinations, callbacks and the environment variable."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rdzv import events
from rdzv.events import Event, EventSource, NodeState, RdzvEvent
from tests.conftest import subprocess_env


@pytest.fixture(autouse=True)
def clean_destinations() -> Iterator[None]:
    before = events.get_destinations()
    events.set_destinations(None)
    yield
    events.set_destinations(before)


def test_event_json_shape_matches_torch() -> None:
    event = Event("n", EventSource.AGENT, metadata={"a": 1, "b": 1.5})
    assert json.loads(event.serialize()) == {
        "name": "n",
        "source": "AGENT",
        "timestamp": 0,
        "metadata": {"a": 1, "b": 1.5},
    }
    assert str(event) == event.serialize()
    assert Event.deserialize(event.serialize()) == event
    assert Event.deserialize(event) is event


def test_rdzv_event_roundtrip() -> None:
    event = RdzvEvent("n", "r", "m", "h", 1, NodeState.FAILED, duration_ms=2.5)
    data = json.loads(str(event))
    assert data["node_state"] == "FAILED"
    assert data["rank"] is None and data["duration_ms"] == 2.5
    assert RdzvEvent.deserialize(str(event)) == event


def test_deserialize_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        Event.deserialize("[1]")
    with pytest.raises(KeyError):
        RdzvEvent.deserialize(
            str(RdzvEvent("n", "r", "m", "h", 1, NodeState.INIT)).replace('"INIT"', '"BOGUS"')
        )


def test_nobody_listening_records_nothing() -> None:
    assert not events.is_enabled()
    events.record_rdzv_event_fields("n", "r", "m", NodeState.INIT)  # no error, no output


def test_callbacks_receive_events_and_can_be_removed() -> None:
    seen: list[object] = []
    remove = events.add_callback(seen.append)
    assert events.is_enabled()
    events.record_rdzv_event_fields(
        "join", "run", "msg", NodeState.RUNNING, rank=3, duration_ms=1.25
    )
    remove()
    events.record_rdzv_event_fields("join", "run", "msg", NodeState.RUNNING)
    assert len(seen) == 1
    event = seen[0]
    assert isinstance(event, RdzvEvent)
    assert (event.name, event.run_id, event.rank, event.duration_ms) == ("join", "run", 3, 1.25)
    assert event.timestamp > 0 and event.pid > 0 and event.hostname


def test_failed_event_carries_the_traceback() -> None:
    seen: list[RdzvEvent] = []
    remove = events.add_callback(seen.append)  # type: ignore[arg-type]
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        events.record_rdzv_event_fields("x", "r", "failed", NodeState.FAILED)
    finally:
        remove()
    assert "RuntimeError: boom" in seen[0].error_trace


def test_jsonl_destination(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    events.set_destinations(f"jsonl:{path}")
    events.record(Event("a", EventSource.WORKER))
    events.record_rdzv_event(RdzvEvent("b", "r", "m", "h", 1, NodeState.SUCCEEDED))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["name"] for line in lines] == ["a", "b"]
    assert lines[0]["timestamp"] > 0


def test_console_and_logging_destinations(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    events.set_destinations("console,logging")
    with caplog.at_level("INFO", logger="rdzv.events"):
        events.record(Event("c", EventSource.AGENT))
    assert '"name": "c"' in capsys.readouterr().err
    assert any('"name": "c"' in r.getMessage() for r in caplog.records)


def test_explicit_destination_argument(capsys: pytest.CaptureFixture[str]) -> None:
    events.record(Event("d", EventSource.AGENT), destination="console")
    assert '"name": "d"' in capsys.readouterr().err
    events.record(Event("e", EventSource.AGENT), destination="null")
    assert capsys.readouterr().err == ""


def test_unknown_destination_is_refused_and_changes_nothing() -> None:
    events.set_destinations("console")
    with pytest.raises(ValueError, match="unknown event destination 'bogus'"):
        events.set_destinations("console,bogus")
    assert events.get_destinations() == ["console"]


def test_broken_callback_does_not_propagate(caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: object) -> None:
        raise RuntimeError("listener bug")

    remove = events.add_callback(broken)
    try:
        events.record(Event("f", EventSource.AGENT))
    finally:
        remove()
    assert "listener bug" in caplog.text


def test_environment_variable_sets_destinations(tmp_path: Path) -> None:
    path = tmp_path / "env.jsonl"
    code = (
        "from rdzv import events\n"
        "events.record_rdzv_event_fields('env', 'r', 'm', events.NodeState.INIT)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(RDZV_EVENTS=f"jsonl:{path}"),
        check=True,
        timeout=60,
    )
    assert json.loads(path.read_text())["name"] == "env"
