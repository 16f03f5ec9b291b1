"""The elastic launcher behind ``rdzv run``: a torchrun-style agent for any framework.

* :class:`LaunchConfig` (:mod:`.config`): what to launch and how to supervise it;
* :func:`launch` (:mod:`.api`): create the rendezvous handler and run the agent;
* :class:`ElasticAgent` (:mod:`.agent`): rendezvous, spawn, monitor, restart, stop;
* :func:`connect` (:mod:`.connect`): in a worker, a client of the workers' store.

Submodules load on first use: a worker calling ``rdzv.connect()`` imports only
:mod:`.connect`, not the agent (tens of milliseconds of imports on every worker start).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ElasticAgent",
    "LaunchConfig",
    "RunResult",
    "Std",
    "WorkerState",
    "connect",
    "launch",
]

_LAZY = {
    "ElasticAgent": "rdzv.launcher.agent",
    "RunResult": "rdzv.launcher.agent",
    "WorkerState": "rdzv.launcher.agent",
    "LaunchConfig": "rdzv.launcher.config",
    "Std": "rdzv.launcher.config",
    "connect": "rdzv.launcher.connect",
    "launch": "rdzv.launcher.api",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rdzv.launcher' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
