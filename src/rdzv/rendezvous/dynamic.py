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
import enum
import functools
import itertools
import logging
import math
import os
import secrets
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from rdzv.errors import (
    CounterError,
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousStateError,
    RendezvousTimeoutError,
    StoreError,
    StoreTimeoutError,
)
from rdzv.events import NodeState, record_rdzv_event_fields
from rdzv.rendezvous.api import (
    RendezvousBackend,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
    Token,
    check_node_bounds,
)
from rdzv.rendezvous.keepalive import KeepAlive
from rdzv.rendezvous.liveness import HeartbeatLiveness, Liveness, LivenessObserver, Status
from rdzv.rendezvous.state import (
    CLOSED_RANK,
    CLOSED_SIZE,
    LATE_RANK,
    SEAL,
    MasterRecord,
    NodeDesc,
    RankRecord,
    RoundKeys,
    RunKeys,
    SizeRecord,
    assign_ranks,
    choose_members,
    parse_counter_value,
    slot_count,
)
from rdzv.store.base import Store
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


# ---------------------------------------------------------------------------- configuration
def _td(value: timedelta | float | int, name: str) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"The {name} ({value}) must be a finite number of seconds.")
        return timedelta(seconds=value)
    raise TypeError(f"The {name} must be a timedelta or seconds, got {type(value).__name__}.")


class RendezvousTimeout:
    """The timeouts of the dynamic rendezvous (torch's ``RendezvousTimeout``).

    Args:
        join: time within which a round must complete for this node (default 600 s).
        last_call: extra wait after ``min_nodes`` are in, before completing a round below
            ``max_nodes`` (default 30 s).
        close: time within which :meth:`~DynamicRendezvousHandler.set_closed` must finish
            (default 30 s).
        heartbeat: time within which a keep-alive must finish; a slower one is logged as
            failed (default 5 s).

    Each accepts a ``timedelta`` or seconds; None means the default. Raises
    ``ValueError('The {name} timeout ({value}) must be positive.')`` for a value <= 0.
    """

    _ZERO = timedelta(0)
    _DEFAULT = {
        "join": timedelta(seconds=600),
        "last_call": timedelta(seconds=30),
        "close": timedelta(seconds=30),
        "heartbeat": timedelta(seconds=5),
    }

    def __init__(
        self,
        join: timedelta | float | None = None,
        last_call: timedelta | float | None = None,
        close: timedelta | float | None = None,
        heartbeat: timedelta | float | None = None,
    ) -> None:
        values = {"join": join, "last_call": last_call, "close": close, "heartbeat": heartbeat}
        self._values: dict[str, timedelta] = {}
        for name, value in values.items():
            td = self._DEFAULT[name] if value is None else _td(value, f"{name} timeout")
            if td <= self._ZERO:
                raise ValueError(f"The {name} timeout ({td}) must be positive.")
            self._values[name] = td

    @property
    def join(self) -> timedelta:
        return self._values["join"]

    @property
    def last_call(self) -> timedelta:
        return self._values["last_call"]

    @property
    def close(self) -> timedelta:
        return self._values["close"]

    @property
    def heartbeat(self) -> timedelta:
        return self._values["heartbeat"]

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v.total_seconds()}s" for k, v in self._values.items())
        return f"RendezvousTimeout({parts})"


@dataclass(frozen=True)
class RendezvousSettings:
    """The settings of a dynamic rendezvous (torch's ``RendezvousSettings``)."""

    run_id: str
    min_nodes: int
    max_nodes: int
    timeout: RendezvousTimeout
    keep_alive_interval: timedelta
    keep_alive_max_attempt: int


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


# ---------------------------------------------------------------------------- per-round state
class _Close(enum.Enum):
    DONE = "done"  # this call closed the round
    TAKEN = "taken"  # somebody else closed (or the rendezvous was closed)
    NOT_READY = "not ready"  # gate closed, or not enough live nodes for the asked mode


@dataclass
class _Membership:
    """The round this node last completed."""

    keys: RoundKeys
    slot: int
    rank: int
    world_size: int


