"""torch's events API after an import swap (``torch.distributed.elastic.events`` ->
``rdzv.events``)."""

from __future__ import annotations

import json
import logging
import os
import unittest
from dataclasses import asdict
from unittest.mock import patch

from rdzv import events
from rdzv.events import (
    Event,
    EventSource,
    NodeState,
    RdzvEvent,
    construct_and_record_rdzv_event,
    get_logging_handler,
)


class RdzvEventLibTest(unittest.TestCase):
    @patch("rdzv.events.record_rdzv_event")
    @patch("rdzv.events.get_logging_handler")
    def test_construct_and_record_rdzv_event(self, get_mock: object, record_mock: object) -> None:
        get_mock.return_value = logging.StreamHandler()  # type: ignore[attr-defined]
        construct_and_record_rdzv_event(
            run_id="test_run_id", message="test_message", node_state=NodeState.RUNNING
        )
        record_mock.assert_called_once()  # type: ignore[attr-defined]

    @patch("rdzv.events.record_rdzv_event")
    @patch("rdzv.events.get_logging_handler")
    def test_construct_and_record_rdzv_event_does_not_run_if_invalid_dest(
        self, get_mock: object, record_mock: object
    ) -> None:
        get_mock.return_value = logging.NullHandler()  # type: ignore[attr-defined]
        construct_and_record_rdzv_event(
            run_id="test_run_id", message="test_message", node_state=NodeState.RUNNING
        )
        record_mock.assert_not_called()  # type: ignore[attr-defined]

    def test_records_to_listeners_with_torch_fields(self) -> None:
        seen: list[object] = []
        self.assertIsInstance(get_logging_handler("dynamic_rendezvous"), logging.NullHandler)
        remove = events.add_callback(seen.append)
        try:
            self.assertNotIsInstance(get_logging_handler("dynamic_rendezvous"), logging.NullHandler)
            construct_and_record_rdzv_event(
                run_id="run",
                message="joined",
                node_state=NodeState.SUCCEEDED,
                rank=3,
                master_endpoint="127.0.0.1:29500",
                local_id=7,
            )
        finally:
            remove()
        self.assertEqual(len(seen), 1)
        event = seen[0]
        assert isinstance(event, RdzvEvent)
        self.assertEqual(event.name, "test_events.py:test_records_to_listeners_with_torch_fields")
        self.assertEqual(
            (event.run_id, event.message, event.rank, event.local_id), ("run", "joined", 3, 7)
        )
        self.assertEqual(event.pid, os.getpid())
        self.assertTrue(event.hostname)
        self.assertEqual(event.master_endpoint, "127.0.0.1:29500")
        self.assertEqual(RdzvEvent.deserialize(event.serialize()), event)

    def test_get_logging_handler_names(self) -> None:
        self.assertIsInstance(get_logging_handler(), logging.NullHandler)
        self.assertIsInstance(get_logging_handler("console"), logging.StreamHandler)
        with self.assertRaises(KeyError):
            get_logging_handler("nope")

    def test_event_serialization_matches_torch(self) -> None:
        event = Event(name="e", source=EventSource.AGENT, metadata={"a": 1, "b": 1.0})
        self.assertEqual(str(event), json.dumps(asdict(event)))
        self.assertEqual(Event.deserialize(event.serialize()), event)
