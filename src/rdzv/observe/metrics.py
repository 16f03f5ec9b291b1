"""Prometheus collectors over the plain counters of the store server and the agent.

Each collector reads a snapshot at scrape time (:meth:`rdzv.server.StoreServer.snapshot`,
:class:`rdzv.stats.AgentStats`, :meth:`rdzv.launcher.agent.ElasticAgent.snapshot`) and
turns it into metric families; nothing is counted through ``prometheus_client`` on the hot
path. Metric names follow Prometheus conventions (``_total`` counters, ``_seconds``,
``_bytes``); the list is in ``docs/observability.md``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from rdzv.stats import HistogramSnapshot

if TYPE_CHECKING:
    from rdzv.launcher.agent import ElasticAgent
    from rdzv.server import StoreServer
    from rdzv.stats import ServerSnapshot

__all__ = ["AgentCollector", "ServerCollector", "SnapshotCache", "registry_for"]

#: Seconds a server snapshot with value sizes is reused: summing every value's size is
#: O(keys), so frequent scrapes (or the status page) must not repeat it each time.
SIZES_MAX_AGE = 1.0


def _histogram(name: str, doc: str, snap: HistogramSnapshot) -> HistogramMetricFamily:
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(snap.bounds, snap.counts, strict=False):
        running += count
        buckets.append((repr(float(bound)), running))
    buckets.append(("+Inf", running + snap.counts[-1]))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=snap.total)


def _by_label(
    name: str, doc: str, label: str, values: dict[str, int], known: tuple[str, ...] = ()
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key in sorted(set(known) | set(values)):
        family.add_metric([key], values.get(key, 0))
    return family


class SnapshotCache:
    """The server's snapshot, taken at most every ``max_age`` seconds with value sizes and
    fresh otherwise without (counters stay exact; only ``value_bytes`` may lag)."""

    def __init__(self, server: StoreServer, max_age: float = SIZES_MAX_AGE) -> None:
        self._server = server
        self._max_age = max_age
        self._lock = threading.Lock()
        self._sizes_at = -float("inf")
        self._value_bytes = 0

    def get(self) -> ServerSnapshot:
        now = time.monotonic()
        with self._lock:
            sizes = now - self._sizes_at >= self._max_age
            snap = self._server.snapshot(sizes=sizes)
            if sizes:
                self._sizes_at = now
                self._value_bytes = snap.value_bytes or 0
            else:
                snap.value_bytes = self._value_bytes
        return snap


class ServerCollector(Collector):
    """Metrics of a :class:`~rdzv.server.StoreServer` (``rdzv_store_*``) from the snapshots
    ``snapshot()`` returns (the latest the store process published)."""

    def __init__(self, snapshot: Callable[[], ServerSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        kinds = ("rdzv", "torch")
        opened = GaugeMetricFamily(
            "rdzv_store_connections_open",
            "Connections open, by client kind (rdzv: negotiated rdzv's extensions).",
            labels=["client"],
        )
        accepted = CounterMetricFamily(
            "rdzv_store_connections_accepted",
            "Connections accepted (open or since closed), by client kind.",
            labels=["client"],
        )
        for kind in kinds:
            opened.add_metric([kind], snap.open.get(kind, 0))
            accepted.add_metric([kind], snap.open.get(kind, 0) + snap.closed.get(kind, 0))
        yield opened
        yield accepted
        yield _by_label("rdzv_store_requests", "Requests executed, by opcode.", "op", snap.requests)
        yield _histogram(
            "rdzv_store_request_duration_seconds",
            "Server time per read: executing the requests one read delivered and writing "
            "their replies (one request for torch clients; parked waits excluded).",
            snap.request_time,
        )
        yield GaugeMetricFamily(
            "rdzv_store_waiters", "Waits parked (wait, barrier, blocking get).", snap.waiters
        )
        yield GaugeMetricFamily("rdzv_store_keys", "Keys stored.", snap.keys)
        yield GaugeMetricFamily(
            "rdzv_store_value_bytes",
            f"Bytes of the values and queue items stored (refreshed every {SIZES_MAX_AGE:g} s).",
            snap.value_bytes or 0,
        )
        yield _by_label(
            "rdzv_store_auth_failures",
            "Failed or refused authentications, by reason.",
            "reason",
            snap.auth_failures,
            ("wrong_token", "timeout", "unauthenticated"),
        )
        yield _by_label(
            "rdzv_store_limit_hits",
            "Connections closed or refused because a limit was hit, by limit.",
            "limit",
            snap.limit_hits,
            _LIMITS,
        )
        yield CounterMetricFamily(
            "rdzv_store_protocol_errors",
            "Connections closed for a protocol violation other than a limit.",
            snap.protocol_errors,
        )
        yield GaugeMetricFamily(
            "rdzv_store_read_only",
            "1 while the store refuses writes (its durable log cannot be written), else 0.",
            int(snap.read_only),
        )
        if snap.commits is not None and snap.fsync_time is not None:
            yield CounterMetricFamily(
                "rdzv_store_journal_commits", "Durable-log commits written.", snap.commits
            )
            yield _histogram(
                "rdzv_store_journal_fsync_duration_seconds",
                "Time of each fsync of the durable log.",
                snap.fsync_time,
            )


class AgentCollector(Collector):
    """Metrics of an :class:`~rdzv.launcher.agent.ElasticAgent` (``rdzv_agent_*``)."""

    def __init__(self, agent: ElasticAgent) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self._agent
        stats = agent.stats
        yield CounterMetricFamily(
            "rdzv_agent_rendezvous_rounds", "Rendezvous rounds this agent joined.", stats.rounds
        )
        yield _histogram(
            "rdzv_agent_rendezvous_join_duration_seconds",
            "Time from asking for the next rendezvous to its completion.",
            stats.join_time.snapshot(),
        )
        yield _by_label(
            "rdzv_agent_restarts",
            "Restarts of the worker group, by cause.",
            "cause",
            dict(stats.restarts),
            ("worker_failure", "hang", "scale_up", "peer_lost", "peer_restart", "rendezvous"),
        )
        yield _by_label(
            "rdzv_agent_worker_exits",
            "Local worker exits, by cause.",
            "cause",
            dict(stats.worker_exits),
            ("succeeded", "exit_code", "signal", "stopped"),
        )
        yield CounterMetricFamily(
            "rdzv_agent_hangs", "Worker hangs that restarted the group (any node's).", stats.hangs
        )
        snap = agent.snapshot()
        workers = GaugeMetricFamily(
            "rdzv_agent_workers",
            "Local workers of the current attempt, by state.",
            labels=["state"],
        )
        states: dict[str, int] = {}
        for worker in snap["workers"]:
            states[worker["state"]] = states.get(worker["state"], 0) + 1
        for state in sorted(
            {"running", "succeeded", "exit_code", "signal", "stopped"} | set(states)
        ):
            workers.add_metric([state], states.get(state, 0))
        yield workers
        peer: dict[str, Any] | None = snap["peer"]
        yield CounterMetricFamily(
            "rdzv_agent_peer_heartbeats",
            "Heartbeats this agent sent to its peers.",
            0 if peer is None else peer["beats"],
        )
        if peer is not None:
            yield GaugeMetricFamily(
                "rdzv_agent_peer_silence_seconds",
                "Seconds since the watched peer's heartbeat counter last moved.",
                peer["peer_silence"],
            )


_LIMITS = (
    "max_connections",
    "max_waits_per_connection",
    "max_wait_keys_per_connection",
    "max_output_bytes",
    "max_total_output_bytes",
    "max_partial_bytes",
    "request_limits",
)
_WORKER_STATES = ("running", "succeeded", "exit_code", "signal", "stopped")


def registry_for(*collectors: Collector) -> CollectorRegistry:
    """A private registry (not prometheus_client's global one) holding ``collectors``."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return registry
