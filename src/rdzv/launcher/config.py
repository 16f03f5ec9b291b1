"""What a launch needs to know: :class:`LaunchConfig` and the parsers of torchrun's formats.

The field names follow torch's ``torch.distributed.launcher.api.LaunchConfig`` where torch has
one (``min_nodes``, ``max_nodes``, ``nproc_per_node``, ``run_id``, ``role``, ``rdzv_endpoint``,
``rdzv_backend``, ``rdzv_configs``, ``max_restarts``, ``monitor_interval``, ``log_line_prefix_
template``, ``local_addr``); the stream settings use torch's :class:`Std` numbering
(0 none, 1 stdout, 2 stderr, 3 both; or per local rank ``"0:1,1:2"``).
"""

from __future__ import annotations

import enum
import os
import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_LOG_LINE_PREFIX",
    "LaunchConfig",
    "Std",
    "parse_min_max_nnodes",
    "parse_nproc_per_node",
    "parse_signals",
    "parse_std",
    "std_for",
]

#: Console prefix of each worker line; ``${rank}``, ``${local_rank}`` and ``${role_name}`` are
#: substituted (torch's ``--log-line-prefix-template`` names).
DEFAULT_LOG_LINE_PREFIX = "[${rank}]: "


class Std(enum.IntFlag):
    """Which standard streams a setting applies to (torch's ``Std``): 0, 1, 2 or 3."""

    NONE = 0
    OUT = 1
    ERR = 2
    ALL = 3


StdSetting = Std | Mapping[int, Std]


def parse_std(text: str, what: str = "--redirects") -> StdSetting:
    """Parse ``"3"`` (all local ranks) or ``"0:1,1:2"`` (per local rank).

    Raises ValueError naming ``what`` for anything else (a value outside 0..3, a negative or
    duplicate local rank, an item without ``:``).
    """
    text = text.strip()

    def one(value: str) -> Std:
        try:
            number = int(value)
        except ValueError:
            number = -1
        if not 0 <= number <= 3:
            raise ValueError(
                f"{what}: {value!r} is not a stream setting; use 0 (none), 1 (stdout), "
                "2 (stderr) or 3 (both), for all local ranks or per rank as '0:1,1:2'"
            )
        return Std(number)

    if ":" not in text:
        return one(text)
    per_rank: dict[int, Std] = {}
    for item in text.split(","):
        rank_text, sep, value = item.partition(":")
        if not sep or not rank_text.strip().isdigit():
            raise ValueError(
                f"{what}: {item!r} is not LOCAL_RANK:SETTING (e.g. '0:1,1:2'); got {text!r}"
            )
        rank = int(rank_text)
        if rank in per_rank:
            raise ValueError(f"{what}: local rank {rank} appears twice in {text!r}")
        per_rank[rank] = one(value.strip())
    return per_rank


def std_for(setting: StdSetting, local_rank: int) -> Std:
    """The streams that ``setting`` selects for ``local_rank`` (NONE if not listed)."""
    if isinstance(setting, Std):
        return setting
    return setting.get(local_rank, Std.NONE)


def parse_min_max_nnodes(nnodes: str) -> tuple[int, int]:
    """Parse torchrun's ``--nnodes``: ``"N"`` or ``"MIN:MAX"``.

    Raises ValueError for non-integers, ``MIN < 1`` or ``MAX < MIN``.
    """
    parts = nnodes.strip().split(":")
    try:
        if len(parts) == 1:
            low = high = int(parts[0])
        elif len(parts) == 2:
            low, high = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"--nnodes: {nnodes!r} is not a node count; use N or MIN:MAX (e.g. 2 or 1:4)"
        ) from None
    if low < 1:
        raise ValueError(f"--nnodes: the minimum number of nodes must be >= 1, got {nnodes!r}")
    if high < low:
        raise ValueError(f"--nnodes: MAX must be >= MIN, got {nnodes!r}")
    return low, high


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def parse_nproc_per_node(value: str) -> int:
    """Parse ``--nproc-per-node``: a positive integer, or ``cpu``/``auto`` (the CPUs this
    process may run on). Accelerator counts (``gpu``, ``xpu``) are framework business: pass
    the number. Raises ValueError otherwise."""
    text = value.strip().lower()
    if text in ("cpu", "auto"):
        return _cpu_count()
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(
            f"--nproc-per-node: {value!r} is not a worker count; use a positive integer, "
            "'cpu' or 'auto' (rdzv is framework-agnostic and does not count GPUs: pass the "
            "number)"
        )
    return number


def parse_signals(text: str) -> tuple[signal.Signals, ...]:
    """Parse ``"SIGTERM,SIGINT"`` (names with or without ``SIG``, or numbers).

    Raises ValueError for an unknown signal or one that cannot be caught (SIGKILL, SIGSTOP).
    """
    result: list[signal.Signals] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        try:
            if item.isdigit():
                sig = signal.Signals(int(item))
            else:
                name = item.upper()
                sig = signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        except (KeyError, ValueError):
            raise ValueError(f"--signals-to-handle: unknown signal {item!r}") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"--signals-to-handle: {sig.name} cannot be caught")
        if sig not in result:
            result.append(sig)
    return tuple(result)


_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_.:@+-]+$")


