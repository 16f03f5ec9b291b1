"""Bounded fuzzing (a few hundred examples each); the long run is
``python -m tests.fuzz.run --examples N`` (docs/security.md, "Fuzzing")."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz.harness import (
    LiveServer,
    check_reply_decoders,
    check_request_parser,
    reply_streams,
    request_streams,
)


@settings(max_examples=400, deadline=None)
@given(request_streams())
def test_request_parser(case: tuple[bytes, list[int]]) -> None:
    check_request_parser(*case)
    check_request_parser(*case, extensions=False)


@settings(max_examples=400, deadline=None)
@given(reply_streams())
def test_reply_decoders(case: tuple[bytes, list[int], list[int]]) -> None:
    check_reply_decoders(*case)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    server = LiveServer()
    yield server
    server.close()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request_streams())
def test_live_server(live: LiveServer, case: tuple[bytes, list[int]]) -> None:
    live.feed(*case)
