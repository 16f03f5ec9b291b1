"""Observability: Prometheus metrics and a live status page for ``rdzv serve`` and
``rdzv run`` (``--metrics-port``). Needs the ``metrics`` extra (``prometheus_client``).

The store server and the agent only keep plain counters and snapshots
(:mod:`rdzv.stats`, :meth:`rdzv.server.StoreServer.snapshot`,
:meth:`rdzv.launcher.agent.ElasticAgent.snapshot`); this package reads them at scrape time
from threads of its own (:mod:`rdzv.observe.http`), turns them into metrics
(:mod:`rdzv.observe.metrics`) and status documents (:mod:`rdzv.observe.status`). Nothing
below imports it. See ``docs/observability.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rdzv.launcher.agent import ElasticAgent
    from rdzv.observe.http import ObserveServer
    from rdzv.server import StoreServer

__all__ = ["MISSING_EXTRA", "serve_agent", "serve_store"]

#: What to tell a user who asked for metrics without the extra installed.
MISSING_EXTRA = "metrics need prometheus_client: pip install 'rdzv[metrics]'"


def serve_store(
    server: StoreServer, host: str, port: int, tokens: Sequence[bytes] = ()
) -> ObserveServer:
    """Start the metrics and status listener of a store server (``rdzv serve``); the
    server must have been created with ``metrics=True`` for request counts and times.
    Raises OSError when ``host:port`` cannot be bound, ImportError without
    ``prometheus_client``."""
    from rdzv.observe.http import ObserveServer
    from rdzv.observe.metrics import ServerCollector, SnapshotCache, registry_for
    from rdzv.observe.status import StoreStatus

    cache = SnapshotCache(server)
    status = StoreStatus(cache, server.engine)
    return ObserveServer(
        host,
        port,
        registry=registry_for(ServerCollector(cache)),
        status=status,
        tokens=tokens,
        keys=status.keys,
    ).start()


def serve_agent(
    agent: ElasticAgent, host: str, port: int, tokens: Sequence[bytes] = ()
) -> ObserveServer:
    """Start the metrics and status listener of an elastic agent (``rdzv run``). Raises
    OSError when ``host:port`` cannot be bound, ImportError without ``prometheus_client``."""
    from rdzv.observe.http import ObserveServer
    from rdzv.observe.metrics import AgentCollector, registry_for
    from rdzv.observe.status import AgentStatus

    return ObserveServer(
        host,
        port,
        registry=registry_for(AgentCollector(agent)),
        status=AgentStatus(agent),
        tokens=tokens,
    ).start()
