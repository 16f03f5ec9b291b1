"""The server's connection log under a storm of connects: a bounded number of lines."""

from __future__ import annotations

import logging
import re

import pytest

from rdzv.server import ServerThread
from rdzv.server import connection as server_module
from tests.server.helpers import Raw, eventually


def test_connection_lines_past_the_rate_are_counted_in_one_summary(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="rdzv.server")
    monkeypatch.setattr(server_module, "CONNECTION_LOG_RATE", 3)
    thread = ServerThread().start()
    clients: list[Raw] = []
    try:
        for _ in range(10):
            client = Raw(thread.port)
            client.ping()
            clients.append(client)

        def summarised() -> int:
            found = re.findall(r"(\d+) more connections opened", caplog.text)
            return sum(int(n) for n in found)

        lines = lambda: len(re.findall(r"connection from 127\.0\.0\.1:\d+ \(", caplog.text))  # noqa: E731
        eventually(lambda: lines() + summarised() == 10, what="every connect logged or counted")
        assert summarised() > 0  # ten connects within milliseconds: most were not logged alone
        assert "(10 open)" in caplog.text  # the summary names the open connections
    finally:
        for client in clients:
            client.close()
        thread.stop()
