"""Plain counters the store server, its durable journal and the launcher keep for metrics.

Dependency-free and cheap: integers and lists updated in place by the thread that owns them
(the server's event loop, the agent's thread). A reader in another thread (the metrics
listener of :mod:`rdzv.observe`) takes :meth:`Histogram.snapshot` copies at scrape time;
copying a list or dict is atomic under the GIL, so a reader never sees a torn histogram and
never makes the owner wait. Names and units follow Prometheus conventions (seconds, bytes)
but nothing here depends on ``prometheus_client``.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rdzv.wire import Op

__all__ = [
    "FSYNC_BUCKETS",
    "JOIN_BUCKETS",
    "REQUEST_BUCKETS",
    "AgentStats",
    "Histogram",
    "HistogramSnapshot",
    "ServerSnapshot",
    "ServerStats",
]

#: Upper bounds (seconds) of the server's request-time buckets: a fast-path read takes a
#: few microseconds, a large LIST_KEYS or a durable group commit milliseconds.
REQUEST_BUCKETS: tuple[float, ...] = (
    2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1, 1.0,
)  # fmt: skip
#: Upper bounds (seconds) of the durable journal's fsync buckets (NVMe: ~0.1-1 ms; network
#: disks and loaded machines: tens of ms).
FSYNC_BUCKETS: tuple[float, ...] = (
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0,
)  # fmt: skip
#: Upper bounds (seconds) of the agent's rendezvous join-time buckets (a one-node round
#: takes milliseconds; a multi-node round waits for its last node, up to join_timeout).
JOIN_BUCKETS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass(frozen=True)
class HistogramSnapshot:
    """A consistent copy of a :class:`Histogram`: ``counts[i]`` observations fell in
    bucket ``i`` (at most ``bounds[i]``, above ``bounds[i - 1]``; the last bucket holds
    those above every bound); ``total``: their sum. Not cumulative."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HistogramSnapshot:
        """The snapshot ``dataclasses.asdict`` made of one (lists for tuples)."""
        return cls(tuple(data["bounds"]), tuple(data["counts"]), float(data["total"]))

    def merged(self, other: HistogramSnapshot) -> HistogramSnapshot:
        """Both snapshots' observations (same bounds required; ValueError otherwise)."""
        if other.bounds != self.bounds:
            raise ValueError("cannot merge histograms with different bucket bounds")
        counts = tuple(a + b for a, b in zip(self.counts, other.counts, strict=True))
        return HistogramSnapshot(self.bounds, counts, self.total + other.total)


class Histogram:
    """Observations (seconds) counted in fixed buckets whose upper bounds are ``bounds``
    (increasing; a last bucket counts the rest). ValueError for bounds that do not increase."""

    __slots__ = ("_counts", "_total", "bounds")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        if any(b <= a for a, b in zip(self.bounds, self.bounds[1:], strict=False)):
            raise ValueError(f"histogram bounds must increase, got {self.bounds}")
        self._counts = [0] * (len(self.bounds) + 1)
        self._total = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect_left(self.bounds, seconds)] += 1
        self._total += seconds

    def snapshot(self) -> HistogramSnapshot:
        """A copy, consistent even while another thread observes (atomic under the GIL)."""
        counts, total = tuple(self._counts), self._total
        return HistogramSnapshot(self.bounds, counts, total)


@dataclass
class ServerStats:
    """Counters of a :class:`~rdzv.server.StoreServer`, updated on its event loop.

    ``requests[op]``: requests executed by the Python path, by opcode (the C fast path counts
    its own; :meth:`~rdzv.server.StoreServer.snapshot` adds both), counted only while
    ``counting``; ``request_time``: seconds per read (the requests one read delivered and
    their replies) on the Python path. The rest is always counted (rare events):
    connections accepted, connections closed by client kind (``"torch"``, ``"rdzv"``: the
    client negotiated rdzv's extensions), authentication failures by reason, limit hits by
    limit name, protocol violations.
    """

    counting: bool = False
    requests: list[int] = field(default_factory=lambda: [0] * 256)
    request_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_BUCKETS))
    accepted: int = 0
    closed: dict[str, int] = field(default_factory=lambda: {"torch": 0, "rdzv": 0})
    auth_failures: dict[str, int] = field(default_factory=dict)
    limit_hits: dict[str, int] = field(default_factory=dict)
    protocol_errors: int = 0

    def limit_hit(self, limit: str) -> None:
        """Count one refusal because of the limit named ``limit`` (its option name)."""
        self.limit_hits[limit] = self.limit_hits.get(limit, 0) + 1

    def auth_failure(self, reason: str) -> None:
        """Count one refused or failed authentication (``reason``: wrong_token, timeout,
        no_challenge, unauthenticated)."""
        self.auth_failures[reason] = self.auth_failures.get(reason, 0) + 1

    def protocol_error(self, message: str) -> None:
        """Count a protocol violation that closed a connection; those that exceeded a
        request limit (rdzv.wire's "... exceeds the ..." errors) count as limit hits."""
        if "exceeds the" in message:
            self.limit_hit("request_limits")
        else:
            self.protocol_errors += 1