@dataclass
class _Pending:
    """This node's view of the open round it holds a slot in."""

    keys: RoundKeys
    slot: int
    observer: LivenessObserver
    gate_open: bool = False
    #: Slots of this round known to be gone (left or dead).
    gone: set[int] = field(default_factory=set)
    #: Members of the previous round not yet known gone (None: not loaded yet).
    prev_members: list[int] | None = None
    prev_size: SizeRecord | None = None
    monitor: bool = False
    #: This node was a member of the previous round (so it is not a spare).
    was_member: bool = False
    quorum_at: float | None = None
    #: When this node first saw the round frozen (its ``size`` record) without its rank.
    size_seen_at: float | None = None

    @property
    def number(self) -> int:
        return self.keys.number


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
        if not run_id:
            raise ValueError("The run id must be a non-empty string.")
        check_node_bounds(min_nodes, max_nodes)
        if not isinstance(store, Store):
            raise TypeError(f"store must be an rdzv Store, got {type(store).__name__}")
        interval = _td(keep_alive_interval, "keep-alive interval")
        if interval <= timedelta(0):
            raise ValueError(f"The keep-alive interval ({interval}) must be positive.")
        if keep_alive_max_attempt < 1:
            raise ValueError(
                f"The keep-alive max attempt ({keep_alive_max_attempt}) must be at least 1."
            )
        self._settings = RendezvousSettings(
            run_id,
            min_nodes,
            max_nodes,
            timeout or RendezvousTimeout(),
            interval,
            keep_alive_max_attempt,
        )
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
        self._token = f"{self._addr}_{os.getpid()}_{self._local_id}_{self._nonce}"
        self._join_lock = threading.Lock()
        self._control_lock = threading.Lock()
        self._control_store: Store | None = None
        self._membership: _Membership | None = None
        self._pending: _Pending | None = None
        self._keep_alive: KeepAlive | None = None
        self._bootstrap_server: Any = None
        self._bootstrap_info: RendezvousStoreInfo | None = None
        self._shut_down = False
        # The keep-alive thread's own connection, opened now (like the store itself) rather
        # than in the middle of a rendezvous.
        self._keep_alive_store = self._guard(store.clone)

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
        store could not be told (the error is logged and recorded). Idempotent."""
        started = time.monotonic()
        if self._keep_alive is not None:
            self._keep_alive.stop()
        try:
            self._guard(self._leave_all)
            self._guard(self._close)
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

    def _guard(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn``; store failures become RendezvousConnectionError (with the cause)."""
        try:
            return fn()
        except RendezvousError:
            raise
        except CounterError as exc:
            raise RendezvousStateError(
                f"a counter of the rendezvous '{self._settings.run_id}' holds a value that is "
                f"not an integer: {exc}; the rendezvous state is corrupt or hostile"
            ) from exc
        except (StoreError, OSError) as exc:
            raise RendezvousConnectionError(
                f"The connection to the store {self._store!r} of the rendezvous "
                f"'{self._settings.run_id}' has failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _control(self) -> Store:
        with self._control_lock:
            if self._control_store is None:
                self._control_store = self._store.clone()
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

    def _descriptor(self, member: _Membership | None) -> NodeDesc:
        """This node's descriptor; ``member``: the round it completed last, if any."""
        master = self._master_endpoint
        if master is None and self._bootstrap_info is not None and self._bootstrap_server:
            master = (self._bootstrap_info.master_addr, self._bootstrap_info.master_port)
        if not self.use_agent_store:
            master = None
        return NodeDesc(
            addr=self._addr,
            pid=os.getpid(),
            local_id=self._local_id,
            nonce=self._nonce,
            prev_round=None if member is None else member.keys.number,
            prev_rank=None if member is None else member.rank,
            master=master,
        )

    # ------------------------------------------------------------------ joining
    def _next_rendezvous(self) -> RendezvousInfo:
        store = self._store
        keep_alive = self._ensure_keep_alive()
        keep_alive.set_pending()
        join_timeout = self._settings.timeout.join.total_seconds()
        deadline = time.monotonic() + join_timeout
        previous = self._membership
        self._membership = None
        hint = store.add(self._keys.round, 0)
        if hint < 0:
            raise RendezvousStateError(
                f"the round counter {self._keys.round!r} is negative ({hint}): the rendezvous "
                "state is corrupt or hostile"
            )
        number = hint if previous is None else max(hint, previous.keys.number + 1)
        left_previous = previous is None
        while True:
            pending, late = self._join(number, previous)
            if not left_previous:
                assert previous is not None
                self._leave_member_round(store, previous, evaluate=number)
                left_previous = True
            outcome = None if late else self._await(pending, deadline)
            if outcome is None:  # late: not admitted to this round, wait for the next one
                number += 1
                continue
            return self._complete(pending, outcome)

    def _join(self, number: int, previous: _Membership | None = None) -> tuple[_Pending, bool]:
        """Take a slot in round ``number`` and write this node's descriptor and heartbeat.
        Returns the pending state and whether the round had already completed without us."""
        store = self._store
        keys = self._keys.of(number)
        slot = store.add(keys.joined, 1)
        if slot < 1:
            raise RendezvousStateError(
                f"the slot counter {keys.joined!r} returned {slot}: the rendezvous state is "
                "corrupt or hostile"
            )
        was_member = previous is not None and previous.keys.number == number - 1
        if slot > SEAL:
            # The round was frozen before our add: we are late, or it was closed.
            pending = _Pending(keys, 0, self._liveness.observer(self._token), was_member=was_member)
            if self._read_size(store, keys).closed:
                self._raise_closed(pending, retire=False)
            return pending, True
        desc = self._descriptor(previous)
        alive = keys.alive(slot)
        entries = [(keys.node(slot), desc.encode()), *self._liveness.announce(alive)]
        store.multi_set([k for k, _ in entries], [v for _, v in entries])
        assert self._keep_alive is not None
        self._keep_alive.track(alive)
        pending = _Pending(
            keys,
            slot,
            self._liveness.observer(self._token),
            gate_open=number == 0,
            was_member=was_member,
        )
        self._pending = pending
        logger.debug("node %s took slot %d of round %d", self.node, slot, number)
        if slot >= self._settings.min_nodes:
            self._evaluate(store, pending, joined=slot)
        return pending, False

    def _leave_member_round(self, store: Store, member: _Membership, evaluate: int) -> None:
        """Leave the round this node completed earlier (it has joined the next one)."""
        if not self._liveness.retire(store, member.keys.alive(member.slot)):
            return  # already declared dead by a peer: accounted for by the declarer
        vacated = store.add(member.keys.nvacated, 1)
        if vacated == member.world_size:
            self._dissolve(store, member.keys.number, evaluate)

    def _dissolve(self, store: Store, number: int, evaluate: int | None) -> None:
        """Every member of round ``number`` has left or died: open the gate of the next."""
        following = self._keys.of(number + 1)
        store.set(following.gate, b"1")
        logger.debug("round %d dissolved; the gate of round %d is open", number, number + 1)
        pending = self._pending
        if evaluate == number + 1 and pending is not None and pending.number == number + 1:
            pending.gate_open = True
            self._evaluate(store, pending, joined=None)

    def _evaluate(self, store: Store, pending: _Pending, joined: int | None) -> None:
        """Close the round now if it is full, start the last call if it has min_nodes."""
        keys = pending.keys
        if not pending.gate_open:
            if not store.check([keys.gate]):
                return
            pending.gate_open = True
        if joined is None:
            joined = store.add(keys.joined, 0)
            if joined > SEAL:
                return  # frozen already
        live = joined - store.add(keys.ngone, 0)
        settings = self._settings
        if live >= settings.max_nodes:
            self._attempt_close(store, keys, full=True)
        elif live >= settings.min_nodes:
            store.compare_set(keys.quorum, b"", b"1")

    def _attempt_close(self, store: Store, keys: RoundKeys, full: bool) -> _Close:
        """Freeze the membership of round ``keys`` with one compare_set, then publish every
        slot's rank record (one multi_set). ``full``: close only with max_nodes live slots
        (else: with at least min_nodes, the last call being over)."""
        settings = self._settings
        if keys.number > 0 and not store.check([keys.gate]):
            return _Close.NOT_READY
        joined = store.add(keys.joined, 0)
        if joined > SEAL:
            return _Close.TAKEN
        slots = list(range(1, joined + 1))
        token = self._token
        statuses = self._liveness.snapshot(store, [keys.alive(s) for s in slots], token)
        live: list[int] = []
        excluded: list[int] = []
        for slot, status in zip(slots, statuses, strict=True):
            if status is Status.ALIVE:
                live.append(slot)
            else:
                excluded.append(slot)
                if status is Status.DECLARED:
                    store.add(keys.ngone, 1)
                    self._node_lost(keys, slot)
        needed = settings.max_nodes if full else settings.min_nodes
        if len(live) < needed:
            return _Close.NOT_READY
        late: list[int] = []
        if len(live) > settings.max_nodes:
            raw_descs = store.multi_get([keys.node(s) for s in live])
            descs = [
                (slot, NodeDesc.decode(keys.node(slot), raw))
                for slot, raw in zip(live, raw_descs, strict=True)
            ]
            admitted = set(choose_members(keys.number, descs, settings.max_nodes))
            late = [s for s in live if s not in admitted]
        world_size = len(live) - len(late)
        record = SizeRecord(joined, world_size, tuple(excluded), tuple(late), closer=token)
        raw = record.encode()
        current = store.compare_set(keys.size, b"", raw)
        if current != raw:
            SizeRecord.decode(keys.size, current, settings.max_nodes)  # validate the winner's
            return _Close.TAKEN
        self._publish_ranks(store, keys, record)
        logger.info(
            "round %d of the rendezvous '%s' closed with %d node(s) (%d slot(s), %d gone)",
            keys.number,
            settings.run_id,
            world_size,
            joined,
            len(excluded),
        )
        if keys.number >= 2:
            self._clean_up_later(keys.number - 2)
        return _Close.DONE

    def _publish_ranks(self, store: Store, keys: RoundKeys, record: SizeRecord) -> None:
        """Write the rank record of every slot of a closed round (deterministic: any node can
        do it again from the size record and the descriptors, with the same result)."""
        # Seal the slot counter first: a later joiner sees from its add alone that it is
        # late; the slots taken since the snapshot get a "late" record below.
        taken = slot_count(store.add(keys.joined, SEAL))
        members = record.members()
        raw_descs = store.multi_get([keys.node(s) for s in members]) if members else []
        descs = [
            (slot, NodeDesc.decode(keys.node(slot), raw))
            for slot, raw in zip(members, raw_descs, strict=True)
        ]
        ordered = assign_ranks(keys.number, descs)
        master = ordered[0][1].master if ordered else None
        out_keys = [keys.quorum, self._keys.round]
        out_values = [b"1", str(keys.number + 1).encode()]
        ranked = {slot for slot, _ in ordered}
        for rank, (slot, _) in enumerate(ordered):
            out_keys.append(keys.rank(slot))
            out_values.append(RankRecord(rank, record.world_size, master).encode())
        for slot in range(1, max(record.joined, taken) + 1):
            if slot not in ranked:
                out_keys.append(keys.rank(slot))
                out_values.append(LATE_RANK)
        store.multi_set(out_keys, out_values)

    def _read_size(self, store: Store, keys: RoundKeys) -> SizeRecord:
        return SizeRecord.decode(keys.size, store.get(keys.size), self._settings.max_nodes)

    # ------------------------------------------------------------------ waiting
    def _await(self, pending: _Pending, deadline: float) -> RankRecord | None:
        """Wait until this node's rank record appears; do the timed duties meanwhile
        (watching peers, closing after the last call, the join timeout). Returns the record
        of a member, None if late; raises on close/timeout."""
        store = self._store
        keys = pending.keys
        settings = self._settings
        rank_key = keys.rank(pending.slot)
        last_call = settings.timeout.last_call.total_seconds()
        monitor_tick = self._interval / 2
        self._update_role(store, pending)
        # A monitor looks at once: a peer that died before we came is declared one expiry
        # after this first look (nobody can know how long it has been silent already).
        next_tick = time.monotonic() + (0.0 if pending.monitor else self._interval)
        while True:
            now = time.monotonic()
            watch_quorum = (
                pending.monitor
                and pending.quorum_at is None
                and pending.size_seen_at is None
                and settings.min_nodes < settings.max_nodes
            )
            key = keys.quorum if watch_quorum else rank_key
            wake = min(next_tick, deadline)
            observed = pending.observer.next_deadline()
            if observed is not None:
                wake = min(wake, observed)
            close_at = None
            if pending.quorum_at is not None and self._is_primary(pending):
                close_at = pending.quorum_at + last_call
                wake = min(wake, close_at)
            try:
                if key == rank_key:
                    # One request that waits for the record and returns it (the Store core
                    # call with an explicit timeout, as PrefixStore uses it).
                    raw = store._get(rank_key, max(0.0, wake - now))
                    return self._decode_rank(pending, raw)
                store.wait([key], max(0.0, wake - now))
            except StoreTimeoutError:
                pass
            else:
                pending.quorum_at = time.monotonic()
                continue
            now = time.monotonic()
            if close_at is not None and now >= close_at:
                outcome = self._attempt_close(store, keys, full=False)
                if outcome is _Close.NOT_READY:
                    # Fewer than min_nodes are left: the last call starts again when a
                    # joiner brings the round back to min_nodes (torch clears its deadline).
                    store.delete_key(keys.quorum)
                    pending.quorum_at = None
                    if store.check([keys.size]):  # closed meanwhile (set_closed)
                        pending.size_seen_at = time.monotonic()
                continue
            if now >= next_tick or (observed is not None and now >= observed):
                self._tick(store, pending)
                next_tick = now + (monitor_tick if pending.monitor else self._interval)
            if now >= deadline:
                if self._is_redundant(store, pending):
                    deadline = now + settings.timeout.join.total_seconds()
                    continue
                return self._time_out(store, pending)

    def _is_primary(self, pending: _Pending) -> bool:
        """Whether this node is the lowest live slot of its round (as far as it knows): the
        one that closes the round when the last call ends."""
        return all(s in pending.gone for s in range(1, pending.slot))

    def _update_role(self, store: Store, pending: _Pending) -> None:
        live_below = pending.slot - 1 - len([s for s in pending.gone if s < pending.slot])
        pending.monitor = live_below < 2

    def _tick(self, store: Store, pending: _Pending) -> None:
        """One round of watching. The two lowest live slots of the round (monitors) watch
        every slot of the round and every member of the previous round that has not come
        back; the other nodes watch the two monitors (so that a dead monitor is replaced)."""
        keys = pending.keys
        if pending.monitor:
            joined = slot_count(store.add(keys.joined, 0))
            watched = [s for s in range(1, joined + 1) if s != pending.slot]
        else:
            watched = [s for s in range(1, pending.slot) if s not in pending.gone][:2]
        targets = {keys.alive(s): (keys, s) for s in watched if s not in pending.gone}
        prev_keys: RoundKeys | None = None
        if pending.monitor and not pending.gate_open:
            if store.check([keys.gate]):
                pending.gate_open = True
            else:
                prev_keys = self._keys.of(pending.number - 1)
                for slot in self._previous_members(store, pending, prev_keys):
                    targets[prev_keys.alive(slot)] = (prev_keys, slot)
        statuses = pending.observer.observe(store, list(targets))
        for key, status in statuses.items():
            round_keys, slot = targets[key]
            if status is Status.ALIVE:
                continue
            pending.observer.forget([key])
            if round_keys is keys:
                pending.gone.add(slot)
                if status is Status.DECLARED:
                    store.add(keys.ngone, 1)
                    self._node_lost(keys, slot)
            else:
                assert pending.prev_members is not None and prev_keys is not None
                pending.prev_members.remove(slot)
                if status is Status.DECLARED:
                    store.add(prev_keys.nvacated, 1)
                    self._node_lost(prev_keys, slot)
        if prev_keys is not None and pending.prev_members == []:
            self._dissolve(store, prev_keys.number, evaluate=None)
            pending.gate_open = True
        was_monitor = pending.monitor
        self._update_role(store, pending)
        if pending.monitor and not was_monitor:
            logger.debug("node %s now watches round %d", self.node, pending.number)
        if (
            pending.monitor
            and pending.gate_open
            and pending.quorum_at is None
            and not store.check([keys.size])
        ):
            live = slot_count(store.add(keys.joined, 0)) - len(pending.gone)
            if live >= self._settings.max_nodes:
                self._attempt_close(store, keys, full=True)
            elif live >= self._settings.min_nodes:
                store.compare_set(keys.quorum, b"", b"1")
        if pending.monitor:
            self._repair_ranks(store, pending)

    def _previous_members(self, store: Store, pending: _Pending, prev_keys: RoundKeys) -> list[int]:
        if pending.prev_members is None:
            size = self._read_size(store, prev_keys)
            if size.closed:
                raise RendezvousStateError(
                    f"round {prev_keys.number} is marked closed but round {pending.number} "
                    "was joined: the rendezvous state is inconsistent"
                )
            pending.prev_size = size
            pending.prev_members = size.members()
        return list(pending.prev_members)

    def _repair_ranks(self, store: Store, pending: _Pending) -> None:
        """If the round was closed but its closer died before publishing the ranks, publish
        them (the same values) once the records have been missing for the liveness expiry."""
        keys = pending.keys
        if not store.check([keys.size]):
            return
        now = time.monotonic()
        if pending.size_seen_at is None:
            pending.size_seen_at = now
            return
        if now - pending.size_seen_at < self._liveness.expiry:
            return
        if store.check([keys.rank(pending.slot)]):
            return
        record = self._read_size(store, keys)
        if record.closed:
            self._publish_closed(store, keys)
            return
        logger.warning(
            "round %d was closed but its rank records are missing after %.1fs: the closer "
            "died; publishing them",
            keys.number,
            self._liveness.expiry,
        )
        self._publish_ranks(store, keys, record)

    def _node_lost(self, keys: RoundKeys, slot: int) -> None:
        msg = (
            f"The node in slot {slot} of round {keys.number} of the rendezvous "
            f"'{self._settings.run_id}' missed its heartbeats for "
            f"{self._liveness.expiry:.3f}s and was declared dead by '{self.node}'."
        )
        logger.warning(msg)
        self._record(msg, NodeState.RUNNING)

    def _is_redundant(self, store: Store, pending: _Pending) -> bool:
        """torch's redundancy list: the previous round is still running with max_nodes
        members, none of which has left; such a node waits without timeout."""
        if pending.number == 0 or pending.was_member or pending.gate_open:
            return False
        if store.check([pending.keys.gate]):
            return False
        prev_keys = self._keys.of(pending.number - 1)
        if pending.prev_size is None:
            pending.prev_size = self._read_size(store, prev_keys)
        if pending.prev_size.closed or pending.prev_size.world_size < self._settings.max_nodes:
            return False
        return not store.check([prev_keys.nvacated])

    def _time_out(self, store: Store, pending: _Pending) -> RankRecord | None:
        """The join timeout expired: leave the round (rollback) and raise, unless the round
        completed with this node in the meantime."""
        keys = pending.keys
        if store.check([keys.rank(pending.slot)]):
            return self._read_rank(store, pending)
        assert self._keep_alive is not None
        self._keep_alive.track(None)
        if self._liveness.retire(store, keys.alive(pending.slot)):
            store.add(keys.ngone, 1)
        self._pending = None
        live = slot_count(store.add(keys.joined, 0)) - store.add(keys.ngone, 0)
        raise RendezvousTimeoutError(
            f"The node '{self.node}' timed out after "
            f"{self._settings.timeout.join.total_seconds():g}s waiting for round "
            f"{keys.number} of the rendezvous '{self._settings.run_id}' to complete "
            f"({max(live, 0)} node(s) waiting, min_nodes={self._settings.min_nodes}, "
            f"max_nodes={self._settings.max_nodes}); it has left the round."
        )

    def _read_rank(self, store: Store, pending: _Pending) -> RankRecord | None:
        return self._decode_rank(pending, store.get(pending.keys.rank(pending.slot)))

    def _decode_rank(self, pending: _Pending, raw: bytes) -> RankRecord | None:
        """This node's rank record: the record of a member, None if late; raises if the
        rendezvous was closed."""
        key = pending.keys.rank(pending.slot)
        record = RankRecord.decode(key, raw, self._settings.max_nodes)
        if record.closed:
            self._raise_closed(pending)
        if record.late:
            logger.debug("node %s is late for round %d", self.node, pending.number)
            return None
        return record

    def _raise_closed(self, pending: _Pending, retire: bool = True) -> None:
        store = self._store
        redundant = self._is_redundant(store, pending)
        assert self._keep_alive is not None
        self._keep_alive.track(None)
        if retire:
            self._liveness.retire(store, pending.keys.alive(pending.slot))
        self._pending = None
        if redundant:
            raise RendezvousGracefulExitError(
                f"The rendezvous '{self._settings.run_id}' is closed, terminating pending "
                "rendezvous."
            )
        raise RendezvousClosedError(f"The rendezvous '{self._settings.run_id}' is closed.")

    # ------------------------------------------------------------------ completion
    def _complete(self, pending: _Pending, record: RankRecord) -> RendezvousInfo:
        store = self._store
        keys = pending.keys
        self._membership = _Membership(keys, pending.slot, record.rank, record.world_size)
        self._pending = None
        master = record.master
        if master is None:
            master = self._exchange_master(store, keys, record.rank)
        round_store = PrefixStore(keys.store_prefix, store)
        if record.rank == 0:
            round_store.multi_set(
                [RendezvousStoreInfo.MASTER_ADDR_KEY, RendezvousStoreInfo.MASTER_PORT_KEY],
                [master[0].encode(), str(master[1]).encode()],
            )
        self._bootstrap_info = RendezvousStoreInfo(master[0], master[1])
        doorbells = [self._keys.of(keys.number + 1).joined]
        if record.world_size >= self._settings.max_nodes:
            doorbells.append(keys.nvacated)
        following = self._keys.of(keys.number + 1)
        assert self._keep_alive is not None
        self._keep_alive.set_running(doorbells, following.joined, following.ngone)
        return RendezvousInfo(round_store, record.rank, record.world_size, self._bootstrap_info)

    def _exchange_master(self, store: Store, keys: RoundKeys, rank: int) -> tuple[str, int]:
        """The bootstrap endpoint when rank 0's descriptor did not carry one: rank 0 starts
        (once) a TCPStore server, or with sharing disabled picks a free port for the
        workers' own store (torch's behaviour), and publishes it; the others read it."""
        if rank == 0:
            if self.use_agent_store:
                if self._bootstrap_server is None:
                    from rdzv.store.tcp import TCPStore

                    self._bootstrap_server = TCPStore(
                        self._addr, 0, is_master=True, multi_tenant=True
                    )
                port = int(self._bootstrap_server.port)
            else:
                port = _free_port(self._addr)
            store.set(keys.master, MasterRecord(self._addr, port).encode())
            return self._addr, port
        raw = store.get(keys.master)
        record = MasterRecord.decode(keys.master, raw)
        return record.addr, record.port

    # ------------------------------------------------------------------ leaving and closing
    def _leave_all(self) -> None:
        store = self._store
        if self._keep_alive is not None:
            self._keep_alive.track(None)
        member = self._membership
        if member is not None:
            self._membership = None
            self._leave_member_round(store, member, evaluate=-1)
        pending = self._pending
        if pending is not None:
            self._pending = None
            if self._liveness.retire(store, pending.keys.alive(pending.slot)):
                store.add(pending.keys.ngone, 1)

    def _close(self) -> None:
        store = self._control()
        deadline = time.monotonic() + self._settings.timeout.close.total_seconds()
        store.set(self._keys.closed, b"1")
        number = store.add(self._keys.round, 0)
        while True:
            keys = self._keys.of(number)
            current = store.compare_set(keys.size, b"", CLOSED_SIZE)
            if current == CLOSED_SIZE:
                self._publish_closed(store, keys)
                return
            SizeRecord.decode(keys.size, current, self._settings.max_nodes)
            number += 1
            if time.monotonic() > deadline:
                raise RendezvousTimeoutError(
                    f"Closing the rendezvous '{self._settings.run_id}' did not finish within "
                    f"the close timeout of {self._settings.timeout.close.total_seconds():g}s "
                    f"(stopped at round {number})."
                )

    def _publish_closed(self, store: Store, keys: RoundKeys) -> None:
        joined = slot_count(store.add(keys.joined, SEAL))
        out_keys = [keys.quorum] + [keys.rank(s) for s in range(1, joined + 1)]
        store.multi_set(out_keys, [b"1"] + [CLOSED_RANK] * joined)

    # ------------------------------------------------------------------ clean-up
    def _clean_up_later(self, number: int) -> None:
        thread = threading.Thread(
            target=_clean_up_round,
            args=(self._store, self._keys.of(number)),
            name=f"RendezvousCleanUp_{self._local_id}_{number}",
            daemon=True,
        )
        thread.start()


def _record_keep_alive(
    run_id: str, cls: str, local_id: int, message: str, state: NodeState
) -> None:
    record_rdzv_event_fields(f"{cls}._keep_alive", run_id, message, state, local_id=local_id)


def _clean_up_round(origin: Store, keys: RoundKeys) -> None:
    """Delete the keys of a round that every node has left (two rounds back)."""
    try:
        store = origin.clone()
        if not store.check([keys.joined]):
            return
        joined = slot_count(parse_counter_value(keys.joined, store.get(keys.joined)))
        for slot in range(1, joined + 1):
            for key in keys.per_slot(slot):
                store.delete_key(key)
        for key in keys.round_level():
            store.delete_key(key)
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
