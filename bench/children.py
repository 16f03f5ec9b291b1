"""A benchmark's child processes: the reports of its workers over a multiprocessing pipe, and
the port a server it started listens on."""

from __future__ import annotations

import re
import subprocess
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["listening_port", "receive"]


def receive(pipe: Connection, timeout: float) -> Any:
    """The next message of a worker (seconds ``timeout``): RuntimeError if it reported a
    failure (a ``{"error": ...}`` message) or said nothing in time."""
    if not pipe.poll(timeout):
        raise RuntimeError(f"a worker said nothing for {timeout:g}s")
    message = pipe.recv()
    if isinstance(message, dict) and "error" in message:
        raise RuntimeError(f"a worker failed: {message['error']}")
    return message


def listening_port(proc: subprocess.Popen[str], what: str) -> int:
    """The port a server child prints in its ``listening on HOST:PORT`` line (``rdzv serve``,
    and the benchmarks' torch server scripts), read from its text stdout within its first 50
    lines; the child is killed and RuntimeError names ``what`` if no such line comes."""
    assert proc.stdout is not None
    for _ in range(50):
        match = re.search(r"listening on [^\s]*:(\d+)", proc.stdout.readline())
        if match:
            return int(match.group(1))
    proc.kill()
    raise RuntimeError(f"{what} did not report its port")
