"""Fixtures: an in-process server thread on an ephemeral loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rdzv.server import ServerThread


@pytest.fixture
def server() -> Iterator[ServerThread]:
    thread = ServerThread("127.0.0.1", 0).start()
    try:
        yield thread
    finally:
        thread.stop()
