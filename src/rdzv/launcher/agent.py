"""The elastic agent: rendezvous, start the local workers, watch them, restart, stop.

One agent runs per node (``rdzv run``). It drives a
:class:`~rdzv.rendezvous.api.RendezvousHandler` only through its public API:

1. ``next_rendezvous()`` gives this node's rank among the nodes and the round's store;
2. the agents agree on ranks and the workers' store (:mod:`rdzv.launcher.assignment`); the
   workers' store is the handler's bootstrap store when it offers one
   (``bootstrap_store_info``), else a TCPStore server that node 0's agent hosts itself on a
   port it binds (port 0: no bind-then-release race);
3. the workers start with torchrun's environment (:mod:`rdzv.launcher.environment`);
4. the agent watches: a worker exit is seen at once (a waiter thread per worker); every
   ``monitor_interval`` it asks ``num_nodes_waiting()`` and beats (:mod:`rdzv.launcher.peers`);
5. a worker failure stops the others and, while ``max_restarts`` allows, restarts the group
   after a new rendezvous; new nodes waiting (scale up) or a lost node (scale down) restart
   the group too, without using up a restart (torch's rule; every rule and the budget live
   in :mod:`rdzv.launcher.restart_policy`);
6. when every local worker succeeded, the agent waits for the other nodes (exit barrier),
   then ``shutdown()``\\ s the handler.

Signals in ``signals_to_handle`` (SIGTERM, SIGINT, SIGHUP, SIGQUIT by default) are forwarded
to every worker's process group; after ``shutdown_timeout`` the rest is SIGKILLed and the
agent exits with 128 + the signal number, without closing the rendezvous (torch's rule: the
other nodes may carry on). A second signal kills the workers at once.

Events (:mod:`rdzv.events`): ``torchelastic.worker.status.{STATE}`` per worker (source
WORKER: ``HEALTHY`` when started, then ``SUCCEEDED``, ``FAILED`` or ``STOPPED`` with the run
time in ``duration_ms``) and per agent (source AGENT: ``RENDEZVOUS`` with its duration, then
``SUCCEEDED``/``FAILED``/``STOPPED`` at the end), with torch's metadata fields.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rdzv import auth, events
from rdzv.endpoint import format_endpoint
from rdzv.errors import (
    RdzvError,
    RendezvousClosedError,
    RendezvousError,
    RendezvousGracefulExitError,
    StoreTimeoutError,
)
from rdzv.launcher.assignment import Assignment, NodeInfo, exchange, status_url_key
from rdzv.launcher.causes import CauseChannel
from rdzv.launcher.config import LaunchConfig, Std, std_for
from rdzv.launcher.connect import client_security
from rdzv.launcher.environment import worker_environment
from rdzv.launcher.failures import (
    HANG_EXIT_CODE,
    FailureRecord,
    WorkerFailure,
    describe_exit,
    format_summary,
    read_error_file,
    read_root_cause,
    worker_failure_key,
)
from rdzv.launcher.hangs import HangMonitor, Hung, dump_stacks, innermost_frame
from rdzv.launcher.heartbeat import HEARTBEAT_FILE_ENV, STACKS_FILE_ENV, STACKS_SIGNAL_ENV
from rdzv.launcher.logs import ConsoleWriter, LogPump, WorkerStreams, console_writer, format_prefix
from rdzv.launcher.peers import PeerEvent, PeerMonitor
from rdzv.launcher.restart_policy import (
    MAX_RENDEZVOUS_RETRIES,
    Restart,
    RestartBudget,
    for_failure,
    for_lost_node,
    for_membership_change,
    for_peer_restart,
    for_rendezvous_retry,
)
from rdzv.launcher.watchdog import Watchdog
from rdzv.launcher.workers import Worker, WorkerProcesses
from rdzv.rendezvous.api import RendezvousHandler, RendezvousInfo
from rdzv.stats import AgentStats
from rdzv.store.base import Store

__all__ = ["ElasticAgent", "RunResult", "WorkerState"]

_log = logging.getLogger("rdzv.launcher.agent")


class WorkerState(str, enum.Enum):
    """State of the local worker group (torch's ``WorkerState`` names)."""

    UNKNOWN = "UNKNOWN"
    INIT = "INIT"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


@dataclass
class RunResult:
    """How a launch ended.

    ``exit_code``: 0 on success; the root-cause worker's exit code (128 + signal if it was
    killed by one) when workers failed; 128 + signal when the agent was signalled; 1 when the
    rendezvous failed. ``summary``: the failure summary text, None on success.
    """

    state: WorkerState
    exit_code: int
    restarts: int = 0
    failures: list[WorkerFailure] = field(default_factory=list)
    summary: str | None = None
    signal: int | None = None
    message: str | None = None


#: Seconds the workers get, after the root cause reached their store, to end on their own
#: (``rdzv.connect()`` raised PeerFailedError in them) before they are sent SIGTERM.
PEER_FAILED_GRACE = 0.5


class _SignalReceived(BaseException):
    """Raised in the main thread by the agent's signal handler."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _StoreLost(Exception):
    """The round's store has been unreachable for ``node_timeout``: give up."""


class ElasticAgent:
    """Runs ``cmd`` as ``config.nproc_per_node`` workers under ``handler``'s rendezvous.

    Args:
        config: the launch configuration.
        cmd: the worker command line (``${local_rank}`` is substituted in each argument).
        handler: the rendezvous handler (created by the caller, e.g. from the registry).
        hosted_store: a store server this agent already hosts (``--standalone``); it serves
            as the workers' store when the handler offers none.
        hosted_addr: the address workers use to reach ``hosted_store``.
        subreaper: make this process the subreaper of its descendants (``rdzv run`` does;
            a library caller normally should not).
        stdout, stderr: console writers for worker output (default: this process's).
        what: how the job is named in the failure summary (default: ``cmd[0]``).

    Call :meth:`run` from the main thread to get signal handling (elsewhere signals are left
    to the caller).
    """

    def __init__(
        self,
        config: LaunchConfig,
        cmd: Sequence[str],
        handler: RendezvousHandler,
        *,
        hosted_store: Store | None = None,
        hosted_addr: str | None = None,
        subreaper: bool = False,
        stdout: ConsoleWriter | None = None,
        stderr: ConsoleWriter | None = None,
        what: str | None = None,
    ) -> None:
        if not cmd:
            raise ValueError("ElasticAgent: the worker command is empty")
        self.config = config
        self.cmd = list(cmd)
        self.handler = handler
        self._hosted_store = hosted_store
        self._hosted_addr = hosted_addr
        self._subreaper = subreaper
        self._stdout = stdout or console_writer(sys.stdout)
        self._stderr = stderr or console_writer(sys.stderr)
        self._what = what or self.cmd[0]
        self._host = socket.gethostname()
        self._changed = threading.Condition()
        self._pump = LogPump()
        self._watchdog: Watchdog | None = None
        self._workers: WorkerProcesses | None = None
        self._budget = RestartBudget(config.max_restarts)
        self._attempt = 0
        self._assignment: Assignment | None = None
        self._peers: PeerMonitor | None = None
        self._causes: CauseChannel | None = None
        self._remote_cause: FailureRecord | None = None
        self._stopping = False
        self._own_server: Store | None = None
        self._round_store: Store | None = None
        self._log_root: Path | None = None
        self._own_log_root = False
        self._keep_logs = False
        self._store_lost = False
        self._hangs: HangMonitor | None = None
        self.state = WorkerState.INIT
        #: Counters for metrics (rdzv.observe), and what snapshot() shows besides the
        #: live workers: the rounds joined and the failures seen, latest last.
        self.stats = AgentStats()
        self._rounds: collections.deque[dict[str, Any]] = collections.deque(maxlen=50)
        self._failures: collections.deque[dict[str, Any]] = collections.deque(maxlen=50)
        self._exits_counted: set[int] = set()
        self._seen_causes: collections.deque[FailureRecord] = collections.deque(maxlen=50)
        #: The URL of this agent's status page (rdzv run --metrics-port), published in each
        #: round's store for ``rdzv status --web``; None: none.
        self.status_url: str | None = None

    # ------------------------------------------------------------------ properties
    @property
    def restart_count(self) -> int:
        """Restarts used so far (``TORCHELASTIC_RESTART_COUNT``)."""
        return self._budget.used

    @property
    def round_store(self) -> Store | None:
        """The store of the round joined last (None before the first rendezvous)."""
        return self._round_store

    @property
    def log_root(self) -> Path | None:
        """The job's log directory (created at the first start)."""
        return self._log_root

    # -------------------------------------------------------------------- run
    def run(self) -> RunResult:
        """Run the job to completion; never raises for worker or rendezvous failures (they
        are in the result), only for programming errors."""
        if self.config.event_log_handler is not None:
            events.set_destinations(self.config.event_log_handler)
        previous = self._install_signal_handlers()
        signalled: int | None = None
        result: RunResult | None = None
        try:
            result = self._run()
        except _SignalReceived as sig:
            signalled = sig.signum
            result = self._on_signal(sig.signum)
        finally:
            self._stopping = True
            try:
                if self._workers is not None:
                    self._workers.stop(signal.SIGTERM, self.config.shutdown_timeout)
                    self._workers.wait_output(2.0)
                    self._count_exits(self._workers)
                self._pump.close()
                if self._watchdog is not None:
                    self._watchdog.close()
                self._close_causes()
                if self._peers is not None:
                    self._peers.close()
                if self._hangs is not None:
                    self._hangs.close()
                if signalled is None and not self._store_lost:
                    self._shutdown_handler()
                self._cleanup()
            finally:
                self._restore_signal_handlers(previous)
        assert result is not None
        self._record_agent(result.state, result.message)
        return result

    def _run(self) -> RunResult:
        last_failures: list[WorkerFailure] = []
        last_cause: FailureRecord | None = None
        retries = 0
        while True:
            try:
                self._rendezvous_and_start()
            except RendezvousGracefulExitError:
                return RunResult(
                    WorkerState.SUCCEEDED, 0, self.restart_count, message="not admitted"
                )
            except Restart as restart:  # a node vanished right after the rendezvous
                retries += 1
                self.stats.restart("rendezvous")
                if retries > MAX_RENDEZVOUS_RETRIES:
                    return self._agent_failure(RendezvousError(restart.reason))
                _log.warning("rendezvous again: %s", restart.reason)
                continue
            except (RendezvousError, RdzvError, OSError) as exc:
                if last_cause is not None:
                    return self._job_failure(last_failures, last_cause, then=exc)
                return self._agent_failure(exc)
            retries = 0
            try:
                self._monitor()
            except _StoreLost as lost:
                self._store_lost = True
                _log.debug("giving up: %s", lost)
                if self._causes is not None:
                    self._causes.abandon()
                self._stop_workers()
                if last_cause is not None:
                    return self._job_failure(last_failures, last_cause, then=lost)
                self.state = WorkerState.FAILED
                return RunResult(
                    WorkerState.FAILED, 1, self.restart_count, message=f"{lost}; giving up"
                )
            except Restart as restart:
                # Tell the other nodes first, so that they stop in parallel with us.
                if self._peers is not None:
                    self._peers.request_restart()
                self.stats.restart(restart.label)
                if restart.cause is not None and restart.cause.kind == "hang":
                    self.stats.hangs += 1
                if restart.cause is not None:
                    self._let_workers_see(restart.cause)
                if restart.failure:
                    last_failures = self._collect_failures()
                    last_cause = restart.cause
                    if last_cause is None and last_failures:
                        last_cause = FailureRecord.from_failure(last_failures[0])
                if not self._budget.charge(restart):
                    return self._job_failure(last_failures, last_cause)
                _log.warning(
                    "restarting the worker group (%s); %s, %d of %d left",
                    restart.reason,
                    "one restart used" if restart.failure else "no restart used",
                    self._budget.remaining,
                    self.config.max_restarts,
                )
                self._stop_workers()
                continue
            self.state = WorkerState.SUCCEEDED
            if self._peers is not None and not self._peers.exit_barrier(
                self.config.exit_barrier_timeout
            ):
                self._report_exit_barrier(self._peers.missing)
            return RunResult(WorkerState.SUCCEEDED, 0, self.restart_count)

    # ------------------------------------------------------------ rendezvous
    def _rendezvous_and_start(self) -> None:
        self.state = WorkerState.INIT
        started = time.monotonic()
        info = self.handler.next_rendezvous()
        elapsed = time.monotonic() - started
        self.stats.rounds += 1
        self.stats.join_time.observe(elapsed)
        assignment = self._assign(info)
        self._assignment = assignment
        self._rounds.append(
            {
                "time": time.time(),
                "join_seconds": round(elapsed, 3),
                "group_rank": assignment.group_rank,
                "group_world_size": assignment.group_world_size,
                "world_size": assignment.world_size,
                "restart_count": self.restart_count,
            }
        )
        old_peers = self._peers
        self._peers = PeerMonitor(
            info.store,
            assignment.namespace,
            assignment.group_rank,
            assignment.group_world_size,
            self.config.node_timeout,
            self.config.node_heartbeat_interval,
        )
        self._close_causes()
        self._remote_cause = None
        if old_peers is not None:
            old_peers.close()
        self._round_store = info.store
        self._causes = CauseChannel(
            info.store,
            assignment.namespace,
            assignment.group_rank,
            assignment.group_world_size,
            self._on_remote_cause,
        )
        _log.info(
            "rendezvous complete in %.3f s: node %d of %d, ranks %d..%d of %d, workers' store "
            "%s:%d",
            elapsed,
            assignment.group_rank,
            assignment.group_world_size,
            assignment.rank_base,
            assignment.rank_base + self.config.nproc_per_node - 1,
            assignment.world_size,
            assignment.master_addr,
            assignment.master_port,
        )
        self._record(
            "RENDEZVOUS",
            events.EventSource.AGENT,
            None,
            duration_ms=elapsed * 1000,
            extra={"group_world_size": assignment.group_world_size},
        )
        if self.status_url is not None:
            self._publish_status_url(info.store, assignment, self.status_url)
        self._start_workers(assignment)

    def _workers_store(self, info: RendezvousInfo) -> tuple[str, int, bool]:
        """Node 0: where the workers' store is (handler's, hosted already, or new)."""
        boot = info.bootstrap_store_info
        if boot is not None:
            return boot.master_addr, boot.master_port, self.handler.use_agent_store
        if self._hosted_store is not None:
            return self._hosted_addr or "127.0.0.1", _store_port(self._hosted_store), True
        addr = self._own_store_addr()
        if self._own_server is None:
            from rdzv.store.tcp import TCPStore

            # Listen only where the other nodes are told to connect (torch's agent store
            # listens on every interface); port 0 is bound once and kept (no free-port race).
            # The server's limits are rdzv serve's defaults; its token is $RDZV_TOKEN.
            self._own_server = TCPStore(
                addr, 0, is_master=True, wait_for_workers=False, multi_tenant=True
            )
            if self.config.max_nodes > 1 and auth.load_token() is None:
                endpoint = format_endpoint(addr, _store_port(self._own_server))
                _log.warning("%s", auth.unauthenticated_warning("the workers' store", endpoint))
        return addr, _store_port(self._own_server), True

    def _own_store_addr(self) -> str:
        """Where the store this agent hosts for the workers listens, which is also the
        address the other nodes are given: loopback for a one-node job, else --local-addr,
        else the static backend's --master-addr (node 0's address by definition), else
        this host's name."""
        cfg = self.config
        if cfg.max_nodes == 1 and not cfg.local_addr:
            return "127.0.0.1"
        if cfg.local_addr:
            return cfg.local_addr
        if cfg.rdzv_backend == "static" and cfg.rdzv_endpoint:
            from rdzv.rendezvous.utils import parse_rendezvous_endpoint

            host, _ = parse_rendezvous_endpoint(cfg.rdzv_endpoint, 29500)
            if host:
                return host
        return socket.getfqdn()

    def _assign(self, info: RendezvousInfo) -> Assignment:
        me = NodeInfo(self.config.role, self.config.nproc_per_node, self._host, os.getpid())
        master = self._workers_store(info) if info.rank == 0 else None
        timeout = self.config.node_timeout or 300.0
        try:
            return exchange(info.store, info.rank, info.world_size, me, master, timeout)
        except StoreTimeoutError:
            raise for_rendezvous_retry(
                f"not every node published its workers within {timeout:g} s after the rendezvous"
            ) from None

    # --------------------------------------------------------------- workers
    def worker_env(self, assignment: Assignment, local_rank: int) -> dict[str, str]:
        """The environment of one worker (:func:`rdzv.launcher.environment.worker_environment`:
        this process's, the store security settings, ``config.env``, then torchrun's
        variables, which win)."""
        return worker_environment(
            self.config,
            assignment,
            local_rank,
            run_id=self.handler.get_run_id(),
            restart_count=self.restart_count,
        )

    def _ensure_log_root(self) -> Path:
        if self._log_root is None:
            cfg = self.config
            if cfg.log_dir is None:
                self._log_root = Path(tempfile.mkdtemp(prefix=f"rdzv-{cfg.run_id}-"))
                self._own_log_root = True
            else:
                base = Path(cfg.log_dir)
                try:
                    base.mkdir(parents=True, exist_ok=True)
                except (FileExistsError, NotADirectoryError) as exc:
                    raise ValueError(
                        f"log_dir {cfg.log_dir!r}: {exc.strerror} ({exc.filename}); the worker "
                        "logs need a directory (created if missing)"
                    ) from None
                self._log_root = Path(tempfile.mkdtemp(prefix=f"{cfg.run_id}_", dir=base))
            _log.info("worker logs and error files under %s", self._log_root)
        return self._log_root

    def _start_workers(self, assignment: Assignment) -> None:
        cfg = self.config
        attempt_dir = self._ensure_log_root() / f"attempt_{self._attempt}"
        self._attempt += 1
        workers: list[Worker] = []
        directories = [attempt_dir / str(r) for r in range(cfg.nproc_per_node)]
        for directory in directories:
            directory.mkdir(parents=True, exist_ok=True)
        if self._hangs is not None:
            self._hangs.close()
        self._hangs = None
        if cfg.hang_timeout is not None:
            self._hangs = HangMonitor(directories, cfg.hang_timeout)
        for local_rank in range(cfg.nproc_per_node):
            rank = assignment.rank_base + local_rank
            directory = attempt_dir / str(local_rank)
            directory.mkdir(parents=True, exist_ok=True)
            streams = WorkerStreams(
                directory,
                redirect=std_for(cfg.redirects, local_rank),
                tee=std_for(cfg.tee, local_rank),
                console=cfg.local_ranks_filter is None or local_rank in cfg.local_ranks_filter,
                prefix=format_prefix(
                    cfg.log_line_prefix_template,
                    rank=rank,
                    local_rank=local_rank,
                    role_name=cfg.role,
                ),
                tail_lines=cfg.tail_lines,
                stdout=self._stdout,
                stderr=self._stderr,
            )
            env = self.worker_env(assignment, local_rank)
            env["TORCHELASTIC_ERROR_FILE"] = str(directory / "error.json")
            if self._hangs is not None:
                env[HEARTBEAT_FILE_ENV] = str(self._hangs.path(local_rank))
                env[STACKS_FILE_ENV] = str(directory / "stacks.txt")
                env[STACKS_SIGNAL_ENV] = "SIGUSR2"
            cmd = [arg.replace("${local_rank}", str(local_rank)) for arg in self.cmd]
            workers.append(
                Worker(
                    local_rank=local_rank,
                    global_rank=rank,
                    role_rank=assignment.role_rank_base + local_rank,
                    cmd=cmd,
                    env=env,
                    streams=streams,
                )
            )
        if self._watchdog is None:
            self._watchdog = Watchdog()
        self._workers = WorkerProcesses(
            self._changed, self._pump, reap_adopted=self._subreaper, watchdog=self._watchdog
        )
        self._workers.start(workers)
        self.state = WorkerState.HEALTHY
        for worker in workers:
            self._record("HEALTHY", events.EventSource.WORKER, worker)

    def _stop_workers(self, sig: int = signal.SIGTERM) -> None:
        workers = self._workers
        if workers is None:
            return
        workers.stop(sig, self.config.shutdown_timeout)
        workers.wait_output(2.0)
        self._count_exits(workers)
        for worker in workers.workers:
            self._record_exit(worker)
        self._workers = None
        self.state = WorkerState.STOPPED

    def _record_exit(self, worker: Worker) -> None:
        if worker.returncode is None:
            return
        if worker.returncode == 0:
            state = "SUCCEEDED"
        elif worker.stopped_by_agent:
            state = "STOPPED"
        else:
            state = "FAILED"
        self._record(state, events.EventSource.WORKER, worker, duration_ms=worker.run_time() * 1000)

    def _publish_status_url(self, store: Store, assignment: Assignment, url: str) -> None:
        """Best effort: ``{namespace}/web/{group_rank}`` = ``url``."""
        try:
            store.set(status_url_key(assignment.namespace, assignment.group_rank), url)
        except RdzvError as exc:
            _log.warning("could not publish the status page URL: %s", exc)

    def _count_exits(self, workers: WorkerProcesses) -> None:
        """Count the exits of ``workers`` not counted yet in :attr:`stats`."""
        for worker in workers.workers:
            if worker.returncode is not None and id(worker) not in self._exits_counted:
                self._exits_counted.add(id(worker))
                self.stats.worker_exit(_exit_cause(worker))

    def snapshot(self) -> dict[str, Any]:
        """What this agent knows now, as JSON-able data (for the status page of
        :mod:`rdzv.observe`; safe to call from another thread: it only reads): run id, state,
        restarts, this node's place, the rounds joined, the local workers (rank, pid,
        ``state`` running/succeeded/failed/stopped, ``cause`` of an exit, times), the
        failures of earlier attempts (:meth:`WorkerFailure.to_json`) and the root causes
        this agent announced or heard of (JSON of :meth:`FailureRecord.to_json`), latest
        last."""
        assignment = self._assignment
        group = self._workers
        peers = self._peers
        workers = []
        for worker in list(group.workers) if group is not None else []:
            code = worker.returncode
            workers.append(
                {
                    "rank": worker.global_rank,
                    "local_rank": worker.local_rank,
                    "pid": worker.pid,
                    "state": "running" if code is None else _exit_cause(worker),
                    "cause": None if code is None else describe_exit(code),
                    "exit_time": worker.exit_time,
                    "run_time": round(worker.run_time(), 3),
                }
            )
        return {
            "run_id": self.handler.get_run_id(),
            "backend": self.handler.get_backend(),
            "host": self._host,
            "state": self.state.value,
            "restart_count": self.restart_count,
            "max_restarts": self.config.max_restarts,
            "group_rank": None if assignment is None else assignment.group_rank,
            "group_world_size": None if assignment is None else assignment.group_world_size,
            "world_size": None if assignment is None else assignment.world_size,
            "namespace": None if assignment is None else assignment.namespace,
            "rounds": list(self._rounds),
            "workers": workers,
            "failures": list(self._failures),
            "causes": [cause.to_json() for cause in list(self._seen_causes)],
            "peer": None if peers is None or not peers.active else peers.snapshot(),
        }

    # -------------------------------------------------------------- monitoring
    def _monitor(self) -> None:
        """Watch the workers until they all succeed (returns) or the group must restart
        (raises :class:`~rdzv.launcher.restart_policy.Restart`)."""
        workers = self._workers
        peers = self._peers
        assert workers is not None and peers is not None
        interval = self.config.monitor_interval
        next_check = time.monotonic() + interval
        next_reap = time.monotonic() + 2.0
        while True:
            with self._changed:
                now = time.monotonic()
                wait = min(next_check - now, peers.due(now))
                idle = not workers.failures() and not workers.all_exited()
                if idle and self._remote_cause is None and wait > 0:
                    self._changed.wait(wait)
                failed = workers.failures()
                done = workers.all_exited()
                remote = self._remote_cause
            if failed:
                first = failed[0]
                self.state = WorkerState.FAILED
                cause = self._announce(self._worker_record(first))
                raise for_failure(
                    f"worker rank {first.global_rank} (local {first.local_rank}) ended with "
                    f"{describe_exit(first.returncode or 0)}",
                    cause,
                )
            if remote is not None:
                raise self._remote_restart(remote)
            if done:
                self._count_exits(workers)
                for worker in workers.workers:
                    self._record_exit(worker)
                self._workers = None
                return
            now = time.monotonic()
            if now >= next_check:
                next_check = now + interval
                if self._hangs is not None:
                    running = {w.local_rank for w in workers.workers if w.running}
                    hung = self._hangs.check(now, running)
                    if hung:
                        cause = self._announce(self._hang_record(workers, hung[0]))
                        raise for_failure(f"worker {cause.how()}", cause)
                any_finished = any(w.returncode == 0 for w in workers.workers)
                if not any_finished and self._nodes_waiting() > 0:
                    raise for_membership_change()
            event = peers.beat()
            if event is PeerEvent.PEER_LOST:
                self._declare_lost(peers.watched_peer)
                cause = self._announce(self._lost_record(peers.watched_peer))
                raise for_lost_node(peers.watched_peer, cause)
            if event is PeerEvent.STORE_LOST:
                raise _StoreLost(
                    f"the rendezvous store {self.handler.get_backend()} "
                    f"({self.config.rdzv_endpoint or 'local'}) has been unreachable for "
                    f"{self.config.node_timeout:g} s (its host is down or cut off): "
                    f"{_error_text(peers.last_error) if peers.last_error else 'no reply'}"
                )
            if event is PeerEvent.RESTART_REQUESTED:
                remote = self._published_cause()
                if remote is not None:
                    raise self._remote_restart(remote)
                raise for_peer_restart()
            if now >= next_reap:
                next_reap = now + 2.0
                workers.reap_adopted()

    def _nodes_waiting(self) -> int:
        try:
            return self.handler.num_nodes_waiting()
        except RendezvousError as exc:
            _log.warning("num_nodes_waiting() failed: %s", exc)
            return 0

    # -------------------------------------------------------------- failures
    def _on_remote_cause(self, record: FailureRecord) -> None:
        """The cause channel's callback: another node published a root cause."""
        with self._changed:
            if self._remote_cause is None:
                self._remote_cause = record
            self._changed.notify_all()

    def _published_cause(self) -> FailureRecord | None:
        """The root cause in the round's store, if any (one read; None on errors)."""
        if self._remote_cause is not None:
            return self._remote_cause
        if self._round_store is None or self._assignment is None:
            return None
        try:
            return read_root_cause(self._round_store, self._assignment.namespace)
        except (RdzvError, ValueError) as exc:
            _log.warning("cannot read the root cause: %s", exc)
            return None

    def _remote_restart(self, cause: FailureRecord) -> Restart:
        """Another node's root cause: say it here too, then restart like a failure."""
        self.state = WorkerState.FAILED
        self._say_cause(cause)
        if cause.kind == "hang" and self._workers is not None:
            # What were the others doing meanwhile? Often waiting for the hung one.
            path = self._dump_local_stacks(self._workers, f"peer-hang-rank{cause.rank}")
            if path is not None:
                self._stderr(f"[rdzv run] stacks of this node's workers: {path}\n".encode())
        return for_failure(cause.describe(), cause)

    def _worker_record(self, worker: Worker) -> FailureRecord:
        """The record of a local worker that ended on its own, built at once (its error file
        is complete; its stderr is whatever reached us so far)."""
        return FailureRecord.from_failure(self._describe_failure(worker))

    def _describe_failure(self, worker: Worker) -> WorkerFailure:
        """What a worker that ended on its own left behind (error file, stderr tail, logs)."""
        assert worker.pid is not None and worker.returncode is not None
        streams = worker.streams
        logs = [str(p) for p in (streams.log_path(Std.OUT), streams.log_path(Std.ERR)) if p]
        return WorkerFailure(
            rank=worker.global_rank,
            local_rank=worker.local_rank,
            group_rank=self._assignment.group_rank if self._assignment else 0,
            pid=worker.pid,
            returncode=worker.returncode,
            exit_time=worker.exit_time or time.time(),
            run_time=worker.run_time(),
            restart_count=self.restart_count,
            host=self._host,
            error_message=read_error_file(streams.directory / "error.json"),
            stderr_tail=streams.stderr_tail(),
            log_files=logs,
        )

    def _dump_local_stacks(self, workers: WorkerProcesses, what: str) -> Path | None:
        """Write the stacks of the running local workers to the job's log dir."""
        targets = [
            (w.global_rank, w.local_rank, w.pid, w.streams.directory / "stacks.txt")
            for w in workers.workers
            if w.running and w.pid is not None
        ]
        if not targets:
            return None
        self._keep_logs = True
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = self._ensure_log_root() / f"stacks-{what}-{stamp}.txt"
        try:
            return dump_stacks(targets, out)
        except OSError as exc:
            _log.warning("cannot write the workers' stacks to %s: %s", out, exc)
            return None

    def _hang_record(self, workers: WorkerProcesses, hung: Hung) -> FailureRecord:
        """Dump the local stacks, kill the hung worker, and describe the hang."""
        worker = workers.workers[hung.local_rank]
        path = self._dump_local_stacks(workers, f"hang-rank{worker.global_rank}")
        text = ""
        if path is not None:
            dump = path.read_text("utf-8", errors="replace")
            header = f"=== rank {worker.global_rank} "
            start = dump.find(header)
            end = dump.find("\n=== rank ", start + 1) if start >= 0 else -1
            text = dump[start : end if end >= 0 else None] if start >= 0 else ""
        worker.stopped_by_agent = True
        if worker.pid is not None:
            # A hung (maybe SIGSTOPped) worker may not act on SIGTERM: end it now.
            with contextlib.suppress(OSError):
                os.killpg(worker.pid, signal.SIGKILL)
        return FailureRecord(
            kind="hang",
            node_rank=self._assignment.group_rank if self._assignment else 0,
            host=self._host,
            rank=worker.global_rank,
            local_rank=worker.local_rank,
            pid=worker.pid,
            last_step=hung.last_step,
            frame=innermost_frame(text),
            stacks_file=str(path) if path is not None else None,
            message=text.strip() or None,
        )

    def _report_exit_barrier(self, missing: list[tuple[int, float | None]]) -> None:
        """Warn (and record ``rdzv.timeout.exit_barrier``) naming the nodes that did not reach
        the exit barrier: host, agent pid, last heartbeat."""
        if not missing:
            _log.warning("the exit barrier was abandoned (a node was lost or restarted)")
            return
        assignment = self._assignment
        parts = []
        for node, age in missing:
            host = assignment.hosts[node] if assignment else "?"
            pid = assignment.pids[node] if assignment and node < len(assignment.pids) else None
            beat = (
                f"not seen moving in the {self.config.exit_barrier_timeout:g} s waited"
                if age is None
                else f"{age:.1f} s ago"
            )
            parts.append(f"node {node} (host {host}, pid {pid}, last heartbeat {beat})")
        text = (
            f"{len(missing)} node(s) did not reach the exit barrier within "
            f"{self.config.exit_barrier_timeout:g} s: {'; '.join(parts)}; exiting anyway"
        )
        _log.warning("%s", text)
        if events.is_enabled():
            events.record(
                events.Event(
                    name="rdzv.timeout.exit_barrier",
                    source=events.EventSource.AGENT,
                    metadata={
                        "run_id": self.handler.get_run_id(),
                        "group_rank": assignment.group_rank if assignment else None,
                        "hostname": self._host,
                        "missing": json.dumps([node for node, _ in missing]),
                        "raw_error": text,
                    },
                )
            )

    def _declare_lost(self, node: int) -> None:
        """One verdict for launcher and rendezvous: tell the handler that ``node`` is lost, so
        that the next round does not wait for the rendezvous' own heartbeat expiry."""
        # A handler from a plugin may predate declare_lost: then there is nothing to update.
        declare = getattr(self.handler, "declare_lost", None)
        if not callable(declare):
            return
        try:
            declare(node)
        except RendezvousError as exc:
            _log.warning("could not mark node %d lost in the rendezvous: %s", node, exc)

    def _lost_record(self, node: int) -> FailureRecord:
        assignment = self._assignment
        host = assignment.hosts[node] if assignment and node < len(assignment.hosts) else "?"
        return FailureRecord(
            kind="lost",
            node_rank=node,
            host=host,
            message=f"no heartbeat for {self.config.node_timeout:g} s "
            f"(seen by node {assignment.group_rank if assignment else '?'})",
        )

    def _announce(self, record: FailureRecord) -> FailureRecord:
        """Publish ``record`` (the first cause of the generation wins), tell the workers'
        store, and say the root cause on this console. A cause that cannot be published
        (the store is gone) is still said here. Returns the root cause in force."""
        root = record
        if self._causes is not None:
            try:
                root = self._causes.publish(record)
            except RdzvError as exc:
                _log.error("could not publish the failure to the other nodes: %s", exc)
        self._tell_workers(root)
        self._say_cause(root)
        return root

    def _say_cause(self, cause: FailureRecord) -> None:
        self._seen_causes.append(cause)
        line = f"[rdzv run] {cause.describe()}"
        self._stderr(line.encode() + b"\n")
        _log.debug("%s", line)
        if events.is_enabled():
            self._record_failure(cause)

    def _tell_workers(self, cause: FailureRecord) -> None:
        """Set the root cause in the workers' store, where ``rdzv.connect()`` watches."""
        assignment = self._assignment
        if assignment is None:
            return
        key = worker_failure_key(self.handler.get_run_id(), assignment.attempt_id)
        store: Store | None = self._own_server
        try:
            if store is None:
                from rdzv.store.tcp import TCPStore

                token_file, tls = client_security(self.worker_env(assignment, 0))
                store = TCPStore(
                    assignment.master_addr,
                    assignment.master_port,
                    is_master=False,
                    timeout=2.0,
                    wait_for_workers=False,
                    token_file=token_file,
                    tls=tls,
                )
                try:
                    store.set(key, cause.to_json())
                finally:
                    store.close()
            else:
                store.set(key, cause.to_json())
        except (RdzvError, OSError) as exc:
            _log.warning("could not tell the workers' store about the failure: %s", exc)

    def _let_workers_see(self, cause: FailureRecord) -> None:
        """Give the local workers :data:`PEER_FAILED_GRACE` seconds to end on their own."""
        workers = self._workers
        if workers is None or cause.kind == "lost":
            return
        with self._changed:
            self._changed.wait_for(workers.all_exited, PEER_FAILED_GRACE)

    def _close_causes(self) -> None:
        if self._causes is not None:
            self._causes.close()
            self._causes = None

    def _collect_failures(self) -> list[WorkerFailure]:
        """Stop the workers and describe those that failed on their own (first first)."""
        workers = self._workers
        assert workers is not None
        workers.stop(signal.SIGTERM, self.config.shutdown_timeout)
        workers.wait_output(2.0)
        self._count_exits(workers)
        result = [self._describe_failure(worker) for worker in workers.failures()]
        self._failures.extend(f.to_json() for f in result)  # for the status page
        return result

    def _job_failure(
        self,
        failures: list[WorkerFailure],
        cause: FailureRecord | None,
        then: BaseException | None = None,
    ) -> RunResult:
        """The result for a failed job: ``failures`` on this node, ``cause`` the root cause
        (here or elsewhere); ``then``: the error that ended the restarts early (the
        rendezvous failed or was closed)."""
        self.state = WorkerState.FAILED
        summary = format_summary(
            self._what,
            failures,
            restarts=self.restart_count,
            max_restarts=self.config.max_restarts,
            cause=cause,
        )
        message = cause.describe() if cause is not None else "a worker failed"
        if then is not None:
            text = _error_text(then)
            summary += f"\nNo further restart: {text}"
            message += f"; no further restart: {text}"
        return RunResult(
            WorkerState.FAILED,
            _cause_exit_code(cause),
            self.restart_count,
            failures,
            summary,
            message=message,
        )

    def _agent_failure(self, exc: BaseException) -> RunResult:
        self.state = WorkerState.FAILED
        text = _error_text(exc)
        _log.error("the agent failed: %s", text)
        return RunResult(WorkerState.FAILED, 1, self.restart_count, message=text)

    # ---------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}
        for sig in self.config.signals_to_handle:
            try:
                previous[sig] = signal.signal(sig, self._on_signal_handler)
            except (OSError, ValueError):
                _log.debug("cannot handle %s", sig)
        return previous

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _on_signal_handler(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping:
            # Already shutting down: a second signal means "now".
            _log.warning("received %s again: killing the workers", signal.Signals(signum).name)
            if self._workers is not None:
                self._workers.send_signal(signal.SIGKILL)
            return
        raise _SignalReceived(signum)

    def _on_signal(self, signum: int) -> RunResult:
        self._stopping = True
        name = signal.Signals(signum).name
        _log.warning("received %s: forwarding it to the workers", name)
        if self._workers is not None:
            self._stop_workers(signum)
        self.state = WorkerState.STOPPED
        return RunResult(
            WorkerState.STOPPED,
            128 + signum,
            self.restart_count,
            signal=signum,
            message=f"stopped by {name}",
        )

    # ----------------------------------------------------------------- events
    def _record(
        self,
        state: str,
        source: events.EventSource,
        worker: Worker | None,
        *,
        duration_ms: float | None = None,
        message: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if not events.is_enabled():
            return
        assignment = self._assignment
        metadata: dict[str, events.EventMetadataValue] = {
            "run_id": self.handler.get_run_id(),
            "global_rank": worker.global_rank if worker else None,
            "group_rank": assignment.group_rank if assignment else None,
            "worker_id": str(worker.pid) if worker else None,
            "role": self.config.role,
            "hostname": self._host,
            "state": state,
            "total_run_time": round(worker.run_time(), 3) if worker else None,
            "rdzv_backend": self.handler.get_backend(),
            "raw_error": message,
            "metadata": json.dumps(extra or {}),
            "agent_restarts": self.restart_count,
            "duration_ms": round(duration_ms, 3) if duration_ms is not None else None,
        }
        if worker is not None:
            metadata["local_rank"] = worker.local_rank
            metadata["exit_code"] = worker.returncode
        events.record(
            events.Event(
                name=f"torchelastic.worker.status.{state}", source=source, metadata=metadata
            )
        )

    def _record_failure(self, cause: FailureRecord) -> None:
        """Event ``rdzv.failure.{kind}``: a root cause as this node learnt it."""
        metadata: dict[str, events.EventMetadataValue] = {
            "run_id": self.handler.get_run_id(),
            "reported_by": self._assignment.group_rank if self._assignment else None,
            "hostname": self._host,
            "record": cause.to_json(),
        }
        events.record(
            events.Event(
                name=f"rdzv.failure.{cause.kind}",
                source=events.EventSource.AGENT,
                metadata=metadata,
            )
        )

    def _record_agent(self, state: WorkerState, message: str | None) -> None:
        self._record(state.value, events.EventSource.AGENT, None, message=message)

    # ---------------------------------------------------------------- cleanup
    def _shutdown_handler(self) -> None:
        try:
            if not self.handler.shutdown():
                _log.warning("the rendezvous handler could not be shut down cleanly")
        except Exception as exc:  # the job's result is known; report, do not mask it
            _log.warning("shutting down the rendezvous handler failed: %s", exc)

    def _cleanup(self) -> None:
        if self._own_log_root and self._log_root is not None:
            redirected = self.config.redirects != Std.NONE or self.config.tee != Std.NONE
            if not redirected and not self._keep_logs:
                shutil.rmtree(self._log_root, ignore_errors=True)
        for server in (self._own_server,):
            close = getattr(server, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # closing must not mask the result
                    _log.debug("closing the workers' store failed", exc_info=True)


def _exit_cause(worker: Worker) -> str:
    """succeeded, stopped (by the agent), signal or exit_code: how ``worker`` ended."""
    code = worker.returncode or 0
    if code == 0:
        return "succeeded"
    if worker.stopped_by_agent:
        return "stopped"
    return "signal" if code < 0 else "exit_code"


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, RendezvousClosedError):
        return "the rendezvous was closed (another node finished or gave up)"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _cause_exit_code(cause: FailureRecord | None) -> int:
    """The agent's exit code for a job ended by ``cause``: the root cause's exit code,
    :data:`HANG_EXIT_CODE` for a hang, 1 for a lost node or an unknown cause."""
    if cause is None:
        return 1
    if cause.kind == "hang":
        return HANG_EXIT_CODE
    return cause.exit_code or 1


def _store_port(store: Store) -> int:
    port = getattr(store, "port", None)
    if not isinstance(port, int):
        raise TypeError(f"{store!r} has no integer 'port': it cannot be the workers' store")
    return port
