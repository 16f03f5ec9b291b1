"""What went wrong: one :class:`WorkerFailure` per failed worker and the summary the agent
prints when the job fails.

The summary names the root cause, the *first* worker to fail in time (not the lowest rank),
with its exit code or signal, pid, host, run time, the message from its error file (torch's
``TORCHELASTIC_ERROR_FILE``, written by ``torch.distributed.elastic.multiprocessing.errors.
record``) when there is one, and the last lines of its stderr. Other failures follow, one
line each.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["WorkerFailure", "describe_exit", "format_summary", "read_error_file"]

_RULE = "=" * 72
_THIN = "-" * 72


def describe_exit(returncode: int) -> str:
    """``"exit code 3"`` or ``"signal SIGKILL (9)"`` for a Popen return code."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "signal"
        return f"signal {name} ({-returncode})"
    return f"exit code {returncode}"


def read_error_file(path: Path) -> str | None:
    """The message in a torch error file (``{"message": {"message": ...}}`` or
    ``{"message": "..."}``), or None if the file is absent or not in that format."""
    try:
        raw = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    message = raw.get("message") if isinstance(raw, dict) else None
    if isinstance(message, dict):
        message = message.get("message")
    return message if isinstance(message, str) else None


@dataclass
class WorkerFailure:
    """One failed worker. ``returncode`` is Popen's (negative for a signal)."""

    rank: int
    local_rank: int
    group_rank: int
    pid: int
    returncode: int
    exit_time: float
    run_time: float
    restart_count: int
    host: str = field(default_factory=socket.gethostname)
    error_message: str | None = None
    stderr_tail: list[str] = field(default_factory=list)
    log_files: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """The code a shell would report: the exit code, or 128 + signal number."""
        return 128 - self.returncode if self.returncode < 0 else self.returncode

    def describe(self) -> str:
        return describe_exit(self.returncode)

    def to_json(self) -> dict[str, object]:
        return {
            "rank": self.rank,
            "local_rank": self.local_rank,
            "group_rank": self.group_rank,
            "host": self.host,
            "pid": self.pid,
            "returncode": self.returncode,
            "exit_code": self.exit_code,
            "exit": self.describe(),
            "exit_time": self.exit_time,
            "run_time": self.run_time,
            "restart_count": self.restart_count,
            "error_message": self.error_message,
            "stderr_tail": self.stderr_tail,
            "log_files": self.log_files,
        }


def format_summary(
    what: str, failures: list[WorkerFailure], *, restarts: int, max_restarts: int
) -> str:
    """The failure summary for ``failures`` (first = root cause) of the job ``what``."""
    root = failures[0]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(root.exit_time))
    lines = [
        _RULE,
        f"{what} FAILED after {restarts} restart(s) (max_restarts={max_restarts})",
        _THIN,
        "Root cause (first worker to fail):",
        f"  rank       : {root.rank} (local_rank {root.local_rank}, node {root.group_rank})",
        f"  host       : {root.host}",
        f"  exit       : {root.describe()} (pid {root.pid})",
        f"  time       : {stamp} after {root.run_time:.2f} s",
    ]
    if root.error_message:
        lines.append(f"  error      : {root.error_message}")
    for path in root.log_files:
        lines.append(f"  log file   : {path}")
    if root.stderr_tail:
        lines.append(f"  stderr (last {len(root.stderr_tail)} lines):")
        lines.extend(f"    | {line}" for line in root.stderr_tail)
    else:
        lines.append("  stderr     : (empty)")
    if len(failures) > 1:
        lines.append(_THIN)
        lines.append("Other failures:")
        for f in failures[1:]:
            lines.append(
                f"  rank {f.rank} (local_rank {f.local_rank}): {f.describe()} (pid {f.pid}) "
                f"{f.exit_time - root.exit_time:+.2f} s after the root cause"
            )
    lines.append(_RULE)
    return "\n".join(lines)
