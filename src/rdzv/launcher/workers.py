"""The local worker processes of one attempt: spawn, watch, signal, stop the whole tree.

Every worker is a :class:`subprocess.Popen` child in its **own session** (so a terminal's
Ctrl-C reaches only the agent, which forwards it, and a signal can be sent to the worker's
whole process group), registered with the agent's :class:`~rdzv.launcher.watchdog.Watchdog`
(which SIGKILLs the group if the agent dies, even by SIGKILL). A thread per worker blocks in
``wait()`` and records the exit time, so a failure is noticed at once and "first failure"
means the first in time, not the first polled.

:meth:`WorkerProcesses.stop` terminates the tree: the signal goes to every worker's process
group and to every other descendant found in ``/proc`` (processes that started a new session
or were re-parented to the agent, which is their subreaper under ``rdzv run``); after the
grace period the survivors get SIGKILL. Pid reuse is ruled out by comparing start times.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rdzv.launcher.logs import LogPump, WorkerStreams
from rdzv.launcher.proctree import (
    ProcInfo,
    descendants,
    is_alive,
    process_table,
    read_proc,
)
from rdzv.launcher.watchdog import Watchdog

__all__ = ["Worker", "WorkerProcesses"]

_log = logging.getLogger("rdzv.launcher.workers")

#: Seconds to wait after SIGKILL for the kernel to tear processes down.
_KILL_WAIT = 5.0


@dataclass
class Worker:
    """One local worker: its ranks, command, environment, and (once started) its process.

    Times: ``start_time`` is wall-clock seconds since the epoch; ``exit_time`` and
    ``exit_monotonic`` are set by the waiter thread when the process ends.
    """

    local_rank: int
    global_rank: int
    role_rank: int
    cmd: list[str]
    env: dict[str, str]
    streams: WorkerStreams
    proc: subprocess.Popen[bytes] | None = None
    start_time: float = 0.0
    start_monotonic: float = 0.0
    exit_time: float | None = None
    exit_monotonic: float | None = None
    returncode: int | None = None
    #: Set by the agent when it stopped this worker (its exit is not a failure).
    stopped_by_agent: bool = False
    #: ``/proc`` start time of the process (pid-reuse guard); None without /proc.
    proc_start: int | None = None
    _waiter: threading.Thread | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.returncode is None

    @property
    def failed(self) -> bool:
        """Ended with a non-zero code or a signal, not because the agent stopped it."""
        return self.returncode not in (None, 0) and not self.stopped_by_agent

    def run_time(self) -> float:
        """Seconds between start and exit (or now, while running)."""
        end = self.exit_monotonic if self.exit_monotonic is not None else time.monotonic()
        return max(0.0, end - self.start_monotonic) if self.proc is not None else 0.0


class WorkerProcesses:
    """The processes of one attempt on this node.

    Args:
        changed: a condition notified (under its lock) whenever a worker exits.
        pump: the log pump that copies the workers' pipes.
        reap_adopted: treat the agent's other children as orphans the workers left behind
            (set when the agent is the subreaper of its descendants, i.e. under ``rdzv run``):
            kill them with the workers, reap their zombies.
        watchdog: registers every worker's process group (None: no safety net).
    """

    def __init__(
        self,
        changed: threading.Condition,
        pump: LogPump,
        *,
        reap_adopted: bool = False,
        watchdog: Watchdog | None = None,
    ) -> None:
        self._changed = changed
        self._pump = pump
        self._reap_adopted = reap_adopted
        self._watchdog = watchdog
        # The agent's own helper is a child too, but not an orphan to kill.
        self._not_orphans = {watchdog.pid} if watchdog is not None and watchdog.pid else set()
        self.workers: list[Worker] = []

    # -------------------------------------------------------------------------- start
    def start(self, workers: Sequence[Worker]) -> None:
        """Spawn ``workers`` in local-rank order. If a spawn fails (command not found, not
        executable), the ones already started are stopped and the OSError propagates with the
        command named."""
        for worker in workers:
            popen_args = worker.streams.popen_args()
            try:
                proc = subprocess.Popen(
                    worker.cmd,
                    env=worker.env,
                    start_new_session=True,
                    close_fds=True,
                    **popen_args,
                )
            except OSError as exc:
                worker.streams.abort()
                self.stop(signal.SIGKILL, 1.0)
                raise OSError(
                    exc.errno,
                    f"cannot start worker {worker.local_rank}: {exc.strerror}: {worker.cmd[0]!r}",
                ) from exc
            worker.proc = proc
            worker.start_time = time.time()
            worker.start_monotonic = time.monotonic()
            info = read_proc(proc.pid)
            worker.proc_start = info.start if info is not None else None
            if self._watchdog is not None:
                self._watchdog.add(proc.pid, worker.proc_start)
            worker.streams.attach(proc, self._pump)
            self.workers.append(worker)
            waiter = threading.Thread(
                target=self._wait, args=(worker,), name=f"rdzv-wait-{proc.pid}", daemon=True
            )
            worker._waiter = waiter
            waiter.start()

    def _wait(self, worker: Worker) -> None:
        assert worker.proc is not None
        code = worker.proc.wait()
        with self._changed:
            worker.exit_time = time.time()
            worker.exit_monotonic = time.monotonic()
            worker.returncode = code
            self._changed.notify_all()

    # ------------------------------------------------------------------------- status
    def running(self) -> list[Worker]:
        return [w for w in self.workers if w.running]

    def all_exited(self) -> bool:
        return all(not w.running for w in self.workers)

    def failures(self) -> list[Worker]:
        """Workers that failed on their own, in the order they ended."""
        failed = [w for w in self.workers if w.failed]
        return sorted(failed, key=lambda w: w.exit_monotonic or 0.0)

    # ---------------------------------------------------------------------- signalling
    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process group of every running worker."""
        for worker in self.running():
            assert worker.pid is not None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.pid, sig)

    def _tree(self) -> dict[int, ProcInfo]:
        """Every live process belonging to the workers (not the workers themselves)."""
        table = process_table()
        roots = {w.pid for w in self.workers if w.pid is not None}
        found = descendants(roots, table, sessions=roots)
        if self._reap_adopted:
            me = os.getpid()
            found.update(
                p.pid
                for p in table.values()
                if p.ppid == me
                and p.pid not in roots
                and p.pid not in self._not_orphans
                and p.state != "Z"
            )
        return {pid: table[pid] for pid in found}

    def reap_adopted(self) -> None:
        """Collect zombies of orphans re-parented to the agent (no-op unless enabled)."""
        if not self._reap_adopted:
            return
        me = os.getpid()
        roots = {w.pid for w in self.workers}
        for info in process_table().values():
            if (
                info.ppid == me
                and info.state == "Z"
                and info.pid not in roots
                and info.pid not in self._not_orphans
            ):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(info.pid, os.WNOHANG)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Stop every worker and every process they started.

        Sends ``sig`` to each running worker's process group and to each other descendant,
        waits up to ``timeout`` seconds for all of them to end, then SIGKILLs the survivors and
        waits for the kernel (at most 5 s more). Marks running workers as stopped by the agent
        (their exit is then not a failure). Safe to call repeatedly.
        """
        for worker in self.running():
            worker.stopped_by_agent = True
        deadline = time.monotonic() + timeout
        extra = self._tree()
        self._send(sig, extra)
        if not self._wait_gone(extra, deadline):
            extra.update(self._tree())
            survivors = [w.pid for w in self.running()] + [
                p for p, i in extra.items() if is_alive(p, i.start)
            ]
            _log.warning(
                "%d process(es) still alive %.1f s after %s; sending SIGKILL: %s",
                len(survivors),
                timeout,
                signal.Signals(sig).name,
                survivors,
            )
            self._send(signal.SIGKILL, extra)
            self._wait_gone(extra, time.monotonic() + _KILL_WAIT)
        # Processes forked while we were stopping, or orphans adopted meanwhile.
        for _ in range(3):
            late = self._tree()
            if not late:
                break
            self._send(signal.SIGKILL, late)
            self._wait_gone(late, time.monotonic() + _KILL_WAIT)
        self.reap_adopted()
        for worker in self.workers:
            if worker._waiter is not None:
                worker._waiter.join(1.0)
            if self._watchdog is not None and worker.pid is not None:
                self._watchdog.remove(worker.pid)

    def _send(self, sig: int, extra: dict[int, ProcInfo]) -> None:
        self.send_signal(sig)
        for pid, info in extra.items():
            if is_alive(pid, info.start):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

    def _wait_gone(self, extra: dict[int, ProcInfo], deadline: float) -> bool:
        """Wait until no worker runs and none of ``extra`` lives; False at the deadline."""
        while True:
            self.reap_adopted()
            with self._changed:
                workers_done = self.all_exited()
            if workers_done and not any(is_alive(p, i.start) for p, i in extra.items()):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._changed:
                if not self.all_exited():
                    self._changed.wait(min(remaining, 0.05))
                    continue
            time.sleep(min(remaining, 0.01))

    def wait_output(self, timeout: float) -> None:
        """Wait (bounded) until the pump has copied everything the workers wrote."""
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.streams.wait_closed(max(0.0, deadline - time.monotonic()))