class _Counters(Protocol):
    """What the C fast path's executor offers (rdzv.server._fastpath.Executor)."""

    @property
    def counting(self) -> bool: ...

    def counters(self) -> tuple[dict[int, int], tuple[int, ...], int]: ...


class _Journal(Protocol):
    commits: int
    fsync_time: Histogram


class _Engine(Protocol):
    def num_keys(self) -> int: ...

    def value_bytes(self) -> int: ...


@dataclass
class ServerSnapshot:
    """A store server's counters at one moment (:meth:`rdzv.server.StoreServer.snapshot`).

    ``requests`` by opcode name (Python and C paths added); ``request_time`` per read;
    connections ``open``, ``accepted`` and ``closed`` by client kind; ``waiters`` parked;
    ``keys`` and ``value_bytes`` stored (values and queue items; None when not asked for);
    ``auth_failures`` by reason; ``limit_hits`` by limit; ``protocol_errors``; the durable
    journal's ``commits`` and ``fsync_time`` (None when the store is in memory);
    ``read_only``: writes are refused (the durable log cannot be written).
    """

    requests: dict[str, int]
    request_time: HistogramSnapshot
    open: dict[str, int]
    accepted: int
    closed: dict[str, int]
    waiters: int
    keys: int
    value_bytes: int | None
    auth_failures: dict[str, int]
    limit_hits: dict[str, int]
    protocol_errors: int
    commits: int | None
    fsync_time: HistogramSnapshot | None
    read_only: bool = False

    @classmethod
    def take(
        cls,
        stats: ServerStats,
        fast: _Counters | None,
        engine: _Engine,
        journal: _Journal | None,
        *,
        open: dict[str, int],
        waiters: int,
        sizes: bool,
        read_only: bool = False,
    ) -> ServerSnapshot:
        """Copy ``stats``, the fast path's counters and the engine's sizes (see
        :meth:`rdzv.server.StoreServer.snapshot`)."""
        counts = list(stats.requests)
        request_time = stats.request_time.snapshot()
        if fast is not None and fast.counting:
            ops, buckets, total_ns = fast.counters()
            for op, n in ops.items():
                counts[op] += n
            request_time = request_time.merged(
                HistogramSnapshot(request_time.bounds, buckets, total_ns * 1e-9)
            )
        return cls(
            requests={_op_name(op): n for op, n in enumerate(counts) if n},
            request_time=request_time,
            open=open,
            accepted=stats.accepted,
            closed=dict(stats.closed),
            waiters=waiters,
            keys=engine.num_keys(),
            value_bytes=engine.value_bytes() if sizes else None,
            auth_failures=dict(stats.auth_failures),
            limit_hits=dict(stats.limit_hits),
            protocol_errors=stats.protocol_errors,
            commits=None if journal is None else journal.commits,
            fsync_time=None if journal is None else journal.fsync_time.snapshot(),
            read_only=read_only,
        )

    def to_json(self) -> dict[str, Any]:
        """This snapshot as JSON-ready data (what the store process sends its metrics
        listener); :meth:`from_json` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServerSnapshot:
        """The snapshot :meth:`to_json` wrote (after a JSON round trip). Raises KeyError,
        TypeError or ValueError for data of another shape."""
        fields = dict(data)
        fields["request_time"] = HistogramSnapshot.from_json(fields["request_time"])
        if fields["fsync_time"] is not None:
            fields["fsync_time"] = HistogramSnapshot.from_json(fields["fsync_time"])
        return cls(**fields)


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return str(op)


@dataclass
class AgentStats:
    """Counters of an elastic agent (:class:`rdzv.launcher.agent.ElasticAgent`), updated by
    its thread: rendezvous ``rounds`` joined and the ``join_time`` of each, group
    ``restarts`` by cause (worker_failure, hang, scale_up, peer_lost, peer_restart,
    rendezvous), local ``worker_exits`` by cause (succeeded, exit_code, signal, stopped),
    ``hangs`` that restarted the group (detected on any node)."""

    rounds: int = 0
    join_time: Histogram = field(default_factory=lambda: Histogram(JOIN_BUCKETS))
    restarts: dict[str, int] = field(default_factory=dict)
    worker_exits: dict[str, int] = field(default_factory=dict)
    hangs: int = 0

    def restart(self, cause: str) -> None:
        self.restarts[cause] = self.restarts.get(cause, 0) + 1

    def worker_exit(self, cause: str) -> None:
        self.worker_exits[cause] = self.worker_exits.get(cause, 0) + 1
