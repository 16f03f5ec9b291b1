"""The dynamic rendezvous: torchelastic's semantics on any Store, O(1) operations per node.

:class:`DynamicRendezvousHandler` has the behaviour of torch's handler of the same name
(``torch.distributed.elastic.rendezvous.dynamic_rendezvous``): rounds that complete when
``max_nodes`` nodes are in, or ``last_call`` seconds after ``min_nodes`` are; late arrivals
wait for the next round and make :meth:`~DynamicRendezvousHandler.num_nodes_waiting` non-zero;
spare nodes beyond ``max_nodes`` wait without timeout and exit gracefully when the rendezvous
closes; dead nodes are removed; a round may complete only once every member of the previous
round has come back, left or died.

It does not share torch's algorithm. Instead of one pickled blob rewritten by everyone with
compare_set and re-read every second, every node touches a handful of small keys (a slot
counter, its own descriptor and heartbeat, its own rank record), the first node able to close
a round does so with one compare_set, and every wait is a server-pushed ``wait`` on the one
key whose appearance matters. Values are validated JSON (:mod:`rdzv.rendezvous.state`), never
pickle. Liveness never compares clocks of different machines (:mod:`rdzv.rendezvous.liveness`).
The algorithm, the keys and the failure cases are described in ``docs/rendezvous.md``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import secrets
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

from rdzv.errors import (
    RendezvousClosedError,
    RendezvousError,
    RendezvousGracefulExitError,
    StoreError,
)
from rdzv.events import NodeState, record_rdzv_event_fields
from rdzv.rendezvous.api import (
    RendezvousBackend,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
    Token,
)
from rdzv.rendezvous.decision import (
    Bootstrap,
    CleanUp,
    Completed,
    Record,
    RendezvousCore,
    RendezvousSettings,
    RendezvousTimeout,
    Track,
    _Pending,
    clean_up_program,
)
from rdzv.rendezvous.keepalive import KeepAlive
from rdzv.rendezvous.liveness import HeartbeatLiveness, Liveness
from rdzv.rendezvous.ops import Effect, Program, record_node_lost, rendezvous_error, run_blocking
from rdzv.rendezvous.state import RankRecord, RoundKeys, RunKeys, SizeRecord
from rdzv.store.base import Store, handle_for_thread
from rdzv.store.prefix import PrefixStore

__all__ = [
    "DynamicRendezvousHandler",
    "RendezvousBackend",
    "RendezvousSettings",
    "RendezvousTimeout",
    "Token",
    "create_handler",
]

logger = logging.getLogger("rdzv.rendezvous.dynamic")
_T = TypeVar("_T")

#: torch's opt-out of sharing the agent's store with the workers.
DISABLE_SHARE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


_local_ids = itertools.count()
_local_ids_lock = threading.Lock()
_fqdn: str | None = None


def _next_local_id() -> int:
    with _local_ids_lock:
        return next(_local_ids)


def _this_host() -> str:
    global _fqdn
    if _fqdn is None:
        _fqdn = socket.getfqdn()
    return _fqdn


# ---------------------------------------------------------------------------- the handler
class DynamicRendezvousHandler(RendezvousHandler):
    """A node's handle on a dynamic rendezvous kept in any rdzv :class:`~rdzv.store.base.Store`.

    Same semantics as torch's ``DynamicRendezvousHandler`` (see the module docstring and
    ``docs/rendezvous.md`` for the algorithm and the differences).

    Args:
        run_id: the job's id, shared by every node (non-empty).
        store: the store that holds the rendezvous (and, under a per-round prefix, the store
            returned in :class:`RendezvousInfo`). It needs add, compare_set, check, wait,
            get, set, multi_get, multi_set and delete_key.
        min_nodes: minimum number of nodes of a round (>= 1).
        max_nodes: maximum number of nodes of a round (>= min_nodes).
        backend_name: what :meth:`get_backend` reports (e.g. ``"c10d"``, ``"etcd"``).
        local_addr: this node's address (default: the FQDN).
        timeout: a :class:`RendezvousTimeout` (None: torch's defaults).
        keep_alive_interval: seconds (or timedelta) between heartbeats (default 5).
        keep_alive_max_attempt: missed heartbeats before a node is dead (default 3).
        liveness: how nodes prove they are alive (default :class:`HeartbeatLiveness` with the
            two settings above; an etcd backend passes a lease-based one).
        master_endpoint: ``(host, port)`` published as ``MASTER_ADDR``/``MASTER_PORT`` when
            this node becomes rank 0, e.g. the TCPStore server the handler talks to (torch's
            ``use_agent_store`` behaviour). None: the node that becomes rank 0 starts a
            TCPStore server on ``local_addr`` (port chosen by the OS) and publishes it, as
            torch does.
        key_prefix: namespace of the rendezvous keys (default ``rdzv/<run_id>/``).

    The handler opens a second handle on the store (``store.clone()``, a connection for a
    TCPStore) for its keep-alive thread, and a third one on the first ``is_closed``,
    ``set_closed`` or ``shutdown``.

    Raises ValueError for an empty run id, ``min_nodes < 1`` or ``max_nodes < min_nodes``
    (torch's messages), TypeError for a store that is not an rdzv Store,
    RendezvousConnectionError if the store cannot be cloned (server unreachable).
    """

    def __init__(
        self,
        run_id: str,
        store: Store,
        min_nodes: int,
        max_nodes: int,
        *,
        backend_name: str = "dynamic",
        local_addr: str | None = None,
        timeout: RendezvousTimeout | None = None,
        keep_alive_interval: timedelta | float = 5.0,
        keep_alive_max_attempt: int = 3,
        liveness: Liveness | None = None,
        master_endpoint: tuple[str, int] | None = None,
        key_prefix: str | None = None,
    ) -> None:
        self._settings = RendezvousSettings.checked(
            run_id, min_nodes, max_nodes, timeout, keep_alive_interval, keep_alive_max_attempt
        )
        if not isinstance(store, Store):
            raise TypeError(f"store must be an rdzv Store, got {type(store).__name__}")
        interval = self._settings.keep_alive_interval
        self._store = store
        self._backend_name = backend_name
        self._liveness = liveness or HeartbeatLiveness(
            interval.total_seconds(), keep_alive_max_attempt
        )
        self._interval = interval.total_seconds()
        self._master_endpoint = master_endpoint
        self._keys = RunKeys(key_prefix if key_prefix is not None else f"rdzv/{run_id}/")
        self._local_id = _next_local_id()
        self._addr = local_addr or _this_host()
        self._nonce = secrets.token_hex(8)
        self._core = RendezvousCore(
            self._settings,
            self._keys,
            self._liveness,
            addr=self._addr,
            pid=os.getpid(),
            local_id=self._local_id,
            nonce=self._nonce,
        )
        self._join_lock = threading.Lock()
        self._control_lock = threading.Lock()
        self._control_store: Store | None = None
        self._keep_alive: KeepAlive | None = None
        self._bootstrap_server: Any = None
        self._bootstrap_info: RendezvousStoreInfo | None = None
        self._shut_down = False
        # The keep-alive thread's own connection, opened now (like the store itself) rather
        # than in the middle of a rendezvous.
        self._keep_alive_store = self._guard(lambda: handle_for_thread(store))

    @classmethod
    def from_backend(
        cls,
        run_id: str,
        store: Store,
        backend: RendezvousBackend,
        min_nodes: int,
        max_nodes: int,
        local_addr: str | None = None,
        timeout: RendezvousTimeout | None = None,
        keep_alive_interval: timedelta | float = 5,
        keep_alive_max_attempt: int = 3,
    ) -> DynamicRendezvousHandler:
        """torch's constructor: a handler running torch's state-blob rendezvous on a
        :class:`~rdzv.rendezvous.api.RendezvousBackend` (a
        :class:`~rdzv.rendezvous.backend_state.BackendRendezvousHandler`, registered as a
        DynamicRendezvousHandler). Same arguments, defaults and ValueError texts as torch's
        ``DynamicRendezvousHandler.from_backend``."""
        from rdzv.rendezvous.backend_state import BackendRendezvousHandler

        handler = BackendRendezvousHandler(
            run_id,
            store,
            backend,
            min_nodes,
            max_nodes,
            local_addr,
            timeout,
            keep_alive_interval,
            keep_alive_max_attempt,
        )
        assert isinstance(handler, DynamicRendezvousHandler)
        return handler

    # ------------------------------------------------------------------ public API
    @property
    def settings(self) -> RendezvousSettings:
        """The settings of the rendezvous."""
        return self._settings

    @property
    def liveness(self) -> Liveness:
        return self._liveness

    @property
    def node(self) -> str:
        """This node's descriptor, ``{addr}_{pid}_{local_id}`` as torch prints it."""
        return f"{self._addr}_{os.getpid()}_{self._local_id}"

    def get_backend(self) -> str:
        return self._backend_name

    def get_run_id(self) -> str:
        return self._settings.run_id

    @property
    def use_agent_store(self) -> bool:
        """True unless ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (torch's switch): the
        published ``MASTER_ADDR``/``MASTER_PORT`` then name a live store server that the
        workers may share instead of hosting their own."""
        return os.environ.get(DISABLE_SHARE_ENV, "0") != "1"

    def next_rendezvous(self) -> RendezvousInfo:
        """Join the next round and block until it completes; see the base class.

        Raises RendezvousClosedError if the rendezvous is closed; RendezvousGracefulExitError
        if it was closed while this node waited as a spare (beyond ``max_nodes``);
        RendezvousTimeoutError if no round admitted this node within the join timeout (the
        node then leaves the round it waited in: rollback); RendezvousStateError on corrupt
        or hostile values in the store; RendezvousConnectionError if the store failed.
        """
        with self._join_lock:
            if self._shut_down:
                raise RendezvousClosedError(
                    f"The handler of node '{self.node}' has been shut down; create a new one."
                )
            started = time.monotonic()
            self._record(
                f"The node '{self.node}' attempts to join the next round of the rendezvous "
                f"'{self._settings.run_id}'.",
                NodeState.RUNNING,
            )
            try:
                info = self._guard(self._next_rendezvous)
            except RendezvousGracefulExitError as exc:
                self._record(str(exc), NodeState.SUCCEEDED, started=started)
                raise
            except RendezvousError as exc:
                self._record(f"{type(exc).__name__}: {exc}", NodeState.FAILED, started=started)
                raise
            bootstrap = info.bootstrap_store_info
            membership = self._membership
            assert membership is not None
            self._record(
                f"The node '{self.node}' has joined round {membership.keys.number} of the "
                f"rendezvous '{self._settings.run_id}' as rank {info.rank} in a world of "
                f"size {info.world_size}.",
                NodeState.RUNNING,
                rank=info.rank,
                started=started,
                master=f"{bootstrap.master_addr}:{bootstrap.master_port}" if bootstrap else "",
            )
            return info

    def is_closed(self) -> bool:
        """Whether the rendezvous is closed (one ``check``). Raises
        RendezvousConnectionError if the store failed."""
        return self._guard(lambda: self._control().check([self._keys.closed]))

    def set_closed(self) -> None:
        """Close the rendezvous: nodes waiting in the open round wake up with
        RendezvousClosedError (spares with RendezvousGracefulExitError) and every later
        ``next_rendezvous`` raises RendezvousClosedError. Idempotent.

        Raises RendezvousTimeoutError if it could not finish within the close timeout,
        RendezvousConnectionError if the store failed.
        """
        started = time.monotonic()
        try:
            self._guard(self._close)
        except RendezvousError as exc:
            self._record(f"{type(exc).__name__}: {exc}", NodeState.FAILED, started=started)
            raise
        self._record(
            f"The node '{self.node}' has closed the rendezvous '{self._settings.run_id}'.",
            NodeState.SUCCEEDED,
            started=started,
        )

    def num_nodes_waiting(self) -> int:
        """How many nodes wait for a round after the one this node completed (torch's wait
        list). Spares that arrive while the round has ``max_nodes`` members are not counted
        (torch's redundancy list) until a member leaves or dies.

        Costs no store operation: the keep-alive thread waits (server-pushed) for the first
        such node and then refreshes the count at each heartbeat. 0 while this node is not
        a member of a completed round.
        """
        keep_alive = self._keep_alive
        if keep_alive is None or self._membership is None:
            return 0
        return keep_alive.waiting()

    def shutdown(self) -> bool:
        """Stop the heartbeats, leave the current round and close the rendezvous (torch's
        behaviour: a launcher calls it when the job ends). True on success, False if the
        store could not be told (the error is logged and recorded): a lost connection to
        the store is not reconnected here, so a server that is gone (its host agent exited
        first) fails the call at once, as with torch's client, and the connection stays
        closed. Idempotent. As torch's
        keep-alive timer, the keep-alive thread has exited when it returns: closing rings
        its doorbell, and the wait for it is bounded by one keep-alive interval + 1 s."""
        started = time.monotonic()
        if self._keep_alive is not None:
            self._keep_alive.stop()
        try:
            # A control connection not opened yet is not opened now (to a server that may
            # be gone, its connect would retry for the store timeout): the handler's own
            # connection closes the rendezvous, as torch's single store does.
            control = self._control_store or self._store
            with _without_reconnecting(self._store, control):
                self._guard(self._leave_all)
                self._guard(lambda: self._close(control))
        except RendezvousError as exc:
            msg = (
                f"The node '{self.node}' has failed to shutdown the rendezvous "
                f"'{self._settings.run_id}' due to an error of type {type(exc).__name__}: {exc}"
            )
            logger.warning(msg)
            self._record(msg, NodeState.FAILED, started=started)
            return False
        finally:
            self._shut_down = True
            if self._keep_alive is not None:
                # closing rang the thread's doorbell (or the store is gone and its wait
                # failed): it exits at once; as torch's timer, it is gone when we return
                self._keep_alive.stop(join=True)
        self._record(
            f"The node '{self.node}' has shut down its handler of the rendezvous "
            f"'{self._settings.run_id}'.",
            NodeState.SUCCEEDED,
            started=started,
        )
        return True

    # ------------------------------------------------------------------ plumbing
    def _record(
        self,
        message: str,
        state: NodeState,
        *,
        rank: int | None = None,
        started: float | None = None,
        master: str = "",
    ) -> None:
        record_rdzv_event_fields(
            f"{type(self).__name__}.{_caller()}",
            self._settings.run_id,
            message,
            state,
            rank=rank,
            local_id=self._local_id,
            master_endpoint=master,
            duration_ms=None if started is None else (time.monotonic() - started) * 1000.0,
        )

    def declare_lost(self, rank: int) -> bool:
        """See :meth:`RendezvousHandler.declare_lost`: marks the liveness key of the slot
        that held ``rank`` in this node's last completed round dead, so that the next round
        forms without waiting for the keep-alive expiry."""
        member = self._membership
        if member is None or rank == member.rank:
            return False
        keys, max_nodes = member.keys, self._settings.max_nodes

        def mark() -> bool:
            store = self._control()
            size = SizeRecord.decode(keys.size, store.get(keys.size), max_nodes)
            slots = size.members()
            raws = store.multi_get([keys.rank(s) for s in slots]) if slots else []
            for slot, raw in zip(slots, raws, strict=True):
                if RankRecord.decode(keys.rank(slot), raw, max_nodes).rank == rank:
                    if self._liveness.declare_dead(store, keys.alive(slot), self.node):
                        logger.warning(
                            "the node of rank %d (slot %d of round %d) was declared lost by "
                            "the launcher; marked dead in the rendezvous",
                            rank,
                            slot,
                            keys.number,
                        )
                        return True
                    return False
            return False

        return self._guard(mark)

    def _guard(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn``; store failures become RendezvousConnectionError (with the cause)."""
        try:
            return fn()
        except RendezvousError:
            raise
        except Exception as exc:
            error = rendezvous_error(exc, self._settings.run_id, repr(self._store))
            if error is None:
                raise
            raise error from exc

    def _control(self) -> Store:
        with self._control_lock:
            if self._control_store is None:
                self._control_store = handle_for_thread(self._store)
            return self._control_store

    def _ensure_keep_alive(self) -> KeepAlive:
        if self._keep_alive is None or not self._keep_alive.is_alive():
            keep_alive = KeepAlive(
                self._keep_alive_store,
                self._liveness,
                self._interval,
                self._settings.timeout.heartbeat.total_seconds(),
                f"RendezvousKeepAliveTimer_{self._local_id}",
                functools.partial(
                    _record_keep_alive, self._settings.run_id, type(self).__name__, self._local_id
                ),
            )
            weakref.finalize(self, keep_alive.stop)
            self._keep_alive = keep_alive
        return self._keep_alive

    def _offered_master(self) -> tuple[str, int] | None:
        """The bootstrap endpoint this node's descriptor offers if it becomes rank 0."""
        master = self._master_endpoint
        if master is None and self._bootstrap_info is not None and self._bootstrap_server:
            master = (self._bootstrap_info.master_addr, self._bootstrap_info.master_port)
        return master if self.use_agent_store else None

    # ------------------------------------------------------------------ the executor
    @property
    def _membership(self) -> Completed | None:
        return self._core.membership

    @property
    def _pending(self) -> _Pending | None:
        return self._core.pending

    def _run(self, program: Program[_T], store: Store | None = None) -> _T:
        """Run a decision of the core on ``store`` (default: the handler's)."""
        return run_blocking(self._store if store is None else store, program, self._effect)

    def _effect(self, effect: Effect) -> Any:
        if isinstance(effect, Track):
            assert self._keep_alive is not None
            self._keep_alive.track(effect.key)
        elif isinstance(effect, Bootstrap):
            return self._provide_bootstrap()
        elif isinstance(effect, CleanUp):
            self._clean_up_later(effect.number)
        elif isinstance(effect, Record):
            record_node_lost(
                type(self).__name__, self._settings.run_id, effect.message, self._local_id
            )
        else:
            raise TypeError(f"no executor for the effect {effect!r}")
        return None

    def _provide_bootstrap(self) -> tuple[str, int]:
        """Rank 0 without a bootstrap endpoint in its descriptor: start (once) a TCPStore
        server, or with sharing disabled pick a free port for the workers' own store (torch's
        behaviour)."""
        if self.use_agent_store:
            if self._bootstrap_server is None:
                from rdzv.store.tcp import TCPStore

                self._bootstrap_server = TCPStore(self._addr, 0, is_master=True, multi_tenant=True)
            return self._addr, int(self._bootstrap_server.port)
        return self._addr, _free_port(self._addr)

    def _next_rendezvous(self) -> RendezvousInfo:
        keep_alive = self._ensure_keep_alive()
        keep_alive.set_pending()
        done = self._run(self._core.next_rendezvous(self._offered_master()))
        keys = done.keys
        round_store = PrefixStore(keys.store_prefix, self._store)
        self._bootstrap_info = RendezvousStoreInfo(done.master[0], done.master[1])
        keep_alive.set_running(*self._core.doorbells(done))
        return RendezvousInfo(round_store, done.rank, done.world_size, self._bootstrap_info)

    def _join(self, number: int) -> tuple[_Pending, bool]:
        """Take a slot in round ``number`` (a step of :meth:`next_rendezvous`)."""
        return self._run(self._core.join(number, None, self._offered_master()))

    def _leave_all(self) -> None:
        self._run(self._core.leave_all())

    def _close(self, store: Store | None = None) -> None:
        self._run(self._core.close(), self._control() if store is None else store)

    # ------------------------------------------------------------------ clean-up
    def _clean_up_later(self, number: int) -> None:
        thread = threading.Thread(
            target=_clean_up_round,
            args=(self._store, self._keys.of(number)),
            name=f"RendezvousCleanUp_{self._local_id}_{number}",
            daemon=True,
        )
        thread.start()


@contextlib.contextmanager
def _without_reconnecting(*stores: Store | None) -> Iterator[None]:
    """Within the block, the stores among ``stores`` that reconnect a lost connection
    (TCPStore's ``reconnect``, also under a PrefixStore) raise at once instead.

    For shutdown's last calls: when a launcher's job ends, the agent hosting the store may
    exit first, and the others' shutdown must not spend the store timeout reconnecting to
    a server that is gone (torch's client, which never reconnects, fails at once there, and
    so does this shutdown: it returns False with the error logged).
    """
    switched = []
    for store in stores:
        while isinstance(store, PrefixStore):
            store = store.underlying_store
        if store is not None and getattr(store, "reconnect", None) is True:
            store.reconnect = False  # type: ignore[attr-defined]  # TCPStore's property
            switched.append(store)
    try:
        yield
    finally:
        for store in switched:
            store.reconnect = True  # type: ignore[attr-defined]


def _record_keep_alive(
    run_id: str, cls: str, local_id: int, message: str, state: NodeState
) -> None:
    record_rdzv_event_fields(f"{cls}._keep_alive", run_id, message, state, local_id=local_id)


def _clean_up_round(origin: Store, keys: RoundKeys) -> None:
    """Delete the keys of a round that every node has left (two rounds back)."""
    try:
        store = handle_for_thread(origin)
        run_blocking(store, clean_up_program(keys))
        user = PrefixStore(keys.store_prefix, store)
        with contextlib.suppress(NotImplementedError):
            for key in user.list_keys():
                user.delete_key(key)
        logger.debug("deleted the keys of round %d", keys.number)
    except (RendezvousError, StoreError, OSError) as exc:
        logger.warning("clean-up of round %d failed: %s: %s", keys.number, type(exc).__name__, exc)


def _free_port(host: str) -> int:
    """A port that was free a moment ago (torch's ``get_free_port``; racy by nature, used
    only when store sharing is disabled and the workers host their own store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _caller() -> str:
    """The name of the method that called ``_record`` (torch's event names)."""
    return sys._getframe(2).f_code.co_name


# ---------------------------------------------------------------------------- factory
def _config_seconds(params: RendezvousParameters, key: str) -> float | None:
    value = params.get(key)
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"The rendezvous configuration option '{key}' does not represent a valid "
            "number of seconds."
        ) from None
    return seconds


def create_handler(
    store: Store,
    backend: RendezvousBackend | RendezvousParameters,
    params: RendezvousParameters | None = None,
    *,
    backend_name: str | None = None,
    liveness: Liveness | None = None,
    master_endpoint: tuple[str, int] | None = None,
) -> DynamicRendezvousHandler:
    """Build a :class:`DynamicRendezvousHandler` on ``store`` from launcher parameters.

    Two forms:

    * ``create_handler(store, backend, params)``: torch's, for a
      :class:`~rdzv.rendezvous.api.RendezvousBackend`: torch's state-blob rendezvous
      (:meth:`DynamicRendezvousHandler.from_backend`); a failure is recorded as a FAILED
      rendezvous event and re-raised, as torch does;
    * ``create_handler(store, params, backend_name=...)``: rdzv's own algorithm on ``store``.

    Config keys (torch's names; seconds, ints or floats): ``join_timeout`` (600),
    ``last_call_timeout`` (30), ``close_timeout`` (30), ``heartbeat_timeout`` (5),
    ``keep_alive_interval`` (5), ``keep_alive_max_attempt`` (3). Explicit None for the last
    two raises TypeError as torch does. Raises ValueError for invalid values, TypeError
    for a missing ``params``/``backend_name``.
    """
    if isinstance(backend, RendezvousBackend):
        if params is None:
            raise TypeError("create_handler(store, backend, params): params is missing")
        try:
            timeout, interval, attempts = _handler_config(params)
            return DynamicRendezvousHandler.from_backend(
                params.run_id,
                store,
                backend,
                params.min_nodes,
                params.max_nodes,
                params.local_addr,
                timeout,
                keep_alive_interval=interval,
                keep_alive_max_attempt=attempts,
            )
        except Exception as exc:
            record_rdzv_event_fields(
                "dynamic.create_handler",
                params.run_id,
                f"{type(exc).__name__}: {exc}",
                NodeState.FAILED,
            )
            raise
    if backend_name is None:
        raise TypeError("create_handler(store, params, backend_name=...): name the backend")
    timeout, interval, attempts = _handler_config(backend)
    return DynamicRendezvousHandler(
        backend.run_id,
        store,
        backend.min_nodes,
        backend.max_nodes,
        backend_name=backend_name,
        local_addr=backend.local_addr,
        timeout=timeout,
        keep_alive_interval=interval,
        keep_alive_max_attempt=attempts,
        liveness=liveness,
        master_endpoint=master_endpoint,
    )


def _handler_config(params: RendezvousParameters) -> tuple[RendezvousTimeout, float, int]:
    """The timeouts, keep-alive interval (s) and max attempt of ``params.config``."""
    for key in ("keep_alive_interval", "keep_alive_max_attempt"):
        if key in params.config and params.config[key] is None:
            raise TypeError(f"You passed '{key}=None' as a rendezvous configuration option")
    timeout = RendezvousTimeout(
        _config_seconds(params, "join_timeout"),
        _config_seconds(params, "last_call_timeout"),
        _config_seconds(params, "close_timeout"),
        _config_seconds(params, "heartbeat_timeout"),
    )
    interval = _config_seconds(params, "keep_alive_interval")
    attempts = params.get_as_int("keep_alive_max_attempt", 3)
    assert attempts is not None
    return timeout, 5.0 if interval is None else interval, attempts
