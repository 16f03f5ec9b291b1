"""The watchdog: kills the workers' process groups if the agent dies without doing it itself.

When the agent is SIGKILLed (or crashes), nothing of it runs any more. A small helper process,
started once per agent in its own session, holds the read end of a pipe from the agent and
the list of the workers' process groups. When the pipe reaches end-of-file without the
agent's ``exit`` (the kernel closes it when the agent dies, however it dies), the helper
SIGKILLs every registered group: the workers and whatever they started in their groups.

Why not ``prctl(PR_SET_PDEATHSIG)`` in a ``preexec_fn``: a ``preexec_fn`` forces
``fork()`` instead of ``vfork()``, which runs every ``pthread_atfork`` handler of the agent in
the child; gRPC's (loaded by the etcd client) restarts threads there that ``close_fds`` then
breaks, and the child aborts before it can ``exec`` (observed: a few aborts per hundred
spawns). The death signal also reached only the direct child, not the worker's own children.

Protocol (ASCII lines on the helper's stdin): ``add <pgid> <start>`` registers a group whose
leader has ``/proc`` start time ``start`` (``-`` if unknown); ``del <pgid>`` forgets it;
``exit`` ends the helper without killing anything. A group is killed only if its leader is
gone (the group id cannot be reused while the group has members) or is still the same
process, so pid reuse cannot hit a stranger.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

__all__ = ["Watchdog"]

_log = logging.getLogger("rdzv.launcher.watchdog")

# Runs in a bare interpreter (-S -E -c): stdlib only, no rdzv import, starts in ~10 ms.
_HELPER = r"""
import os, signal, sys

def start(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2:].split()[19].decode()

groups = {}
for line in sys.stdin.buffer:
    parts = line.decode("ascii", "replace").split()
    if not parts:
        continue
    if parts[0] == "exit":
        sys.exit(0)
    if parts[0] == "add" and len(parts) == 3:
        groups[int(parts[1])] = parts[2]
    elif parts[0] == "del" and len(parts) == 2:
        groups.pop(int(parts[1]), None)
for pgid, expected in groups.items():
    now = start(pgid)
    if now is None or expected == "-" or now == expected:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
"""


class Watchdog:
    """The helper process of one agent (see the module docstring). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-S", "-E", "-c", _HELPER],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:  # the job still runs; only the SIGKILL safety net is missing
            _log.warning(
                "cannot start the watchdog helper (%s): workers may outlive a SIGKILLed agent", exc
            )

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _send(self, line: str) -> None:
        with self._lock:
            proc = self._proc
            if proc is None or proc.stdin is None:
                return
            try:
                proc.stdin.write(line.encode("ascii") + b"\n")
                proc.stdin.flush()
            except OSError as exc:
                _log.warning("the watchdog helper is gone (%s)", exc)
                self._proc = None

    def add(self, pgid: int, start: int | None) -> None:
        """Kill process group ``pgid`` if the agent dies (``start``: its leader's ``/proc``
        start time, for the pid-reuse check)."""
        self._send(f"add {pgid} {'-' if start is None else start}")

    def remove(self, pgid: int) -> None:
        self._send(f"del {pgid}")

    def close(self) -> None:
        """End the helper without killing anything (the agent cleaned up itself)."""
        self._send("exit")
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
