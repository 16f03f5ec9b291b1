"""What went wrong: one :class:`WorkerFailure` per failed worker, the summary the agent
prints when the job fails, and the :class:`FailureRecord` that tells every node.

The summary names the root cause, the *first* worker to fail in time (not the lowest rank),
with its exit code or signal, pid, host, run time, the message from its error file (torch's
``TORCHELASTIC_ERROR_FILE``, written by ``torch.distributed.elastic.multiprocessing.errors.
record``) when there is one, and the last lines of its stderr. Other failures follow, one
line each.

Failure records in the store
----------------------------
A :class:`FailureRecord` is the cause of a failure as every node sees it: who (rank, local
rank, node rank, host, pid), how (``kind``: ``"exit"``, ``"signal"``, ``"hang"`` or
``"lost"``; exit code or signal name), when (wall-clock ``time``) and what it said (the first
lines of its error file or the tail of its stderr). The agent that sees it first publishes it
in the round's store (the store every agent of the round shares,
``RendezvousInfo.store``), under the generation namespace ``ns`` of
:mod:`rdzv.launcher.assignment` (``rdzv.agent/{gen}``):

* ``{ns}/failure`` (:func:`root_cause_key`): the root cause of this generation, JSON of
  :meth:`FailureRecord.to_json`; written once with ``compare_set(key, "", record)``, so the
  first failure wins and later ones cannot overwrite it (:func:`publish`). Every agent blocks
  in ``wait`` on this key (a pushed wake-up, no polling) and reads it with
  :func:`read_root_cause`.
* ``rdzv.agent/failures`` (:data:`FAILURE_LOG_KEY`): every record of the round's store, one
  JSON object per line, appended (``append``) in the order they were published, root causes
  and later ones alike (each carries its ``namespace``); :func:`read_failure_log` parses it.
  This is what status pages show as the failed, hung and lost ranks.

In the workers' store (``MASTER_ADDR:MASTER_PORT``) the agents also ``set`` the root cause
under :func:`worker_failure_key`, which the store of :func:`rdzv.connect` watches to raise
:class:`~rdzv.errors.PeerFailedError` in workers blocked in a store call.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from rdzv.store.base import Store

__all__ = [
    "FAILURE_LOG_KEY",
    "FailureKind",
    "FailureRecord",
    "WorkerFailure",
    "describe_exit",
    "format_summary",
    "publish",
    "read_error_file",
    "read_failure_log",
    "read_root_cause",
    "root_cause_key",
    "worker_failure_key",
]

_log = logging.getLogger("rdzv.launcher.failures")

#: How a failure happened: a worker exited non-zero, was killed by a signal, stopped
#: heartbeating (``--hang-timeout``), or its whole node (agent) was lost.
FailureKind = Literal["exit", "signal", "hang", "lost"]
_KINDS = ("exit", "signal", "hang", "lost")

#: Append-only log of every failure record in a round's store (JSON lines).
FAILURE_LOG_KEY = "rdzv.agent/failures"

#: Longest ``message`` kept in a record (characters): the first lines of an error file or
#: the last lines of stderr, not a whole log.
MAX_MESSAGE_CHARS = 2000

#: Exit code of an agent whose job ended because a worker hung (like ``timeout(1)``'s 124).
HANG_EXIT_CODE = 124

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


def root_cause_key(namespace: str) -> str:
    """The key of the root cause of generation ``namespace`` in the round's store."""
    return f"{namespace}/failure"


def worker_failure_key(run_id: str, attempt_id: str) -> str:
    """The key of the root cause in the workers' store (outside any worker's scope, so a
    worker's own keys never collide with it)."""
    return f"rdzv.failure/{run_id}/{attempt_id}"


