"""Worker side: :func:`connect`, a store client built from the launcher's environment.

Works under ``rdzv run`` and under ``torchrun`` (same variables). Light on purpose: it imports
neither the agent nor the rendezvous machinery.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from rdzv.store.base import Store, TimeoutLike
from rdzv.store.prefix import PrefixStore

if TYPE_CHECKING:
    from rdzv.tls import TLSConfig

__all__ = [
    "ATTEMPT_ID_ENV",
    "SECURITY_ENV",
    "client_security",
    "connect",
    "security_env",
    "worker_store_prefix",
]

#: Set by ``rdzv run`` for every worker: the id of this incarnation of the worker group, the
#: same on every node and new after every restart or re-rendezvous.
ATTEMPT_ID_ENV = "RDZV_ATTEMPT_ID"

_TRUE = ("true", "1", "yes", "y", "t")

#: Rendezvous config keys (``--rdzv-conf``) that secure the store, and the environment
#: variables through which ``rdzv run`` hands them to its workers for :func:`connect`.
SECURITY_ENV = {
    "tls_ca": "RDZV_TLS_CA",
    "tls_cert": "RDZV_TLS_CERT",
    "tls_key": "RDZV_TLS_KEY",
    "tls_server_hostname": "RDZV_TLS_SERVER_HOSTNAME",
    "token_file": "RDZV_TOKEN_FILE",
}


def security_env(rdzv_configs: Mapping[str, object]) -> dict[str, str]:
    """The worker environment carrying the TLS and token settings found in
    ``rdzv_configs`` (keys of :data:`SECURITY_ENV`; the token's *file name* travels, never the
    secret)."""
    return {
        var: str(rdzv_configs[key]) for key, var in SECURITY_ENV.items() if rdzv_configs.get(key)
    }


def _require(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    if not value:
        raise RuntimeError(
            f"rdzv.connect(): the environment variable {name} is not set; run this program "
            "under `rdzv run` (or torchrun), which sets MASTER_ADDR, MASTER_PORT, RANK and "
            "WORLD_SIZE for each worker"
        )
    return value


def _int(env: Mapping[str, str], name: str) -> int:
    raw = _require(env, name)
    try:
        return int(raw)
    except ValueError:
        raise RuntimeError(f"rdzv.connect(): {name}={raw!r} is not an integer") from None


def worker_store_prefix(env: Mapping[str, str] | None = None) -> str:
    """The namespace :func:`connect` scopes the store to:
    ``rdzv.worker/{TORCHELASTIC_RUN_ID}/{RDZV_ATTEMPT_ID}`` (under torchrun, which has no
    attempt id, ``TORCHELASTIC_RESTART_COUNT`` stands in)."""
    env = os.environ if env is None else env
    run_id = env.get("TORCHELASTIC_RUN_ID") or "none"
    attempt = env.get(ATTEMPT_ID_ENV) or "restart" + env.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"rdzv.worker/{run_id}/{attempt}"


def client_security(env: Mapping[str, str]) -> tuple[str | None, TLSConfig | None]:
    """``(token_file, tls)`` for a store client from the variables of :data:`SECURITY_ENV`."""
    tls_files = {
        key[len("tls_") :]: env[var]
        for key, var in SECURITY_ENV.items()
        if key.startswith("tls_") and env.get(var)
    }
    tls = None
    if tls_files:
        from rdzv.tls import TLSConfig

        tls = TLSConfig(**tls_files)
    return env.get(SECURITY_ENV["token_file"]) or None, tls


def connect(
    timeout: TimeoutLike = 300.0,
    *,
    scoped: bool = True,
    env: Mapping[str, str] | None = None,
) -> Store:
    """A client of the workers' store, the TCPStore at ``MASTER_ADDR:MASTER_PORT``.

    Under ``rdzv run`` the store is hosted by the agent (``TORCHELASTIC_USE_AGENT_STORE=True``)
    and every worker is a client. Otherwise (``TORCHELASTIC_USE_AGENT_STORE`` not true, e.g.
    torchrun with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) rank 0 hosts it, like
    ``init_process_group(init_method="env://")``.

    Args:
        timeout: default timeout of blocking calls (seconds or timedelta); also the time to
            connect.
        scoped: return a :class:`~rdzv.store.prefix.PrefixStore` over
            :func:`worker_store_prefix`, so keys of this attempt never meet keys left by a
            failed earlier attempt or by another job sharing the store (default). False
            returns the raw client (the namespace torch's ``env://`` uses).
        env: the environment to read (default ``os.environ``).

    Returns a :class:`~rdzv.store.base.Store` with torch's API (``set``, ``get``, ``add``,
    ``wait``, ``barrier``, ...).

    Security: TLS settings come from ``RDZV_TLS_CA``, ``RDZV_TLS_CERT``, ``RDZV_TLS_KEY`` and
    ``RDZV_TLS_SERVER_HOSTNAME``, the shared secret from ``RDZV_TOKEN_FILE`` or ``RDZV_TOKEN``;
    ``rdzv run`` sets them from ``--rdzv-conf tls_ca=...,token_file=...`` (see
    :func:`security_env`).

    Under ``rdzv run`` a thread of the returned store watches for a failure of another
    worker (or a hang, or a lost node) anywhere in the job: a call blocked in the store then
    raises :class:`~rdzv.errors.PeerFailedError` naming the root cause at once, and so does
    every later call (see :mod:`rdzv.launcher.peerwatch`).

    Raises RuntimeError naming the variable when MASTER_ADDR, MASTER_PORT, RANK or WORLD_SIZE
    is missing or malformed, and :class:`~rdzv.errors.NetworkError` /
    :class:`~rdzv.errors.StoreTimeoutError` when the store cannot be reached in time.
    """
    from rdzv.store.tcp import TCPStore

    env = os.environ if env is None else env
    addr = _require(env, "MASTER_ADDR")
    port = _int(env, "MASTER_PORT")
    rank = _int(env, "RANK")
    world_size = _int(env, "WORLD_SIZE")
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE", "").strip().lower() in _TRUE
    token_file, tls = client_security(env)
    store: TCPStore
    if agent_store:
        store = TCPStore(
            addr, port, is_master=False, timeout=timeout, token_file=token_file, tls=tls
        )
    else:
        store = TCPStore(
            addr,
            port,
            world_size,
            is_master=rank == 0,
            timeout=timeout,
            token_file=token_file,
            tls=tls,
        )
    from rdzv.launcher.heartbeat import install_stack_dumper

    install_stack_dumper()
    attempt = env.get(ATTEMPT_ID_ENV)
    if attempt:  # under rdzv run: a peer's failure interrupts our blocked calls at once
        from rdzv.launcher.failures import worker_failure_key
        from rdzv.launcher.peerwatch import watch_failures

        watch_failures(store, worker_failure_key(env.get("TORCHELASTIC_RUN_ID") or "none", attempt))
    if scoped:
        return PrefixStore(worker_store_prefix(env), store)
    return store
