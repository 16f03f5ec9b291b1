"""The elastic rendezvous abstractions: parameters, handler ABC, info classes, registry.

Same names and contracts as ``torch.distributed.elastic.rendezvous`` (``api.py``), so code and
launchers written for torchelastic work with rdzv's handlers:

* :class:`RendezvousParameters`: what a launcher knows (backend, endpoint, run id, node
  bounds, free-form config) with typed getters;
* :class:`RendezvousHandler`: one node's view of a rendezvous; ``next_rendezvous()`` blocks
  until a round completes and returns a :class:`RendezvousInfo`;
* :class:`RendezvousHandlerRegistry` and the global :data:`rendezvous_handler_registry`;
* the errors (defined in :mod:`rdzv.errors`, re-exported here with torch's names).
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from rdzv.errors import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousStateError,
    RendezvousTimeoutError,
)
from rdzv.store.base import Store

__all__ = [
    "RendezvousBackend",
    "RendezvousClosedError",
    "RendezvousConnectionError",
    "RendezvousError",
    "RendezvousGracefulExitError",
    "RendezvousHandler",
    "RendezvousHandlerCreator",
    "RendezvousHandlerRegistry",
    "RendezvousInfo",
    "RendezvousParameters",
    "RendezvousStateError",
    "RendezvousStoreInfo",
    "RendezvousTimeoutError",
    "Token",
    "check_node_bounds",
    "rendezvous_handler_registry",
]


@dataclass
class RendezvousStoreInfo:
    """Where the workers' bootstrap store lives (``MASTER_ADDR``/``MASTER_PORT``).

    Same fields as torch's ``RendezvousStoreInfo``.
    """

    MASTER_ADDR_KEY: ClassVar[str] = "MASTER_ADDR"
    MASTER_PORT_KEY: ClassVar[str] = "MASTER_PORT"

    master_addr: str
    master_port: int

    @staticmethod
    def build(
        rank: int, store: Store, local_addr: str | None, server_port: int | None = None
    ) -> RendezvousStoreInfo:
        """Publish (rank 0) and read (every rank) the bootstrap address through ``store``.

        Rank 0 writes ``MASTER_ADDR`` = ``local_addr`` or this host's FQDN and ``MASTER_PORT`` =
        ``server_port`` (which must be given: rdzv never guesses a free port by binding and
        releasing one). Every rank then reads both keys, waiting up to the store's timeout.
        Raises ValueError if rank 0 has no port, :class:`~rdzv.errors.StoreTimeoutError` if
        rank 0 never publishes, RendezvousStateError if the published port is not a port.
        """
        if rank == 0:
            if server_port is None:
                raise ValueError("RendezvousStoreInfo.build: rank 0 must pass server_port")
            addr = local_addr or socket.getfqdn()
            store.multi_set(
                [RendezvousStoreInfo.MASTER_ADDR_KEY, RendezvousStoreInfo.MASTER_PORT_KEY],
                [addr.encode(), str(server_port).encode()],
            )
        raw_addr, raw_port = store.multi_get(
            [RendezvousStoreInfo.MASTER_ADDR_KEY, RendezvousStoreInfo.MASTER_PORT_KEY]
        )
        try:
            port = int(raw_port)
        except ValueError:
            raise RendezvousStateError(
                f"the published MASTER_PORT {raw_port[:32]!r} is not an integer port"
            ) from None
        if not 0 <= port <= 65535:
            raise RendezvousStateError(f"the published MASTER_PORT {port} is not in 0..65535")
        return RendezvousStoreInfo(raw_addr.decode("utf-8", "replace"), port)


class RendezvousInfo:
    """The result of a completed rendezvous round for one node.

    Attributes (read-only): ``store`` (a Store scoped to the round, shared by all
    participants), ``rank`` (0..world_size-1), ``world_size`` (number of participants),
    ``bootstrap_store_info`` (:class:`RendezvousStoreInfo` or None).
    """

    def __init__(
        self,
        store: Store,
        rank: int,
        world_size: int,
        bootstrap_store_info: RendezvousStoreInfo | None,
    ) -> None:
        self._store = store
        self._rank = rank
        self._world_size = world_size
        self._bootstrap_store_info = bootstrap_store_info

    @property
    def store(self) -> Store:
        return self._store

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def bootstrap_store_info(self) -> RendezvousStoreInfo | None:
        return self._bootstrap_store_info

    def __repr__(self) -> str:
        return (
            f"RendezvousInfo(rank={self._rank}, world_size={self._world_size}, "
            f"bootstrap_store_info={self._bootstrap_store_info!r})"
        )


class RendezvousHandler(ABC):
    """One node's handle on a rendezvous (same contract as torchelastic's handler)."""

    @abstractmethod
    def get_backend(self) -> str:
        """The name of the backend, as registered (e.g. ``"c10d"``, ``"static"``)."""

    @property
    def use_agent_store(self) -> bool:
        """Whether the store of :meth:`next_rendezvous` may be shared with the workers and
        advertised to them through ``MASTER_ADDR``/``MASTER_PORT``."""
        return False

    @abstractmethod
    def next_rendezvous(self) -> RendezvousInfo:
        """Join the next round and block until it completes.

        Raises RendezvousClosedError if the rendezvous is closed, RendezvousTimeoutError if
        the round did not complete in time, RendezvousConnectionError if the backend is
        unreachable, RendezvousStateError on corrupt state, RendezvousGracefulExitError when
        this node was not admitted and should exit cleanly.
        """

    @abstractmethod
    def is_closed(self) -> bool:
        """Whether the rendezvous is closed. Eventually consistent: a signal, not a lock."""

    @abstractmethod
    def set_closed(self) -> None:
        """Close the rendezvous: every later ``next_rendezvous`` raises
        RendezvousClosedError."""

    @abstractmethod
    def num_nodes_waiting(self) -> int:
        """How many nodes arrived after the current round completed and wait for the next
        one (a launcher restarts its workers to admit them). Eventually consistent."""

    @abstractmethod
    def get_run_id(self) -> str:
        """The run id the rendezvous was created with."""

    @abstractmethod
    def shutdown(self) -> bool:
        """Leave the rendezvous and release resources; True on success, False if the
        backend could not be told (the error is logged)."""

    def declare_lost(self, rank: int) -> bool:
        """The launcher's verdict that the node of ``rank`` in this node's last completed
        round is lost (its agent stopped heartbeating): a handler that watches liveness
        itself marks that node dead at once, so that the next round does not wait for a
        second, independent expiry. True if this call marked it; the default (no liveness
        of its own to update) returns False. Raises RendezvousConnectionError when the
        backend cannot be reached."""
        return False


#: A backend's fencing token: opaque to the handler, handed back to ``set_state``.
Token = Any


class RendezvousBackend(ABC):
    """A store of one opaque rendezvous state with a fencing token (torch's
    ``RendezvousBackend``, from ``dynamic_rendezvous``).

    Backends written for torch (a single compare-and-set blob: etcd, Kubernetes objects, a
    database row, ...) plug into :meth:`DynamicRendezvousHandler.from_backend
    <rdzv.rendezvous.dynamic.DynamicRendezvousHandler.from_backend>`, which runs torch's
    state-blob rendezvous on them (:mod:`rdzv.rendezvous.backend_state`). The handler writes
    its state as JSON; it refuses (never unpickles) a pickled state written by torch.
    """

    @property
    @abstractmethod
    def name(self) -> str:
        """The backend's name (what the handler's ``get_backend()`` reports)."""

    @abstractmethod
    def get_state(self) -> tuple[bytes, Token] | None:
        """The stored state and its fencing token, or None if there is no state yet.

        Raises RendezvousConnectionError if the backend cannot be reached,
        RendezvousStateError if what it holds is corrupt.
        """

    @abstractmethod
    def set_state(
        self, state: bytes, token: Token | None = None
    ) -> tuple[bytes, Token, bool] | None:
        """Set the state conditionally and return ``(state, token, has_set)``.

        * ``token`` is the current fencing token: ``state`` is stored; the new state, its
          new token and True are returned;
        * ``token`` is stale or invalid: nothing changes; the stored state, its token and
          False are returned;
        * ``token`` is None: ``state`` is stored only if the backend holds no state yet.

        Returns None if the backend holds no state afterwards. Raises as :meth:`get_state`.
        """


class RendezvousParameters:
    """What a launcher knows about the rendezvous it wants (torch's RendezvousParameters).

    Args:
        backend: registered backend name (non-empty).
        endpoint: backend endpoint, e.g. ``host:port`` (may be empty).
        run_id: the job's id, shared by every node.
        min_nodes: minimum number of nodes (>= 1).
        max_nodes: maximum number of nodes (>= min_nodes).
        local_addr: this node's address, if it must not be guessed.
        **kwargs: backend-specific configuration (``config``).

    Raises ValueError for an empty backend, ``min_nodes < 1`` or ``max_nodes < min_nodes``.
    """

    def __init__(
        self,
        backend: str,
        endpoint: str,
        run_id: str,
        min_nodes: int,
        max_nodes: int,
        local_addr: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not backend:
            raise ValueError("The rendezvous backend name must be a non-empty string.")
        check_node_bounds(min_nodes, max_nodes, "rendezvous nodes")
        self.backend = backend
        self.endpoint = endpoint
        self.run_id = run_id
        self.min_nodes = min_nodes
        self.max_nodes = max_nodes
        self.local_addr = local_addr
        self.config: dict[str, Any] = kwargs

    def __repr__(self) -> str:
        return (
            f"RendezvousParameters(backend={self.backend!r}, endpoint={self.endpoint!r}, "
            f"run_id={self.run_id!r}, min_nodes={self.min_nodes}, max_nodes={self.max_nodes}, "
            f"config={self.config!r})"
        )

    def get(self, key: str, default: Any = None) -> Any:
        """The config value of ``key``, or ``default``."""
        return self.config.get(key, default)

    def get_as_bool(self, key: str, default: bool | None = None) -> bool | None:
        """The config value of ``key`` as a bool: bools as is, ints 1/0, strings
        (case-insensitive) 1/true/t/yes/y and 0/false/f/no/n. Raises ValueError otherwise."""
        value = self.get(key, default)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            if value in (0, 1):
                return bool(value)
        elif isinstance(value, str):
            lowered = value.lower()
            if lowered in ("1", "true", "t", "yes", "y"):
                return True
            if lowered in ("0", "false", "f", "no", "n"):
                return False
        raise ValueError(
            f"The rendezvous configuration option '{key}' does not represent a valid boolean value."
        )

    def get_as_int(self, key: str, default: int | None = None) -> int | None:
        """The config value of ``key`` as an int (``int(value)``); ValueError otherwise."""
        value = self.get(key, default)
        if value is None:
            return value
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"The rendezvous configuration option '{key}' does not represent a valid "
                "integer value."
            ) from None


def check_node_bounds(min_nodes: int, max_nodes: int, noun: str = "nodes") -> None:
    """Validate ``1 <= min_nodes <= max_nodes`` with torch's messages ("The minimum number of
    {noun} ..."); raises ValueError naming both numbers."""
    if min_nodes < 1:
        raise ValueError(f"The minimum number of {noun} ({min_nodes}) must be greater than zero.")
    if max_nodes < min_nodes:
        raise ValueError(
            f"The maximum number of {noun} ({max_nodes}) must be greater than or equal to the "
            f"minimum number of {noun} ({min_nodes})."
        )


RendezvousHandlerCreator = Callable[[RendezvousParameters], RendezvousHandler]


class RendezvousHandlerRegistry:
    """Maps backend names to handler creators (same contract as torch's registry)."""

    def __init__(self) -> None:
        self._registry: dict[str, RendezvousHandlerCreator] = {}

    def register(self, backend: str, creator: RendezvousHandlerCreator) -> None:
        """Register ``creator`` under ``backend``. Re-registering the same creator is a no-op.

        Raises ValueError for an empty name or a name already taken by another creator.
        """
        if not backend:
            raise ValueError("The rendezvous backend name must be a non-empty string.")
        current = self._registry.get(backend)
        if current is not None:
            if current is creator:
                return
            raise ValueError(
                f"The rendezvous backend '{backend}' cannot be registered with '{creator}' as "
                f"it is already registered with '{current}'."
            )
        self._registry[backend] = creator

    def backends(self) -> list[str]:
        """The registered backend names, sorted."""
        return sorted(self._registry)

    def create_handler(self, params: RendezvousParameters) -> RendezvousHandler:
        """Create the handler for ``params.backend``.

        Raises ValueError if it is not registered (torch's message, exactly; the known
        backends are in a note of the exception, shown in its traceback), RuntimeError if the
        created handler reports another backend name.
        """
        creator = self._registry.get(params.backend)
        if creator is None:
            error = ValueError(
                f"The rendezvous backend '{params.backend}' is not registered. Did you forget "
                "to call `register`?"
            )
            if hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(f"Known backends: {', '.join(self.backends()) or 'none'}.")
            raise error
        handler = creator(params)
        if handler.get_backend() != params.backend:
            raise RuntimeError(
                f"The rendezvous backend '{handler.get_backend()}' does not match the requested "
                f"backend '{params.backend}'."
            )
        return handler


#: The process-wide registry (torch's ``rendezvous_handler_registry``).
rendezvous_handler_registry = RendezvousHandlerRegistry()
