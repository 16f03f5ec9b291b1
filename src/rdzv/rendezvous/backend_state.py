"""torch's state-blob dynamic rendezvous, for backends written for torch.

A :class:`~rdzv.rendezvous.api.RendezvousBackend` keeps one opaque state with a fencing
token (torch's ``RendezvousBackend``: DLRover's, Kubernetes-based, in-house ones, and
:class:`~rdzv.rendezvous.c10d.C10dRendezvousBackend`). :class:`BackendRendezvousHandler`
runs torch's algorithm on it, with torch's semantics: every node reads the whole state,
decides one action (join, wait, keep alive, complete, leave, close), applies it to its copy
and writes the copy back with compare-and-set on the token; a lost race re-reads and decides
again. Waiting nodes poll the state every second, as torch's do.

It is what :meth:`DynamicRendezvousHandler.from_backend
<rdzv.rendezvous.dynamic.DynamicRendezvousHandler.from_backend>` and the three-argument
``create_handler(store, backend, params)`` build. rdzv's own algorithm
(:mod:`rdzv.rendezvous.dynamic`, O(1) store operations per node, pushed waits) stays the
default of rdzv's backends.

Differences from torch, none of which changes a result:

* the state is JSON (:class:`BackendState`), never pickle; a pickled state found in the
  backend (torch's handler wrote it) is refused with RendezvousStateError, never unpickled;
* liveness compares no clocks of different machines: a heartbeat is a counter that the node
  increments; a peer is dead when its counter has not moved for ``keep_alive_interval x
  keep_alive_max_attempt`` seconds of the observer's own monotonic clock (torch writes UTC
  times and compares them with every other node's clock). The last call is timed the same
  way, from when each node first saw it start.
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import os
import random
import re
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from rdzv.errors import (
    RendezvousClosedError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousStateError,
    RendezvousTimeoutError,
)
from rdzv.events import NodeState, record_rdzv_event_fields
from rdzv.rendezvous.api import (
    RendezvousBackend,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousStoreInfo,
    Token,
)
from rdzv.rendezvous.dynamic import (
    DISABLE_SHARE_ENV,
    DynamicRendezvousHandler,
    RendezvousSettings,
    RendezvousTimeout,
)
from rdzv.store.base import Store
from rdzv.store.prefix import PrefixStore

__all__ = [
    "STATE_FORMAT",
    "BackendRendezvousHandler",
    "BackendState",
    "decode_state",
]

logger = logging.getLogger("rdzv.rendezvous.backend_state")

#: The ``format`` field of the JSON state.
STATE_FORMAT = "rdzv.backend-state/1"
#: Largest state accepted from a backend, in bytes (about 100,000 nodes).
MAX_STATE_BYTES = 64 << 20
#: Seconds after the join deadline during which a node still removes itself (torch's 5 s).
ROLLBACK_PERIOD = 5.0
#: Seconds between two reads of the state while waiting (torch's 1 s).
POLL_INTERVAL = 1.0
_NODE_RE = re.compile(r"^[^\x00-\x1f]{1,255}_[0-9]{1,10}_[0-9]{1,10}$")
_PICKLE_PROTOCOL_2_PLUS = b"\x80"
_local_ids = itertools.count()


# ---------------------------------------------------------------------------- the state
def node_sort_key(node: str) -> tuple[str, int, int]:
    """``"addr_pid_localid"`` -> ``(addr, pid, local_id)``: torch orders nodes (and so
    assigns ranks) by these three fields."""
    addr, pid, local_id = node.rsplit("_", 2)
    return addr, int(pid), int(local_id)


@dataclass
class BackendState:
    """The whole rendezvous, as kept in the backend (torch's ``_RendezvousState``).

    Nodes are ``"addr_pid_localid"`` strings. ``participants`` maps a node to its rank
    (0 until the round completes); ``heartbeats`` maps a node to its heartbeat counter;
    ``last_call`` is the number of the current last call (0: none running).
    """

    round: int = 0
    complete: bool = False
    closed: bool = False
    last_call: int = 0
    last_call_count: int = 0
    participants: dict[str, int] = field(default_factory=dict)
    wait_list: set[str] = field(default_factory=set)
    redundancy_list: set[str] = field(default_factory=set)
    heartbeats: dict[str, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        """Compact, sorted JSON."""
        doc = {
            "format": STATE_FORMAT,
            "round": self.round,
            "complete": self.complete,
            "closed": self.closed,
            "last_call": self.last_call,
            "last_call_count": self.last_call_count,
            "participants": self.participants,
            "wait_list": sorted(self.wait_list),
            "redundancy_list": sorted(self.redundancy_list),
            "heartbeats": self.heartbeats,
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _bad(backend: str, why: str) -> RendezvousStateError:
    return RendezvousStateError(
        f"The rendezvous state in the backend '{backend}' is corrupt: {why}. Delete it or use "
        "a new run id."
    )


def _count(backend: str, doc: dict[str, Any], name: str) -> int:
    value = doc.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise _bad(backend, f"field {name!r} must be an integer >= 0, got {value!r:.60}")
    return value


def _flag(backend: str, doc: dict[str, Any], name: str) -> bool:
    value = doc.get(name)
    if not isinstance(value, bool):
        raise _bad(backend, f"field {name!r} must be true or false, got {value!r:.60}")
    return value


def _nodes(backend: str, value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(
        isinstance(n, str) and _NODE_RE.match(n) for n in value
    ):
        raise _bad(backend, f"field {name!r} must be a list of 'addr_pid_localid' nodes")
    return value


def _node_map(backend: str, value: Any, name: str) -> dict[str, int]:
    if not isinstance(value, dict):
        raise _bad(backend, f"field {name!r} must be an object")
    _nodes(backend, list(value), name)
    for number in value.values():
        if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number < 2**63:
            raise _bad(backend, f"field {name!r} must map nodes to integers >= 0")
    return value


def decode_state(raw: bytes, backend: str) -> BackendState:
    """Parse and validate a state written by :meth:`BackendState.encode`.

    Raises RendezvousStateError for a pickled state (torch's handler wrote it: refused, never
    unpickled), for anything that is not such a JSON document, and above
    :data:`MAX_STATE_BYTES`.
    """
    if raw[:1] == _PICKLE_PROTOCOL_2_PLUS:
        raise RendezvousStateError(
            f"The rendezvous state in the backend '{backend}' is a pickled torch state "
            "(written by torch's DynamicRendezvousHandler). rdzv never unpickles data it "
            "reads from a backend; run every node of a job with the same library, or use a "
            "new run id."
        )
    if len(raw) > MAX_STATE_BYTES:
        raise _bad(backend, f"it is {len(raw)} bytes, more than {MAX_STATE_BYTES}")
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(backend, f"not JSON ({exc}); it starts with {raw[:32]!r}") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise _bad(backend, f"not an {STATE_FORMAT} document; it starts with {raw[:32]!r}")
    return BackendState(
        round=_count(backend, doc, "round"),
        complete=_flag(backend, doc, "complete"),
        closed=_flag(backend, doc, "closed"),
        last_call=_count(backend, doc, "last_call"),
        last_call_count=_count(backend, doc, "last_call_count"),
        participants=_node_map(backend, doc.get("participants"), "participants"),
        wait_list=set(_nodes(backend, doc.get("wait_list"), "wait_list")),
        redundancy_list=set(_nodes(backend, doc.get("redundancy_list"), "redundancy_list")),
        heartbeats=_node_map(backend, doc.get("heartbeats"), "heartbeats"),
    )


# ---------------------------------------------------------------------------- state holder
def _drop_participant_epilogue(state: BackendState, min_nodes: int) -> None:
    """After participants left or died: an emptied complete round moves on; an incomplete
    one below ``min_nodes`` stops its last call (torch's behaviour)."""
    if state.complete:
        if not state.participants:
            state.complete = False
            state.round += 1
    elif len(state.participants) < min_nodes:
        state.last_call = 0


class _StateHolder:
    """This node's copy of the state, synchronised with the backend on :meth:`sync`
    (torch's ``_BackendRendezvousStateHolder``), and its observations of the peers'
    heartbeats and of the last call, on its own monotonic clock."""

    def __init__(
        self, backend: RendezvousBackend, settings: RendezvousSettings, node: str, cache: float
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.node = node
        self.state = BackendState()
        self.token: Token | None = None
        self.dirty = False
        self._cache = cache
        self._last_sync: float | None = None
        self._expiry = (
            settings.keep_alive_interval.total_seconds() * settings.keep_alive_max_attempt
        )
        #: node -> (heartbeat counter, when this node first saw that value)
        self._beats_seen: dict[str, tuple[int, float]] = {}
        #: (round, last call number) -> when this node first saw that last call
        self._last_call_seen: tuple[int, int, float] | None = None

    def sync(self) -> bool | None:
        """Write the local state if dirty (compare-and-set on the token) or else read the
        backend's (at most once per ``cache`` seconds); then drop dead nodes from the copy.
        Returns whether the write succeeded, None when nothing was written."""
        has_set: bool | None = None
        raw: bytes | None = None
        token: Token | None = None
        if self.dirty:
            has_set = False
            reply = self.backend.set_state(self.state.encode(), self.token)
            if reply is not None:
                raw, token, has_set = reply
        else:
            now = time.monotonic()
            if (
                self._cache > 0
                and self._last_sync is not None
                and now - self._last_sync <= self._cache
            ):
                return None
            got = self.backend.get_state()
            if got is not None:
                raw, token = got
        self.state = BackendState() if raw is None else decode_state(raw, self.backend.name)
        self.token = token
        self.dirty = False
        self._last_sync = time.monotonic()
        self._observe()
        return has_set

    def mark_dirty(self) -> None:
        self.dirty = True

    def last_call_elapsed(self) -> float | None:
        """Seconds since this node first saw the current last call (None: none running)."""
        state = self.state
        if state.last_call == 0 or state.complete:
            return None
        seen = self._last_call_seen
        if seen is None or seen[:2] != (state.round, state.last_call):
            return 0.0
        return time.monotonic() - seen[2]

    def _observe(self) -> None:
        state = self.state
        now = time.monotonic()
        if state.last_call and not state.complete:
            seen = self._last_call_seen
            if seen is None or seen[:2] != (state.round, state.last_call):
                self._last_call_seen = (state.round, state.last_call, now)
        dead = []
        for node, beat in state.heartbeats.items():
            if node == self.node:
                continue
            previous = self._beats_seen.get(node)
            if previous is None or previous[0] != beat:
                self._beats_seen[node] = (beat, now)
            elif now - previous[1] > self._expiry:
                dead.append(node)
        for node in list(self._beats_seen):
            if node not in state.heartbeats:
                del self._beats_seen[node]
        removed_participant = False
        for node in dead:
            logger.debug("node %s missed its heartbeats for %.1fs: dropped", node, self._expiry)
            del state.heartbeats[node]
            del self._beats_seen[node]
            removed_participant |= state.participants.pop(node, None) is not None
            state.wait_list.discard(node)
            state.redundancy_list.discard(node)
        if removed_participant:
            _drop_participant_epilogue(state, self.settings.min_nodes)


# ---------------------------------------------------------------------------- decisions
class _Action(enum.Enum):
    KEEP_ALIVE = 1
    ADD_TO_PARTICIPANTS = 2
    ADD_TO_WAIT_LIST = 3
    ADD_TO_REDUNDANCY_LIST = 4
    REMOVE_FROM_PARTICIPANTS = 5
    REMOVE_FROM_WAIT_LIST = 6
    REMOVE_FROM_REDUNDANCY_LIST = 7
    MARK_RENDEZVOUS_COMPLETE = 8
    MARK_RENDEZVOUS_CLOSED = 9
    SYNC = 10
    ERROR_CLOSED = 11
    ERROR_TIMEOUT = 12
    FINISH = 13


@dataclass
class _Context:
    node: str
    state: BackendState
    settings: RendezvousSettings
    keep_alive_due: bool
    last_call_elapsed: float | None


_Decision = Callable[[_Context, float], _Action]


def _wait(ctx: _Context) -> _Action:
    return _Action.KEEP_ALIVE if ctx.keep_alive_due else _Action.SYNC


def _decide_exit(ctx: _Context, deadline: float) -> _Action:
    if ctx.node in ctx.state.participants:
        if time.monotonic() > deadline:
            return _Action.ERROR_TIMEOUT
        return _Action.REMOVE_FROM_PARTICIPANTS
    return _Action.FINISH


def _decide_join(ctx: _Context, deadline: float) -> _Action:
    state, node, settings = ctx.state, ctx.node, ctx.settings
    if state.closed:
        if node in state.redundancy_list:
            raise RendezvousGracefulExitError(
                f"The rendezvous '{settings.run_id}' is closed, terminating pending rendezvous."
            )
        return _Action.ERROR_CLOSED
    if node in state.redundancy_list:
        # No timeout for a spare: it waits until a participant leaves or dies.
        if len(state.participants) >= settings.max_nodes:
            return _wait(ctx)
        return _Action.REMOVE_FROM_REDUNDANCY_LIST
    is_participant = node in state.participants
    if state.complete and is_participant:
        return _Action.FINISH
    now = time.monotonic()
    if now > deadline:
        if now <= deadline + ROLLBACK_PERIOD:
            if is_participant:
                return _Action.REMOVE_FROM_PARTICIPANTS
            if node in state.wait_list:
                return _Action.REMOVE_FROM_WAIT_LIST
        return _Action.ERROR_TIMEOUT
    if state.complete:
        if len(state.participants) < settings.max_nodes:
            if node not in state.wait_list:
                return _Action.ADD_TO_WAIT_LIST
        elif node not in state.wait_list:
            return _Action.ADD_TO_REDUNDANCY_LIST
    elif is_participant:
        elapsed = ctx.last_call_elapsed
        if (
            settings.min_nodes <= len(state.participants) <= settings.max_nodes
            and elapsed is not None
            and elapsed >= settings.timeout.last_call.total_seconds()
        ):
            return _Action.MARK_RENDEZVOUS_COMPLETE
    else:
        return _Action.ADD_TO_PARTICIPANTS
    return _wait(ctx)


def _decide_close(ctx: _Context, deadline: float) -> _Action:
    if ctx.state.closed:
        return _Action.FINISH
    if time.monotonic() > deadline:
        return _Action.ERROR_TIMEOUT
    return _Action.MARK_RENDEZVOUS_CLOSED


def _decide_keep_alive(ctx: _Context, deadline: float) -> _Action:
    if not ctx.keep_alive_due:
        return _Action.FINISH
    if time.monotonic() > deadline:
        return _Action.ERROR_TIMEOUT
    return _Action.KEEP_ALIVE


# ---------------------------------------------------------------------------- the handler
class BackendRendezvousHandler(RendezvousHandler):
    """torch's ``DynamicRendezvousHandler`` semantics on a :class:`RendezvousBackend`.

    Build it with :meth:`DynamicRendezvousHandler.from_backend
    <rdzv.rendezvous.dynamic.DynamicRendezvousHandler.from_backend>` (same arguments as
    torch's); ``isinstance(handler, DynamicRendezvousHandler)`` holds.

    Args:
        run_id: the job's id (non-empty).
        store: the store that the round's store (a PrefixStore
            ``torch.rendezvous.{run_id}.{round}``) lives in; any rdzv Store, a Python
            subclass overriding the public methods included. Never cloned.
        backend: where the rendezvous state lives.
        min_nodes, max_nodes: node bounds (torch's ValueError texts).
        local_addr: this node's address (default: the FQDN).
        timeout: a :class:`~rdzv.rendezvous.dynamic.RendezvousTimeout` (None: defaults).
        keep_alive_interval: seconds or timedelta between heartbeats (default 5).
        keep_alive_max_attempt: missed heartbeats before a node is dropped (default 3).
        poll_interval: seconds between two reads of the state while waiting (None:
            :data:`POLL_INTERVAL`, torch's 1 s).

    The errors are torch's: RendezvousClosedError, RendezvousTimeoutError,
    RendezvousGracefulExitError (a spare when the rendezvous closes), and what the backend
    raises (RendezvousConnectionError, RendezvousStateError).
    """

    def __init__(
        self,
        run_id: str,
        store: Store,
        backend: RendezvousBackend,
        min_nodes: int,
        max_nodes: int,
        local_addr: str | None = None,
        timeout: RendezvousTimeout | None = None,
        keep_alive_interval: timedelta | float = 5,
        keep_alive_max_attempt: int = 3,
        *,
        poll_interval: float | None = None,
    ) -> None:
        self._settings = RendezvousSettings.checked(
            run_id, min_nodes, max_nodes, timeout, keep_alive_interval, keep_alive_max_attempt
        )
        self._store = store
        self._backend = backend
        self._local_id = next(_local_ids)
        self._addr = local_addr or socket.getfqdn()
        self.node = f"{self._addr}_{os.getpid()}_{self._local_id}"
        self._holder = _StateHolder(backend, self._settings, self.node, cache=1.0)
        self._poll_interval = POLL_INTERVAL if poll_interval is None else poll_interval
        self._lock = threading.RLock()
        self._beat = 0
        self._beat_at: float | None = None
        self._heartbeats: _Heartbeats | None = None
        self._bootstrap_server: Any = None

    # ------------------------------------------------------------------ public API
    @property
    def settings(self) -> RendezvousSettings:
        """The settings of the rendezvous."""
        return self._settings

    def get_backend(self) -> str:
        """The backend's ``name``."""
        return self._backend.name

    def get_run_id(self) -> str:
        return self._settings.run_id

    @property
    def use_agent_store(self) -> bool:
        """True unless ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (torch's switch)."""
        return os.environ.get(DISABLE_SHARE_ENV, "0") != "1"

    def next_rendezvous(self) -> RendezvousInfo:
        """Leave the current round (if any), join the next one and wait until it completes
        (torch's semantics; see the module docstring).

        Raises RendezvousClosedError, RendezvousTimeoutError (after the join timeout),
        RendezvousGracefulExitError (a spare node when the rendezvous closes) and what the
        backend raises.
        """
        self._record(f"The node '{self.node}' attempts to join the next round.", NodeState.INIT)
        try:
            self._stop_heartbeats()
            if self._holder.state.round == 0 and self._beat_at is None:
                time.sleep(random.uniform(0, 0.3))  # skew the first attempts (as torch)
            deadline = time.monotonic() + self._settings.timeout.join.total_seconds()
            self._run(_decide_exit, deadline)
            self._run(_decide_join, deadline, refresh_deadline=True)
            self._start_heartbeats()
            state = self._holder.state
            rank, world_size = state.participants[self.node], len(state.participants)
            store = PrefixStore(
                f"torch.rendezvous.{self._settings.run_id}.{state.round}", self._store
            )
            bootstrap = self._bootstrap(rank, store)
        except RendezvousError as exc:
            self._record(f"{type(exc).__name__}: {exc}", NodeState.FAILED)
            raise
        self._record(
            f"The node '{self.node}' has joined round {state.round} of the rendezvous "
            f"'{self._settings.run_id}' as rank {rank} in a world of size {world_size}.",
            NodeState.SUCCEEDED,
            rank=rank,
        )
        return RendezvousInfo(store, rank, world_size, bootstrap)

    def is_closed(self) -> bool:
        """Whether the rendezvous is closed (one read of the state)."""
        with self._lock:
            self._holder.sync()
            return self._holder.state.closed

    def set_closed(self) -> None:
        """Close the rendezvous (idempotent); RendezvousTimeoutError after the close
        timeout."""
        self._close()

    def num_nodes_waiting(self) -> int:
        """The number of nodes in the wait list (read at most once a second)."""
        with self._lock:
            self._holder.sync()
            return len(self._holder.state.wait_list)

    def shutdown(self) -> bool:
        """Stop the heartbeats and close the rendezvous; False (logged) if that failed."""
        self._stop_heartbeats()
        try:
            self._close()
        except RendezvousError as exc:
            logger.warning(
                "The node '%s' has failed to shutdown the rendezvous '%s' due to an error of "
                "type %s.",
                self.node,
                self._settings.run_id,
                type(exc).__name__,
            )
            return False
        return True

    # ------------------------------------------------------------------ execution
    def _close(self) -> None:
        deadline = time.monotonic() + self._settings.timeout.close.total_seconds()
        self._run(_decide_close, deadline)
        self._record(f"The node '{self.node}' has closed the rendezvous.", NodeState.SUCCEEDED)

    def _keep_alive(self) -> None:
        deadline = time.monotonic() + self._settings.timeout.heartbeat.total_seconds()
        try:
            self._run(_decide_keep_alive, deadline)
        except RendezvousError as exc:
            logger.warning(
                "The node '%s' has failed to send a keep-alive heartbeat to the rendezvous "
                "'%s' due to an error of type %s.",
                self.node,
                self._settings.run_id,
                type(exc).__name__,
            )

    def _run(self, decide: _Decision, deadline: float, refresh_deadline: bool = False) -> None:
        """Sync, decide, apply, until the decision is FINISH (torch's op executor)."""
        holder = self._holder
        while True:
            with self._lock:
                holder.sync()
                ctx = _Context(
                    self.node,
                    holder.state,
                    self._settings,
                    self._keep_alive_due(),
                    holder.last_call_elapsed(),
                )
                action = decide(ctx, deadline)
                if action is _Action.FINISH:
                    return
                if action is _Action.ERROR_CLOSED:
                    raise RendezvousClosedError(
                        f"The rendezvous '{self._settings.run_id}' is closed."
                    )
                if action is _Action.ERROR_TIMEOUT:
                    raise RendezvousTimeoutError(
                        f"The node '{self.node}' has timed out in the rendezvous "
                        f"'{self._settings.run_id}' (round {holder.state.round}, "
                        f"{len(holder.state.participants)} participant(s), min_nodes="
                        f"{self._settings.min_nodes}, max_nodes={self._settings.max_nodes})."
                    )
                if action is not _Action.SYNC:
                    self._apply(action)
                    holder.mark_dirty()
                    if refresh_deadline and action is _Action.REMOVE_FROM_REDUNDANCY_LIST:
                        deadline = time.monotonic() + self._settings.timeout.join.total_seconds()
                    continue
            time.sleep(self._poll_interval)

    def _keep_alive_due(self) -> bool:
        if self.node not in self._holder.state.heartbeats or self._beat_at is None:
            return False
        interval = self._settings.keep_alive_interval.total_seconds()
        return time.monotonic() - self._beat_at >= interval

    def _apply(self, action: _Action) -> None:
        state, node = self._holder.state, self.node
        if action is _Action.KEEP_ALIVE:
            self._touch()
        elif action is _Action.ADD_TO_PARTICIPANTS:
            state.wait_list.discard(node)
            state.participants[node] = 0
            self._touch()
            if len(state.participants) == self._settings.min_nodes:
                state.last_call_count += 1
                state.last_call = state.last_call_count
            if len(state.participants) == self._settings.max_nodes:
                self._mark_complete()
        elif action is _Action.ADD_TO_WAIT_LIST:
            state.wait_list.add(node)
            self._touch()
        elif action is _Action.ADD_TO_REDUNDANCY_LIST:
            state.redundancy_list.add(node)
            self._touch()
        elif action is _Action.REMOVE_FROM_PARTICIPANTS:
            del state.participants[node]
            state.heartbeats.pop(node, None)
            _drop_participant_epilogue(state, self._settings.min_nodes)
        elif action is _Action.REMOVE_FROM_WAIT_LIST:
            state.wait_list.discard(node)
            state.heartbeats.pop(node, None)
        elif action is _Action.REMOVE_FROM_REDUNDANCY_LIST:
            state.redundancy_list.discard(node)
            state.heartbeats.pop(node, None)
        elif action is _Action.MARK_RENDEZVOUS_COMPLETE:
            self._mark_complete()
        elif action is _Action.MARK_RENDEZVOUS_CLOSED:
            state.closed = True

    def _touch(self) -> None:
        self._beat += 1
        self._beat_at = time.monotonic()
        state = self._holder.state
        state.heartbeats[self.node] = state.heartbeats.get(self.node, 0) + 1

    def _mark_complete(self) -> None:
        state = self._holder.state
        state.complete = True
        state.last_call = 0
        for rank, node in enumerate(sorted(state.participants, key=node_sort_key)):
            state.participants[node] = rank

    # ------------------------------------------------------------------ round store
    def _bootstrap(self, rank: int, store: Store) -> RendezvousStoreInfo:
        """Where the workers' store lives: the rendezvous store's own server when it is a
        TCPStore (and sharing is on), else a server that rank 0 starts (once per handler;
        or, sharing off, a free port for the workers' own store), published through each
        round's store (rank 0 may be another node in the next round)."""
        from rdzv.store.tcp import TCPStore

        if self.use_agent_store and isinstance(self._store, TCPStore):
            info = RendezvousStoreInfo(self._store.host, self._store.port)
        else:
            port = None
            if rank == 0:
                if self.use_agent_store:
                    if self._bootstrap_server is None:
                        self._bootstrap_server = TCPStore(
                            self._addr, 0, is_master=True, multi_tenant=True
                        )
                    port = int(self._bootstrap_server.port)
                else:
                    with socket.socket() as sock:
                        sock.bind(("", 0))
                        port = int(sock.getsockname()[1])
            info = RendezvousStoreInfo.build(rank, store, self._addr, port)
        return info

    # ------------------------------------------------------------------ heartbeats
    def _start_heartbeats(self) -> None:
        self._heartbeats = _Heartbeats(self)

    def _stop_heartbeats(self) -> None:
        if self._heartbeats is not None:
            self._heartbeats.stop()
            self._heartbeats = None

    def _record(self, message: str, state: NodeState, rank: int | None = None) -> None:
        record_rdzv_event_fields(
            f"{type(self).__name__}.{_caller_name()}",
            self._settings.run_id,
            message,
            state,
            rank=rank,
            local_id=self._local_id,
        )


def _caller_name() -> str:
    return sys._getframe(2).f_code.co_name


class _Heartbeats:
    """The keep-alive thread ``RendezvousKeepAliveTimer_{local_id}`` (torch's name). It holds
    the handler weakly and stops when the handler is collected."""

    def __init__(self, handler: BackendRendezvousHandler) -> None:
        self._stopped = threading.Event()
        ref = weakref.ref(handler)
        interval = handler.settings.keep_alive_interval.total_seconds()
        self._thread = threading.Thread(
            target=self._loop,
            args=(ref, interval, self._stopped),
            name=f"RendezvousKeepAliveTimer_{handler._local_id}",
            daemon=True,
        )
        self._thread.start()
        weakref.finalize(handler, _stop_thread, self._stopped, self._thread)

    @staticmethod
    def _loop(
        ref: weakref.ref[BackendRendezvousHandler], interval: float, stopped: threading.Event
    ) -> None:
        while not stopped.wait(interval):
            handler = ref()
            if handler is None:
                return
            handler._keep_alive()
            del handler

    def stop(self) -> None:
        _stop_thread(self._stopped, self._thread)


def _stop_thread(stopped: threading.Event, thread: threading.Thread) -> None:
    stopped.set()
    if thread is not threading.current_thread():
        thread.join()


DynamicRendezvousHandler.register(BackendRendezvousHandler)
