"""Process helpers for launcher tests: /proc scans (no psutil) and bounded waits."""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def alive_with_marker(marker: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line contains ``marker``."""
    needle = marker.encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
        if needle in cmdline and state != b"Z" and int(name) != os.getpid():
            found.append(int(name))
    return found


def wait_for(condition: Callable[[], bool], timeout: float, what: str = "condition") -> None:
    """Poll ``condition`` every 10 ms until true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
