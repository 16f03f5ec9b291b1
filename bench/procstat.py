"""A process's CPU time and memory from Linux's /proc (benchmarks measure their servers)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cpu_ns", "cpu_seconds", "memory_bytes", "user_seconds"]

_TICK = os.sysconf("SC_CLK_TCK")


def _ticks(pid: int) -> tuple[int, int]:
    """(user, system) clock ticks of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (clock-tick resolution)."""
    return sum(_ticks(pid)) / _TICK


def user_seconds(pid: int) -> float:
    """User-mode CPU seconds of process ``pid`` so far (its own code, not the kernel's on
    its behalf; clock-tick resolution)."""
    return _ticks(pid)[0] / _TICK


def memory_bytes(pid: int, field: str = "VmRSS") -> int:
    """``field`` of /proc/PID/status in bytes: ``VmRSS`` (resident now) or ``VmHWM``
    (peak resident). KeyError if the process has no such field."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def cpu_ns(pid: int) -> int:
    """CPU nanoseconds (user + system) of the threads of process ``pid`` alive now, from the
    scheduler's per-thread accounting (``/proc/PID/task/*/schedstat``): nanosecond
    resolution where :func:`cpu_seconds` has clock ticks (10 ms), for short measurements;
    threads that already exited are not counted."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # the thread just exited
            continue
    return total