@dataclass
class FailureRecord:
    """The cause of a failure, as published to every node (see the module docstring).

    ``rank``/``local_rank``/``pid``: None for a lost node (no single worker); ``exit_code``:
    the exit code a shell would report (128 + signal number for a signal, None for a lost
    node); ``signal``: the signal's name (``"SIGKILL"``) when ``kind == "signal"``;
    ``time``: wall-clock seconds since the epoch when the failure happened; ``message``: the
    error file's message or the stderr tail (at most :data:`MAX_MESSAGE_CHARS`);
    ``last_step``/``frame``/``stacks_file``: for a hang, the last step passed to
    ``rdzv.heartbeat``, the innermost Python frame and the file with the full stacks;
    ``namespace``: the generation it belongs to.
    """

    kind: FailureKind
    node_rank: int
    host: str
    rank: int | None = None
    local_rank: int | None = None
    pid: int | None = None
    exit_code: int | None = None
    signal: str | None = None
    time: float = field(default_factory=time.time)
    message: str | None = None
    last_step: int | None = None
    frame: str | None = None
    stacks_file: str | None = None
    namespace: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"FailureRecord.kind must be one of {_KINDS}, not {self.kind!r}")
        if self.message is not None and len(self.message) > MAX_MESSAGE_CHARS:
            self.message = self.message[: MAX_MESSAGE_CHARS - 3] + "..."

    @staticmethod
    def from_failure(failure: WorkerFailure, namespace: str | None = None) -> FailureRecord:
        """The record of a worker that exited non-zero or was killed by a signal."""
        sig = None
        if failure.returncode < 0:
            try:
                sig = signal.Signals(-failure.returncode).name
            except ValueError:
                sig = f"signal {-failure.returncode}"
        message = failure.error_message
        if message is None and failure.stderr_tail:
            message = "\n".join(failure.stderr_tail)
        return FailureRecord(
            kind="signal" if sig else "exit",
            node_rank=failure.group_rank,
            host=failure.host,
            rank=failure.rank,
            local_rank=failure.local_rank,
            pid=failure.pid,
            exit_code=failure.exit_code,
            signal=sig,
            time=failure.exit_time,
            message=message,
            namespace=namespace,
        )

    def how(self) -> str:
        """``"exit code 3"``, ``"signal SIGKILL (exit code 137)"``, ``"hung"`` or
        ``"node lost"``, with a hang's last step and frame."""
        if self.kind == "exit":
            return f"exit code {self.exit_code}"
        if self.kind == "signal":
            return f"signal {self.signal} (exit code {self.exit_code})"
        if self.kind == "hang":
            step = "none" if self.last_step is None else str(self.last_step)
            text = f"hung (no heartbeat; last step {step})"
            return f"{text} in {self.frame}" if self.frame else text
        return "node lost (its agent stopped heartbeating)"

    def describe(self) -> str:
        """One line: ``root cause: rank 3 on node 1 (host): exit code 3 (pid 123, local rank
        1) at 12:00:01``, plus the last line of the message (not for a hang)."""
        who = f"node {self.node_rank} ({self.host})"
        if self.rank is not None:
            who = f"rank {self.rank} on {who}"
        extra = []
        if self.pid is not None:
            extra.append(f"pid {self.pid}")
        if self.local_rank is not None:
            extra.append(f"local rank {self.local_rank}")
        stamp = time.strftime("%H:%M:%S", time.localtime(self.time))
        line = f"root cause: {who}: {self.how()}"
        if extra:
            line += f" ({', '.join(extra)})"
        line += f" at {stamp}"
        if self.message and self.kind != "hang":  # a hang's message is its stack dump
            last = self.message.strip().splitlines()
            if last:
                line += f": {last[-1].strip()}"
        return line

    def to_json(self) -> str:
        """A compact JSON object (the stored form)."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @staticmethod
    def from_json(raw: str | bytes) -> FailureRecord:
        """Parse :meth:`to_json`'s output. Unknown fields are ignored (newer writers);
        raises ValueError if ``raw`` is not a record."""
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"not a failure record (invalid JSON): {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("not a failure record (not a JSON object)")
        known = {f.name for f in fields(FailureRecord)}
        kwargs: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        try:
            return FailureRecord(**kwargs)
        except TypeError as exc:
            raise ValueError(f"not a failure record: {exc}") from None


def publish(store: Store, namespace: str, record: FailureRecord) -> FailureRecord:
    """Publish ``record`` as the root cause of generation ``namespace`` unless one is there
    already, and append it to :data:`FAILURE_LOG_KEY`. Returns the root cause in force (the
    earlier one if another agent was first). Raises the store's errors
    (:class:`~rdzv.errors.RdzvError`)."""
    record.namespace = namespace
    raw = record.to_json().encode()
    current = store.compare_set(root_cause_key(namespace), b"", raw)
    store.append(FAILURE_LOG_KEY, raw + b"\n")
    if current == raw:
        return record
    try:
        return FailureRecord.from_json(current)
    except ValueError:
        _log.warning("the root cause in the store is corrupt: %r", current[:100])
        return record


def read_root_cause(store: Store, namespace: str) -> FailureRecord | None:
    """The root cause of generation ``namespace``, or None if none was published (never
    blocks). Raises the store's errors; ValueError on a corrupt record."""
    key = root_cause_key(namespace)
    if not store.check([key]):
        return None
    return FailureRecord.from_json(store.get(key))


