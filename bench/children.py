"""Reports from a benchmark's worker processes over a multiprocessing pipe."""

from __future__ import annotations

from multiprocessing.connection import Connection
from typing import Any

__all__ = ["receive"]


def receive(pipe: Connection, timeout: float) -> Any:
    """The next message of a worker (seconds ``timeout``): RuntimeError if it reported a
    failure (a ``{"error": ...}`` message) or said nothing in time."""
    if not pipe.poll(timeout):
        raise RuntimeError(f"a worker said nothing for {timeout:g}s")
    message = pipe.recv()
    if isinstance(message, dict) and "error" in message:
        raise RuntimeError(f"a worker failed: {message['error']}")
    return message
