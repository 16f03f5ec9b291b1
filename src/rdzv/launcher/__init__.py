"""The elastic launcher behind ``rdzv run``: a torchrun-style agent for any framework.

* :class:`LaunchConfig` (:mod:`.config`): what to launch and how to supervise it;
* :func:`launch` (:mod:`.api`): create the rendezvous handler and run the agent;
* :class:`ElasticAgent` (:mod:`.agent`): rendezvous, spawn, monitor, restart, stop;
* :func:`connect` (:mod:`.worker`): in a worker, a client of the workers' store.

Nothing here imports the TCP store or a rendezvous backend until it is used.
"""

from __future__ import annotations

from rdzv.launcher.agent import ElasticAgent, RunResult, WorkerState
from rdzv.launcher.api import launch
from rdzv.launcher.config import LaunchConfig, Std
from rdzv.launcher.worker import connect

__all__ = [
    "ElasticAgent",
    "LaunchConfig",
    "RunResult",
    "Std",
    "WorkerState",
    "connect",
    "launch",
]