def read_failure_log(store: Store) -> list[FailureRecord]:
    """Every record appended to :data:`FAILURE_LOG_KEY` of the round's store, oldest first
    (corrupt lines are skipped). Raises the store's errors."""
    if not store.check([FAILURE_LOG_KEY]):
        return []
    records = []
    for line in store.get(FAILURE_LOG_KEY).splitlines():
        if line.strip():
            try:
                records.append(FailureRecord.from_json(line))
            except ValueError:
                _log.debug("skipping a corrupt failure record: %r", line[:100])
    return records


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
    what: str,
    failures: list[WorkerFailure],
    *,
    restarts: int,
    max_restarts: int,
    cause: FailureRecord | None = None,
) -> str:
    """The failure summary of the job ``what``: ``failures`` on this node (first first) and
    ``cause``, the root cause of the whole job (default: the first of ``failures``). When the
    root cause is on another node (or is a hang or a lost node), its record is shown and every
    local failure is listed under "Other failures"."""
    if cause is None:
        if not failures:
            raise ValueError("format_summary needs failures or a cause")
        cause = FailureRecord.from_failure(failures[0])
    root = failures[0] if failures else None
    local = root is not None and cause.kind in ("exit", "signal") and cause.pid == root.pid
    lines = [
        _RULE,
        f"{what} FAILED after {restarts} restart(s) (max_restarts={max_restarts})",
        cause.describe(),
        _THIN,
    ]
    if local:
        assert root is not None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(root.exit_time))
        lines += [
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
        others = failures[1:]
    else:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cause.time))
        who = f"node {cause.node_rank} ({cause.host})"
        if cause.rank is not None:
            who = f"rank {cause.rank} on {who}"
        lines += [
            f"Root cause ({who}):",
            f"  {cause.how()}" + (f" (pid {cause.pid})" if cause.pid is not None else ""),
            f"  time       : {stamp}",
        ]
        if cause.stacks_file:
            lines.append(f"  stacks     : {cause.stacks_file}")
        if cause.message:
            lines.append("  message:")
            text = cause.message.splitlines()
            # A hang's stack dump starts with the stuck thread; an error ends with its cause.
            text = text[:20] if cause.kind == "hang" else text[-20:]
            lines.extend(f"    | {line}" for line in text)
        others = failures
    if others:
        lines.append(_THIN)
        lines.append("Other failures:")
        for f in others:
            lines.append(
                f"  rank {f.rank} (local_rank {f.local_rank}): {f.describe()} (pid {f.pid}) "
                f"{f.exit_time - cause.time:+.2f} s after the root cause"
            )
    lines.append(_RULE)
    return "\n".join(lines)
