"""Static rendezvous (backend ``"static"``): a fixed world on a TCPStore, no elasticity.

Same behaviour as torch's ``static_tcp_rendezvous``: every node knows its rank (config
``rank``, torchrun's ``--node-rank``) and the world size (``max_nodes``); rank 0 hosts a
:class:`~rdzv.TCPStore` server on the endpoint and waits for the others to connect; the
round's store is ``PrefixStore(run_id, store)`` and the bootstrap store (``MASTER_ADDR`` /
``MASTER_PORT`` for the workers) is the endpoint itself (``use_agent_store`` is True). There is
no failure detection: ``is_closed()`` is False, ``num_nodes_waiting()`` 0, ``set_closed()``
does nothing.

Differences from torch: the rank is checked against the world size when the handler is
created; ``bootstrap_store_info`` carries the port actually bound (an endpoint port of 0 on
a one-node world works); store errors while connecting become
:class:`~rdzv.errors.RendezvousConnectionError` / :class:`~rdzv.errors.RendezvousTimeoutError`
naming the endpoint; error texts are torch's with the missing spaces and grammar fixed.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from datetime import timedelta

from rdzv import auth
from rdzv.errors import (
    NetworkError,
    RendezvousConnectionError,
    RendezvousTimeoutError,
    StoreTimeoutError,
)
from rdzv.events import NodeState, record_rdzv_event_fields
from rdzv.rendezvous.api import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
)
from rdzv.rendezvous.utils import parse_rendezvous_endpoint
from rdzv.store.base import Store
from rdzv.store.prefix import PrefixStore

__all__ = ["DEFAULT_TIMEOUT_SECONDS", "StaticTCPRendezvous", "create_rdzv_handler"]

logger = logging.getLogger("rdzv.rendezvous.static")

#: Default ``timeout`` config value in seconds (torch's ``_default_timeout_seconds``).
DEFAULT_TIMEOUT_SECONDS = 600


class StaticTCPRendezvous(RendezvousHandler):
    """Static rendezvous of ``world_size`` nodes on the TCPStore at ``master_addr:master_port``.

    Args:
        master_addr: host of the store (rank 0 binds it, the others connect to it).
        master_port: its port (0 lets rank 0 pick one; only useful for a one-node world).
        rank: this node's rank, ``0 <= rank < world_size``.
        world_size: number of nodes.
        run_id: the job's id; the returned store is ``PrefixStore(run_id, store)``.
        timeout: seconds (or timedelta) allowed for connecting and, on rank 0, for all nodes
            to connect; also the store's default timeout.

    Raises ValueError for a rank outside ``[0, world_size)`` or a world size below 1.
    """

    def __init__(
        self,
        master_addr: str,
        master_port: int,
        rank: int,
        world_size: int,
        run_id: str,
        timeout: float | timedelta,
    ) -> None:
        if world_size < 1:
            raise ValueError(
                f"The world size of a static rendezvous must be >= 1, not {world_size}."
            )
        if not 0 <= rank < world_size:
            raise ValueError(
                f"The rank {rank} is outside the world of {world_size} node(s) of the static "
                f"rendezvous; --node-rank must be in [0, {world_size - 1}]."
            )
        self.master_addr = master_addr
        self.master_port = master_port
        self.rank = rank
        self.world_size = world_size
        self.run_id = run_id
        self.timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=timeout)
        self._store: Store | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"StaticTCPRendezvous(endpoint={self.master_addr}:{self.master_port}, "
            f"rank={self.rank}, world_size={self.world_size}, run_id={self.run_id!r})"
        )

    def get_backend(self) -> str:
        """``"static"``."""
        return "static"

    @property
    def use_agent_store(self) -> bool:
        """True: the workers reuse the store at the endpoint."""
        return True

    def _connect(self) -> Store:
        import rdzv

        endpoint = f"{self.master_addr}:{self.master_port}"
        role = "host the store on" if self.rank == 0 else "connect to the store at"
        try:
            store: Store = rdzv.TCPStore(
                self.master_addr,
                self.master_port,
                self.world_size,
                self.rank == 0,
                self.timeout,
                multi_tenant=True,
            )
        except (StoreTimeoutError, TimeoutError) as exc:
            waiting = f"all {self.world_size} nodes to connect" if self.rank == 0 else "the store"
            raise RendezvousTimeoutError(
                f"static rendezvous '{self.run_id}': rank {self.rank} timed out after "
                f"{self.timeout.total_seconds():g} s waiting for {waiting} at {endpoint}: {exc}"
            ) from exc
        except (NetworkError, OSError) as exc:
            raise RendezvousConnectionError(
                f"static rendezvous '{self.run_id}': rank {self.rank} could not {role} "
                f"{endpoint}: {exc}"
            ) from exc
        if self.rank == 0 and self.world_size > 1 and auth.load_token() is None:
            logger.warning(
                "%s", auth.unauthenticated_warning("the static rendezvous store", endpoint)
            )
        return store

    def next_rendezvous(self) -> RendezvousInfo:
        """Return the (only) round: the first call connects (rank 0: hosts the store and
        waits for every node), later calls reuse the store.

        Records rendezvous events (:mod:`rdzv.events`) named
        ``StaticTCPRendezvous.next_rendezvous``: RUNNING when connecting starts, SUCCEEDED
        with ``duration_ms`` when done, FAILED with the error otherwise.

        Raises RendezvousTimeoutError when the nodes do not all connect within ``timeout``,
        RendezvousConnectionError when the endpoint cannot be bound (rank 0) or reached.
        """
        with self._lock:
            if self._store is None:
                self._store = self._connect_recorded()
            store = self._store
        port = getattr(store, "port", self.master_port) or self.master_port
        return RendezvousInfo(
            PrefixStore(self.run_id, store),
            self.rank,
            self.world_size,
            RendezvousStoreInfo(self.master_addr, int(port)),
        )

    def _record(self, message: str, state: NodeState, duration_ms: float | None = None) -> None:
        record_rdzv_event_fields(
            "StaticTCPRendezvous.next_rendezvous",
            self.run_id,
            message,
            state,
            rank=self.rank,
            master_endpoint=f"{self.master_addr}:{self.master_port}",
            duration_ms=duration_ms,
        )

    def _connect_recorded(self) -> Store:
        started = time.monotonic()
        msg = f"{self!r}: joining"
        logger.info(msg)
        self._record(msg, NodeState.RUNNING)
        try:
            store = self._connect()
        except Exception as exc:
            self._record(f"{self!r}: {type(exc).__name__}: {exc}", NodeState.FAILED)
            raise
        elapsed_ms = (time.monotonic() - started) * 1000
        msg = (
            f"{self!r}: complete, rank {self.rank} in a world of size {self.world_size} "
            f"after {elapsed_ms:.0f} ms"
        )
        logger.info(msg)
        self._record(msg, NodeState.SUCCEEDED, elapsed_ms)
        return store

    def is_closed(self) -> bool:
        """Always False: a static rendezvous cannot be closed."""
        return False

    def set_closed(self) -> None:
        """Does nothing (a static rendezvous cannot be closed)."""

    def num_nodes_waiting(self) -> int:
        """Always 0: a static world admits no late nodes."""
        return 0

    def get_run_id(self) -> str:
        return self.run_id

    def shutdown(self) -> bool:
        """Returns True. The store is kept: other nodes may still be using it."""
        return True


def create_rdzv_handler(params: RendezvousParameters) -> RendezvousHandler:
    """Create a :class:`StaticTCPRendezvous` from launcher parameters.

    Uses ``params.endpoint`` (``host:port``, IPv6 in brackets), ``params.max_nodes`` as the
    world size, config ``rank`` (required) and ``timeout`` (seconds, default 600).

    Raises ValueError when ``rank`` is absent or not an integer, the endpoint is empty or has
    no port, the timeout is not a positive number, or the rank is outside the world.
    """
    if "rank" not in params.config:
        raise ValueError(
            "rank is absent in RendezvousParameters. Try adding --node-rank to the command line."
        )
    rank = params.get_as_int("rank")
    assert rank is not None
    endpoint = (params.endpoint or "").strip()
    if not endpoint:
        raise ValueError(
            "endpoint is absent in RendezvousParameters. Try adding --master-addr and "
            "--master-port to the command line."
        )
    master_addr, master_port = parse_rendezvous_endpoint(endpoint, -1)
    if master_port == -1:
        raise ValueError(
            f"Port is absent in endpoint: {endpoint}. Try launching with --master-port."
        )
    raw_timeout = params.get("timeout", DEFAULT_TIMEOUT_SECONDS)
    try:
        timeout = float(raw_timeout)
    except (TypeError, ValueError):
        timeout = math.nan
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(
            f"The rendezvous configuration option 'timeout' must be a positive number of "
            f"seconds, not {raw_timeout!r}."
        )
    return StaticTCPRendezvous(
        master_addr, master_port, rank, params.max_nodes, params.run_id, timeout
    )
