"""Observability: Prometheus metrics and a live status page for ``rdzv serve`` and
``rdzv run`` (``--metrics-port``). Needs the ``metrics`` extra (``prometheus_client``).

The store server and the agent only keep plain counters and snapshots
(:mod:`rdzv.stats`, :meth:`rdzv.server.StoreServer.snapshot`,
:meth:`rdzv.launcher.agent.ElasticAgent.snapshot`); this package serves them over HTTP
(:mod:`rdzv.observe.http`): a store's from a listener process fed with a snapshot every
100 ms (:mod:`rdzv.observe.publisher`, :mod:`rdzv.observe.listener`), an agent's from
threads of the agent's process at scrape time; it turns them into metrics
(:mod:`rdzv.observe.metrics`) and status documents (:mod:`rdzv.observe.status`). Nothing
below imports it. See ``docs/observability.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rdzv.launcher.agent import ElasticAgent
    from rdzv.observe.http import ObserveServer
    from rdzv.observe.publisher import StoreListener
    from rdzv.server import StoreServer

__all__ = ["MISSING_EXTRA", "serve_agent", "serve_store"]

#: What to tell a user who asked for metrics without the extra installed.
MISSING_EXTRA = "metrics need prometheus_client: pip install 'rdzv[metrics]'"


def serve_store(
    server: StoreServer, host: str, port: int, tokens: Sequence[bytes] = ()
) -> StoreListener:
    """Start the metrics and status listener of a store server (``rdzv serve``) in a
    process of its own, fed with a snapshot of the server every
    :data:`~rdzv.observe.publisher.PUBLISH_PERIOD` seconds (scrapes never run in the store
    process); the server must have been created with ``metrics=True`` for request counts
    and times. Close it with ``close()``; it also exits with this process. Raises OSError
    when ``host:port`` cannot be bound, ImportError without ``prometheus_client``."""
    from rdzv.observe.publisher import StoreListener

    return StoreListener(server, host, port, tokens).start()


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