@dataclass
class LaunchConfig:
    """Everything the elastic agent needs, apart from the worker command.

    Node and worker counts:
        min_nodes, max_nodes: the node range of the rendezvous (``--nnodes MIN:MAX``).
        nproc_per_node: local workers started by this agent.
        role: the workers' role name (``ROLE_NAME``).

    Rendezvous:
        run_id: the job id shared by every node (``--rdzv-id``); letters, digits and
            ``_ . : @ + -`` only, so it can be a store key component and a directory name.
        rdzv_backend, rdzv_endpoint, rdzv_configs: passed to the handler registry as
            :class:`~rdzv.rendezvous.api.RendezvousParameters` (``rdzv_configs`` become its
            ``config``).
        local_addr: this node's address as advertised to others (None: the FQDN).
        standalone: host the rendezvous store in this agent on a port it binds itself
            (``--standalone``).

    Supervision (seconds):
        max_restarts: restarts of the worker group after a failure (membership changes do
            not count, like torch).
        monitor_interval: how often the agent polls ``num_nodes_waiting()`` and the peers'
            heartbeats; worker exits are noticed at once regardless.
        node_timeout: a peer agent whose heartbeat counter did not move for this long is
            considered lost and the group re-rendezvous without it; 0 disables the check.
        hang_timeout: a worker whose ``rdzv.heartbeat()`` calls stop for this long (after
            its first one) is hung: its stacks are dumped and the group restarts or the job
            fails (None: off, the default). Must be >= ``monitor_interval``.
        shutdown_timeout: grace period between the stop signal and SIGKILL.
        exit_barrier_timeout: how long a finished agent waits for the other nodes.

    Output:
        log_dir: base directory of the worker log files (a job directory
            ``{run_id}_{random}`` is created inside; a temporary directory when None).
        redirects, tee: :class:`Std` or per local rank mapping (torch's ``--redirects`` and
            ``--tee``); redirected streams go to ``attempt_{n}/{local_rank}/std{out,err}.log``.
        local_ranks_filter: local ranks whose output reaches the console (None: all).
        log_line_prefix_template: console prefix (``${rank}``, ``${local_rank}``,
            ``${role_name}``).
        tail_lines: lines of stderr kept per worker for the failure summary.

    Other:
        signals_to_handle: signals the agent forwards to the workers before stopping.
        event_log_handler: events destination spec (:mod:`rdzv.events`), None = unchanged.
        env: extra environment variables for every worker (the TLS/token settings of
            ``rdzv_configs`` reach the workers without being listed here).
    """

    min_nodes: int = 1
    max_nodes: int = 1
    nproc_per_node: int = 1
    run_id: str = "none"
    role: str = "default"
    rdzv_backend: str = "c10d"
    rdzv_endpoint: str = ""
    rdzv_configs: dict[str, str] = field(default_factory=dict)
    local_addr: str | None = None
    standalone: bool = False
    max_restarts: int = 0
    monitor_interval: float = 0.1
    node_timeout: float = 30.0
    hang_timeout: float | None = None
    shutdown_timeout: float = 30.0
    exit_barrier_timeout: float = 300.0
    log_dir: str | None = None
    redirects: StdSetting = Std.NONE
    tee: StdSetting = Std.NONE
    local_ranks_filter: frozenset[int] | None = None
    log_line_prefix_template: str = DEFAULT_LOG_LINE_PREFIX
    tail_lines: int = 20
    signals_to_handle: Sequence[signal.Signals] = (
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGHUP,
        signal.SIGQUIT,
    )
    event_log_handler: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Validate; raises ValueError naming the field and the allowed values."""
        if self.min_nodes < 1 or self.max_nodes < self.min_nodes:
            raise ValueError(
                f"LaunchConfig: need 1 <= min_nodes <= max_nodes, got "
                f"min_nodes={self.min_nodes}, max_nodes={self.max_nodes}"
            )
        if self.nproc_per_node < 1:
            raise ValueError(
                f"LaunchConfig: nproc_per_node must be >= 1, got {self.nproc_per_node}"
            )
        if not _RUN_ID_RE.match(self.run_id):
            raise ValueError(
                f"LaunchConfig: run_id {self.run_id!r} must be non-empty and use only letters, "
                "digits and _ . : @ + -"
            )
        if not self.role or "/" in self.role:
            raise ValueError(f"LaunchConfig: role {self.role!r} must be non-empty without '/'")
        if self.max_restarts < 0:
            raise ValueError(f"LaunchConfig: max_restarts must be >= 0, got {self.max_restarts}")
        for name in ("monitor_interval", "shutdown_timeout", "exit_barrier_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"LaunchConfig: {name} must be > 0 seconds, got {getattr(self, name)}"
                )
        if not self.node_timeout >= 0:
            raise ValueError(
                f"LaunchConfig: node_timeout must be >= 0 seconds, got {self.node_timeout}"
            )
        if self.hang_timeout is not None and not self.hang_timeout >= self.monitor_interval:
            raise ValueError(
                f"--hang-timeout {self.hang_timeout:g} is below --monitor-interval "
                f"{self.monitor_interval:g}: hangs are checked once per monitor interval, so "
                "give a hang timeout of at least one interval (typically tens of seconds)"
            )
        if self.tail_lines < 0:
            raise ValueError(f"LaunchConfig: tail_lines must be >= 0, got {self.tail_lines}")

    @property
    def node_heartbeat_interval(self) -> float:
        """Seconds between two heartbeats of this agent: a twentieth of :attr:`node_timeout`,
        within 0.05..1 s. A lost node is declared up to one interval after ``node_timeout``
        (the watcher sees the counter at its own beats), so the interval is kept short
        enough for a new round within ``node_timeout`` + 2 s."""
        return min(1.0, max(0.05, self.node_timeout / 20))
