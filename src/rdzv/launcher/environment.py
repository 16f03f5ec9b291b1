"""The workers' environment, assembled in one place for ``rdzv run`` and :func:`launch`.

Layers, later ones winning: this process's environment; the store's security settings from
``rdzv_configs`` (TLS files and the token *file name*, never the secret, see
:func:`rdzv.launcher.worker.security_env`); ``LaunchConfig.env``; torchrun's variables.
Because the security layer comes from the config, a :func:`rdzv.launcher.launch` called
from Python gives its workers what ``rdzv.connect()`` needs against a secured store, exactly
as the CLI does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from rdzv.launcher.assignment import Assignment
from rdzv.launcher.config import LaunchConfig
from rdzv.launcher.worker import ATTEMPT_ID_ENV, security_env

__all__ = ["worker_environment"]


def worker_environment(
    config: LaunchConfig,
    assignment: Assignment,
    local_rank: int,
    *,
    run_id: str,
    restart_count: int,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of worker ``local_rank`` of this node for ``assignment``.

    ``base`` is the inherited environment (default: ``os.environ``); ``run_id`` the
    rendezvous run id (``TORCHELASTIC_RUN_ID``); ``restart_count`` the restarts so far
    (``TORCHELASTIC_RESTART_COUNT``). Same variables as torchrun's workers get, plus
    ``RDZV_ATTEMPT_ID`` and the store security variables.
    """
    env = dict(os.environ if base is None else base)
    if config.nproc_per_node > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = "1"  # torchrun's default, to avoid oversubscription
    env.update(security_env(config.rdzv_configs))
    env.update(config.env)
    env.update(
        {
            "LOCAL_RANK": str(local_rank),
            "RANK": str(assignment.rank_base + local_rank),
            "GROUP_RANK": str(assignment.group_rank),
            "ROLE_RANK": str(assignment.role_rank_base + local_rank),
            "ROLE_NAME": config.role,
            "LOCAL_WORLD_SIZE": str(config.nproc_per_node),
            "WORLD_SIZE": str(assignment.world_size),
            "GROUP_WORLD_SIZE": str(assignment.group_world_size),
            "ROLE_WORLD_SIZE": str(assignment.role_world_size),
            "MASTER_ADDR": assignment.master_addr,
            "MASTER_PORT": str(assignment.master_port),
            "TORCHELASTIC_RESTART_COUNT": str(restart_count),
            "TORCHELASTIC_MAX_RESTARTS": str(config.max_restarts),
            "TORCHELASTIC_RUN_ID": run_id,
            "TORCHELASTIC_USE_AGENT_STORE": str(assignment.use_agent_store),
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
            ATTEMPT_ID_ENV: assignment.attempt_id,
        }
    )
    return env
