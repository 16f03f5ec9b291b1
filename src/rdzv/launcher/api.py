""":func:`launch`: build the rendezvous handler for a :class:`LaunchConfig` and run the agent."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

from rdzv.launcher.agent import ElasticAgent, RunResult
from rdzv.launcher.config import LaunchConfig
from rdzv.launcher.logs import ConsoleWriter
from rdzv.rendezvous.api import RendezvousHandler, RendezvousParameters
from rdzv.store.base import Store

__all__ = ["STANDALONE_HOST", "launch", "rendezvous_parameters"]

_log = logging.getLogger("rdzv.launcher.api")

#: Where a ``--standalone`` agent hosts its store: loopback only, nothing is exposed.
STANDALONE_HOST = "127.0.0.1"


def rendezvous_parameters(
    config: LaunchConfig, endpoint: str | None = None
) -> RendezvousParameters:
    """torch's ``RendezvousParameters`` for ``config`` (``rdzv_configs`` become the config;
    ``endpoint`` overrides ``config.rdzv_endpoint``)."""
    return RendezvousParameters(
        backend=config.rdzv_backend,
        endpoint=config.rdzv_endpoint if endpoint is None else endpoint,
        run_id=config.run_id,
        min_nodes=config.min_nodes,
        max_nodes=config.max_nodes,
        local_addr=config.local_addr,
        **config.rdzv_configs,
    )


def _host_standalone_store() -> Store:
    from rdzv.store.tcp import TCPStore

    # Port 0: the kernel picks a free port and the server keeps it bound, so there is no
    # window in which another process could take it.
    return TCPStore(STANDALONE_HOST, 0, is_master=True, wait_for_workers=False, multi_tenant=True)


def _create_handler(params: RendezvousParameters) -> RendezvousHandler:
    from rdzv.rendezvous.registry import get_rendezvous_handler

    return get_rendezvous_handler(params)


def launch(
    config: LaunchConfig,
    cmd: Sequence[str],
    *,
    subreaper: bool = False,
    what: str | None = None,
    stdout: ConsoleWriter | None = None,
    stderr: ConsoleWriter | None = None,
    on_agent: Callable[[ElasticAgent], object] | None = None,
) -> RunResult:
    """Run ``cmd`` as ``config.nproc_per_node`` workers on this node, elastically.

    With ``config.standalone`` the agent first hosts a TCPStore server on 127.0.0.1 (port
    chosen by the kernel, kept bound) and joins a one-node ``c10d`` rendezvous on it as a
    client (``is_host=false``); that server is also the workers' store unless the handler
    offers its own. Otherwise the handler comes from the registry
    (:func:`rdzv.rendezvous.registry.get_rendezvous_handler`).

    ``on_agent(agent)`` is called with the :class:`~rdzv.launcher.agent.ElasticAgent` before
    it runs (``rdzv run --metrics-port`` starts its listener there).

    Returns the :class:`~rdzv.launcher.agent.RunResult` (worker failures and rendezvous
    failures are reported there). Raises ValueError for a configuration the backend rejects
    (unknown backend, missing endpoint or node rank) and the backend's RendezvousError if it
    cannot be reached at creation.
    """
    hosted: Store | None = None
    params: RendezvousParameters
    if config.standalone:
        if config.max_nodes > 1:
            raise ValueError(
                f"--standalone runs a single node, but --nnodes allows up to {config.max_nodes}; "
                "use --rdzv-endpoint for several nodes"
            )
        hosted = _host_standalone_store()
        port = getattr(hosted, "port", None)
        config = dataclasses.replace(
            config, rdzv_backend="c10d", rdzv_configs={"is_host": "false", **config.rdzv_configs}
        )
        params = rendezvous_parameters(config, endpoint=f"{STANDALONE_HOST}:{port}")
    else:
        params = rendezvous_parameters(config)
    try:
        handler = _create_handler(params)
        agent = ElasticAgent(
            config,
            cmd,
            handler,
            hosted_store=hosted,
            hosted_addr=STANDALONE_HOST if hosted is not None else None,
            subreaper=subreaper,
            stdout=stdout,
            stderr=stderr,
            what=what,
        )
        if on_agent is not None:
            on_agent(agent)
        return agent.run()
    finally:
        close = getattr(hosted, "close", None)
        if callable(close):
            close()
