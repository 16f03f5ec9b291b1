"""Process-tree facts from ``/proc`` and the Linux process controls the launcher relies on.

* :func:`process_table` reads ``/proc/<pid>/stat`` of every process (pid, parent, process
  group, session, state, start time): the basis for finding every descendant of a worker,
  including those that started their own session;
* :func:`set_child_subreaper`: ``prctl(PR_SET_CHILD_SUBREAPER)``: orphaned descendants of the
  workers are re-parented to the agent instead of init, so they stay findable and killable.

On systems without ``/proc`` or ``prctl`` (macOS), the table is empty and the controls are
no-ops; the launcher then relies on process groups alone.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = [
    "ProcInfo",
    "descendants",
    "is_alive",
    "process_table",
    "set_child_subreaper",
]

_PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class ProcInfo:
    """One process as seen in ``/proc/<pid>/stat``; ``start`` (clock ticks since boot)
    distinguishes a process from a later one that reuses its pid."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    start: int


def read_proc(pid: int) -> ProcInfo | None:
    """The stat of ``pid``, or None if it does not exist (or /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp session ..." where comm may contain spaces and ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return ProcInfo(
            pid=pid,
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            sid=int(fields[3]),
            state=fields[0].decode("ascii", "replace"),
            start=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def process_table() -> dict[int, ProcInfo]:
    """Every process currently visible in ``/proc``, by pid (empty without /proc)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return {}
    table: dict[int, ProcInfo] = {}
    for name in names:
        if name.isdigit():
            info = read_proc(int(name))
            if info is not None:
                table[info.pid] = info
    return table


def descendants(
    roots: Iterable[int], table: dict[int, ProcInfo], sessions: Iterable[int] = ()
) -> set[int]:
    """Pids of every live (non-zombie) descendant of ``roots`` plus every process in one of
    ``sessions`` or whose process group is one of them; the roots themselves excluded."""
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    root_set = set(roots)
    found: set[int] = set()
    stack = list(root_set)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found and child not in root_set:
                found.add(child)
                stack.append(child)
    session_set = set(sessions)
    if session_set:
        found.update(
            info.pid
            for info in table.values()
            if (info.sid in session_set or info.pgid in session_set) and info.pid not in root_set
        )
    return {pid for pid in found if table[pid].state != "Z"}


def is_alive(pid: int, start: int | None = None) -> bool:
    """Whether ``pid`` exists, is not a zombie and (if ``start`` is given) is still the same
    process. Falls back to ``kill(pid, 0)`` without /proc."""
    info = read_proc(pid)
    if info is None:
        if os.path.isdir("/proc/self"):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return info.state != "Z" and (start is None or info.start == start)


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn: Callable[..., int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return fn


def set_child_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux); True if it worked."""
    prctl = _prctl()
    if prctl is None:
        return False
    return prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
