"""Agent side of hang detection: read the workers' heartbeat files, name the hung, dump stacks.

Each worker of an ``rdzv run --hang-timeout S`` job gets a heartbeat file
(:mod:`rdzv.launcher.heartbeat` describes the layout). :class:`HangMonitor` maps every
file and, when :meth:`HangMonitor.check` is called (every monitor interval), notes on the
agent's monotonic clock when each worker's beat count last moved. A worker that has beaten
at least once and whose count has not moved for ``S`` seconds is hung; a worker that never
called ``rdzv.heartbeat()`` is never hung.

:func:`dump_stacks` then writes the Python stacks of the local workers to one file: with
``py-spy dump --nonblocking`` when the ``py-spy`` executable is installed (works on a
stopped process too), else by sending the worker the ``faulthandler`` signal its
``rdzv.heartbeat()`` registered and collecting what it wrote. :func:`innermost_frame` picks
the stuck frame out of a dump for the one-line report.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from rdzv.launcher.heartbeat import NO_STEP, SLOT

__all__ = ["HangMonitor", "Hung", "dump_stacks", "innermost_frame"]

#: Seconds a py-spy dump of one worker may take.
PY_SPY_TIMEOUT = 10.0
#: Seconds to wait for a worker's faulthandler to write its stacks.
FAULTHANDLER_WAIT = 2.0
#: The signal ``rdzv.heartbeat()`` registers for faulthandler dumps (``RDZV_STACKS_SIGNAL``).
STACKS_SIGNAL = signal.SIGUSR2


@dataclass(frozen=True)
class Hung:
    """A worker declared hung: its local rank, beats seen, last step (None if it never gave
    one) and the seconds since its count last moved."""

    local_rank: int
    beats: int
    last_step: int | None
    silent_for: float


class _Beat:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.map: mmap.mmap | None = None
        self.count = 0
        self.step = NO_STEP
        self.moved_at = time.monotonic()

    def read(self) -> tuple[int, int]:
        if self.map is None:
            with open(self.path, "r+b") as f:
                self.map = mmap.mmap(f.fileno(), SLOT.size)
        count, step = SLOT.unpack_from(self.map, 0)
        return int(count), int(step)


class HangMonitor:
    """Heartbeat files of the local workers (see the module docstring).

    Args:
        directory_of: local rank -> the directory where its heartbeat file is created.
        timeout: seconds without a beat (after the first) before a worker is hung.
    """

    FILE_NAME = "heartbeat"

    def __init__(self, directories: list[Path], timeout: float) -> None:
        self.timeout = timeout
        self._beats: list[_Beat] = []
        for directory in directories:
            path = directory / self.FILE_NAME
            path.write_bytes(bytes(SLOT.size))
            self._beats.append(_Beat(path))

    def path(self, local_rank: int) -> Path:
        return self._beats[local_rank].path

    def check(self, now: float | None = None, running: set[int] | None = None) -> list[Hung]:
        """The workers hung as of ``now`` (monotonic), among the local ranks in ``running``
        (default all)."""
        now = time.monotonic() if now is None else now
        hung = []
        for local_rank, beat in enumerate(self._beats):
            if running is not None and local_rank not in running:
                continue
            try:
                count, step = beat.read()
            except (OSError, ValueError):
                continue  # the file is gone: nothing to judge by
            if count != beat.count:
                beat.count, beat.step, beat.moved_at = count, step, now
                continue
            if count > 0 and now - beat.moved_at >= self.timeout:
                last = None if beat.step == NO_STEP else beat.step
                hung.append(Hung(local_rank, count, last, now - beat.moved_at))
        return hung

    def close(self) -> None:
        for beat in self._beats:
            if beat.map is not None:
                beat.map.close()
                beat.map = None


def dump_stacks(workers: list[tuple[int, int, int, Path]], out: Path) -> Path:
    """Write the Python stacks of ``workers`` (``(rank, local_rank, pid, faulthandler
    file)``) to ``out``; returns ``out``. Never raises for a worker that cannot be read (the
    file says so instead)."""
    spy = shutil.which("py-spy")
    parts = []
    for rank, local_rank, pid, fh_file in workers:
        header = f"=== rank {rank} (local rank {local_rank}, pid {pid}) ==="
        text = _py_spy(spy, pid) if spy else None
        if text is None:
            text = _faulthandler(pid, fh_file)
        parts.append(f"{header}\n{text.rstrip()}\n")
    out.write_text("\n".join(parts), "utf-8")
    return out


def _py_spy(spy: str | None, pid: int) -> str | None:
    if spy is None:
        return None
    try:
        done = subprocess.run(
            [spy, "dump", "--nonblocking", "--pid", str(pid)],
            capture_output=True,
            text=True,
            timeout=PY_SPY_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0 or "Thread " not in done.stdout:
        return None
    return "(py-spy)\n" + done.stdout


def _faulthandler(pid: int, path: Path) -> str:
    try:
        before = path.stat().st_size
    except OSError:
        before = 0
    try:
        os.kill(pid, STACKS_SIGNAL)
    except OSError as exc:
        return f"(no stacks: cannot signal pid {pid}: {exc})"
    deadline = time.monotonic() + FAULTHANDLER_WAIT
    size = before
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            now = path.stat().st_size
        except OSError:
            continue
        if now > before and now == size:  # grew, then stopped growing
            break
        size = now
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            f.seek(before)
            text = f.read()
    except OSError:
        text = ""
    if not text.strip():
        return (
            "(no stacks: py-spy is not installed and the worker did not answer "
            f"{STACKS_SIGNAL.name}; it is stopped, or it never called rdzv.heartbeat())"
        )
    return "(faulthandler)\n" + text


_SPY_FRAME = re.compile(r"^\s+(\S.*) \((.+):(\d+)\)\s*$")
_FH_FRAME = re.compile(r'^\s+File "(.+)", line (\d+) in (.+)$')


def innermost_frame(dump: str) -> str | None:
    """``"func (file.py:12)"`` of the innermost frame of the main thread in a py-spy or
    faulthandler dump (the first frame listed after the main thread's header)."""
    lines = dump.splitlines()
    start = 0
    for i, line in enumerate(lines):
        if '"MainThread"' in line or line.startswith("Current thread"):
            start = i + 1
            break
    for line in lines[start:]:
        m = _SPY_FRAME.match(line)
        if m:
            return f"{m.group(1)} ({m.group(2)}:{m.group(3)})"
        m = _FH_FRAME.match(line)
        if m:
            return f"{m.group(3)} ({m.group(1)}:{m.group(2)})"
    return None
