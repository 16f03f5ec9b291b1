"""The decisions of the dynamic rendezvous: join, close, monitor, repair, time out.

:class:`RendezvousCore` holds one node's view of a dynamic rendezvous and decides what it does
next as a function of what it has read from the store and the time. Its methods are programs
(:mod:`rdzv.rendezvous.ops`): they yield store operations, the time (:data:`~rdzv.rendezvous.
ops.NOW`) and the effects below, and an executor performs them: the blocking
:class:`~rdzv.rendezvous.dynamic.DynamicRendezvousHandler`, the asyncio
:class:`~rdzv.rendezvous.async_node.AsyncRendezvousNode`, or a unit test answering each
operation itself. No I/O, no thread, no clock of its own.

Effects (what the executor does besides the store):

* :class:`Track`: beat this liveness key from now on (None: none);
* :class:`Bootstrap`: this node became rank 0 and its descriptor offered no bootstrap
  endpoint: provide one (start a store server, or pick a free port), returns ``(addr, port)``;
* :class:`CleanUp`: delete the keys of an old round, in the background;
* :class:`Record`: record a rendezvous event (a node declared dead).

The algorithm, the keys and the failure cases are described in ``docs/rendezvous.md``.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
from dataclasses import dataclass, field
from datetime import timedelta

from rdzv.errors import (
    RendezvousClosedError,
    RendezvousGracefulExitError,
    RendezvousStateError,
    RendezvousTimeoutError,
    StoreTimeoutError,
)
from rdzv.rendezvous.api import RendezvousStoreInfo, check_node_bounds
from rdzv.rendezvous.liveness import Liveness, LivenessObserver, Status
from rdzv.rendezvous.ops import (
    NOW,
    Add,
    Check,
    CompareSet,
    DeleteKey,
    Effect,
    Get,
    MultiGet,
    MultiSet,
    Program,
    Set,
    Wait,
)
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

__all__ = [
    "Bootstrap",
    "CleanUp",
    "Completed",
    "Record",
    "RendezvousCore",
    "RendezvousSettings",
    "RendezvousTimeout",
    "Track",
    "clean_up_program",
    "seconds",
]

logger = logging.getLogger("rdzv.rendezvous.dynamic")

#: The longest period, in keep-alive intervals, between two looks of a waiting non-monitor
#: at the monitors of its round (see ``RendezvousCore._watch_period``).
MAX_WATCH_INTERVALS = 16
#: Slots of a completed round per look-out block: when the members re-join the next round,
#: the two lowest slots of each block of this many (slots 1-2, 65-66, ...) watch the
#: heartbeats of their block from their first request on (see ``RendezvousCore._look_out``).
LOOKOUT_BLOCK = 64


# ---------------------------------------------------------------------------- configuration
def seconds(value: timedelta | float | int, name: str) -> timedelta:
    """``value`` (a timedelta or finite seconds) as a timedelta; TypeError/ValueError naming
    ``name`` otherwise."""
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
            td = self._DEFAULT[name] if value is None else seconds(value, f"{name} timeout")
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

    @staticmethod
    def checked(
        run_id: str,
        min_nodes: int,
        max_nodes: int,
        timeout: RendezvousTimeout | None,
        keep_alive_interval: timedelta | float,
        keep_alive_max_attempt: int,
    ) -> RendezvousSettings:
        """Validated settings (torch's ValueError texts): a non-empty run id, node bounds
        (:func:`~rdzv.rendezvous.api.check_node_bounds`), a positive keep-alive interval
        (timedelta or seconds) and max attempt >= 1; ``timeout`` None means the defaults."""
        if not run_id:
            raise ValueError("The run id must be a non-empty string.")
        check_node_bounds(min_nodes, max_nodes)
        interval = seconds(keep_alive_interval, "keep-alive interval")
        if interval <= timedelta(0):
            raise ValueError(f"The keep-alive interval ({interval}) must be positive.")
        if keep_alive_max_attempt < 1:
            raise ValueError(
                f"The keep-alive max attempt ({keep_alive_max_attempt}) must be at least 1."
            )
        return RendezvousSettings(
            run_id,
            min_nodes,
            max_nodes,
            timeout or RendezvousTimeout(),
            interval,
            keep_alive_max_attempt,
        )


# ---------------------------------------------------------------------------- effects
@dataclass(frozen=True, slots=True)
class Track(Effect):
    """Beat ``key`` from now on (None: stop beating)."""

    key: str | None


@dataclass(frozen=True, slots=True)
class Bootstrap(Effect):
    """Provide the bootstrap endpoint as rank 0: returns ``(addr, port)``."""


@dataclass(frozen=True, slots=True)
class CleanUp(Effect):
    """Delete the keys of round ``number`` (every node has left it) in the background."""

    number: int


@dataclass(frozen=True, slots=True)
class Record(Effect):
    """Record ``message`` as a rendezvous event of this node (state RUNNING)."""

    message: str


# ---------------------------------------------------------------------------- per-round state
class _Close(enum.Enum):
    DONE = "done"  # this call closed the round
    TAKEN = "taken"  # somebody else closed (or the rendezvous was closed)
    NOT_READY = "not ready"  # gate closed, or not enough live nodes for the asked mode


@dataclass
class Completed:
    """The round this node last completed, and its outcome."""

    keys: RoundKeys
    slot: int
    rank: int
    world_size: int
    #: The bootstrap endpoint (``MASTER_ADDR``, ``MASTER_PORT``) of the round.
    master: tuple[str, int] = ("", 0)


@dataclass
class _LookOut:
    """A member's watch over its block of the round it left (see
    ``RendezvousCore._look_out``): the heartbeat keys of the block's members not yet known
    gone, with their slots, and the observer holding what it saw of them and when."""

    keys: RoundKeys
    world_size: int
    slots: dict[str, int]
    observer: LivenessObserver


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
    #: The slot count a monitor saw at its previous look (0: none yet).
    watched_upto: int = 0
    #: This node's watch over its block of the previous round, if it is a look-out.
    lookout: _LookOut | None = None

    @property
    def number(self) -> int:
        return self.keys.number


# ---------------------------------------------------------------------------- the core
class RendezvousCore:
    """One node's decisions in a dynamic rendezvous (see the module docstring).

    Args:
        settings: the rendezvous settings.
        keys: the key layout of the run.
        liveness: how nodes prove they are alive (its programs are used).
        addr, pid, local_id, nonce: this node's identity (its :class:`NodeDesc`).
        interval: seconds between keep-alives (a non-monitor looks at its monitors as often).

    The state (:attr:`membership`, :attr:`pending`) changes only inside the programs; one
    program runs at a time per core (the executor's job).
    """

    def __init__(
        self,
        settings: RendezvousSettings,
        keys: RunKeys,
        liveness: Liveness,
        *,
        addr: str,
        pid: int,
        local_id: int,
        nonce: str,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.liveness = liveness
        self.addr = addr
        self.pid = pid
        self.local_id = local_id
        self.nonce = nonce
        self.token = f"{addr}_{pid}_{local_id}_{nonce}"
        self.node = f"{addr}_{pid}_{local_id}"
        self.interval = settings.keep_alive_interval.total_seconds()
        self.membership: Completed | None = None
        self.pending: _Pending | None = None

    # ------------------------------------------------------------------ joining
    def next_rendezvous(self, master: tuple[str, int] | None) -> Program[Completed]:
        """Join the next round and wait until it completes (see
        :meth:`~rdzv.rendezvous.dynamic.DynamicRendezvousHandler.next_rendezvous` for the
        errors). ``master``: the bootstrap endpoint this node offers if it becomes rank 0."""
        join_timeout = self.settings.timeout.join.total_seconds()
        deadline = (yield NOW) + join_timeout
        previous = self.membership
        self.membership = None
        lookout: _LookOut | None = None
        if previous is None:
            number = yield from self._current_round()
        else:
            # A member joins the round after its own: no read of the round counter (one
            # request less per node in the re-join storm); if the rendezvous has moved on
            # further, the join finds out (late) and the counter is read then.
            number = previous.keys.number + 1
            lookout = yield from self._look_out(previous)
        hinted = left_previous = previous is None
        while True:
            pending, late = yield from self.join(number, previous, master, lookout)
            lookout = None
            if not left_previous:
                assert previous is not None
                yield from self._leave_member_round(previous, evaluate=number)
                left_previous = True
            outcome = None if late else (yield from self._await(pending, deadline))
            if outcome is None:  # late: not admitted to this round, wait for the next one
                number += 1
                if not hinted:
                    number = max(number, (yield from self._current_round()))
                    hinted = True
                continue
            return (yield from self._complete(pending, outcome))

    def _current_round(self) -> Program[int]:
        """The round counter: the round a newcomer joins first."""
        number = yield Add(self.keys.round, 0)
        if number < 0:
            raise RendezvousStateError(
                f"the round counter {self.keys.round!r} is negative ({number}): the "
                "rendezvous state is corrupt or hostile"
            )
        return int(number)

    def _look_out(self, member: Completed) -> Program[_LookOut | None]:
        """If this node is a look-out of the round it completed (the two lowest slots of
        each block of :data:`LOOKOUT_BLOCK`), take the first look at the heartbeats of its
        block's members now, before re-joining; None otherwise.

        A dead member is declared once its heartbeat has been seen unchanged for the
        liveness expiry, counted from a first look. The monitors of the next round take
        theirs once they hold their slots, i.e. after the re-join storm (a chain of requests
        each queued behind everybody's), which delayed a re-rendezvous after a node loss by
        the length of that storm. A look-out's first look is its first request, and the
        look-outs split the old round between them (O(1) keys each, O(N) in all, like one
        monitor look)."""
        keys, slot = member.keys, member.slot
        if (slot - 1) % LOOKOUT_BLOCK >= 2:
            return None
        first = slot - (slot - 1) % LOOKOUT_BLOCK
        # Slots up to the world size (or ours) were all joined, so their keys exist.
        last = min(first + LOOKOUT_BLOCK - 1, max(member.world_size, slot))
        block = {keys.alive(s): s for s in range(first, last + 1) if s != slot}
        if not block:
            return None
        observer = self.liveness.observer(self.token)
        statuses = yield from observer.observe_program(list(block))
        try:  # the members of the block (a live slot may have been late, not a member)
            size = yield from self._read_size(keys, timeout=0.0)
        except StoreTimeoutError:  # the round has been cleaned up: the rendezvous moved on
            return None
        members = set() if size.closed else set(size.members())
        watched = {
            key: s for key, s in block.items() if s in members and statuses[key] is Status.ALIVE
        }
        observer.forget([key for key in block if key not in watched])
        if not watched:
            return None
        return _LookOut(keys, member.world_size, watched, observer)

    def join(
        self,
        number: int,
        previous: Completed | None = None,
        master: tuple[str, int] | None = None,
        lookout: _LookOut | None = None,
    ) -> Program[tuple[_Pending, bool]]:
        """Take a slot in round ``number`` and write this node's descriptor and heartbeat.
        Returns the pending state and whether the round had already completed without us.
        ``lookout``: this node's watch over the previous round, kept while it waits."""
        keys = self.keys.of(number)
        slot = yield Add(keys.joined, 1)
        if slot < 1:
            raise RendezvousStateError(
                f"the slot counter {keys.joined!r} returned {slot}: the rendezvous state is "
                "corrupt or hostile"
            )
        was_member = previous is not None and previous.keys.number == number - 1
        if slot > SEAL:
            # The round was frozen before our add: we are late, or it was closed.
            pending = _Pending(keys, 0, self.liveness.observer(self.token), was_member=was_member)
            if (yield from self._read_size(keys)).closed:
                yield from self._raise_closed(pending, retire=False)
            return pending, True
        desc = NodeDesc(
            addr=self.addr,
            pid=self.pid,
            local_id=self.local_id,
            nonce=self.nonce,
            prev_round=None if previous is None else previous.keys.number,
            prev_rank=None if previous is None else previous.rank,
            master=master,
        )
        alive = keys.alive(slot)
        entries = [(keys.node(slot), desc.encode()), *self.liveness.announce(alive)]
        yield MultiSet([k for k, _ in entries], [v for _, v in entries])
        yield Track(alive)
        pending = _Pending(
            keys,
            slot,
            self.liveness.observer(self.token),
            gate_open=number == 0,
            was_member=was_member,
        )
        if lookout is not None and lookout.keys.number == number - 1:
            pending.lookout = lookout
        self.pending = pending
        logger.debug("node %s took slot %d of round %d", self.node, slot, number)
        if slot >= self.settings.min_nodes:
            yield from self._evaluate(pending, joined=slot)
        return pending, False

    def _leave_member_round(self, member: Completed, evaluate: int) -> Program[None]:
        """Leave the round this node completed earlier (it has joined the next one)."""
        if not (yield from self.liveness.retire_program(member.keys.alive(member.slot))):
            return  # already declared dead by a peer: accounted for by the declarer
        vacated = yield Add(member.keys.nvacated, 1)
        if vacated == member.world_size:
            yield from self._dissolve(member.keys.number, evaluate)

    def _dissolve(self, number: int, evaluate: int | None) -> Program[None]:
        """Every member of round ``number`` has left or died: open the gate of the next."""
        following = self.keys.of(number + 1)
        yield Set(following.gate, b"1")
        logger.debug("round %d dissolved; the gate of round %d is open", number, number + 1)
        pending = self.pending
        if evaluate == number + 1 and pending is not None and pending.number == number + 1:
            self._gate_opened(pending)
            yield from self._evaluate(pending, joined=None)

    def _evaluate(self, pending: _Pending, joined: int | None) -> Program[None]:
        """Close the round now if it is full, start the last call if it has min_nodes."""
        keys = pending.keys
        if not pending.gate_open:
            if not (yield Check([keys.gate])):
                return
            self._gate_opened(pending)
        if joined is None:
            joined = yield Add(keys.joined, 0)
            assert joined is not None
            if joined > SEAL:
                return  # frozen already
        live = joined - (yield Add(keys.ngone, 0))
        settings = self.settings
        if live >= settings.max_nodes:
            yield from self._attempt_close(keys, full=True, gate_open=True)
        elif live >= settings.min_nodes:
            yield CompareSet(keys.quorum, b"", b"1")

    # ------------------------------------------------------------------ closing a round
    def _attempt_close(
        self, keys: RoundKeys, full: bool, gate_open: bool = False
    ) -> Program[_Close]:
        """Freeze the membership of round ``keys`` with one compare_set, then publish every
        slot's rank record (one multi_set). ``full``: close only with max_nodes live slots
        (else: with at least min_nodes, the last call being over). ``gate_open``: the caller
        has seen the gate open (no need to check it again)."""
        settings = self.settings
        if keys.number > 0 and not gate_open and not (yield Check([keys.gate])):
            return _Close.NOT_READY
        joined = yield Add(keys.joined, 0)
        if joined > SEAL:
            return _Close.TAKEN
        slots = list(range(1, joined + 1))
        token = self.token
        statuses = yield from self.liveness.snapshot_program([keys.alive(s) for s in slots], token)
        live: list[int] = []
        excluded: list[int] = []
        for slot, status in zip(slots, statuses, strict=True):
            if status is Status.ALIVE:
                live.append(slot)
            else:
                excluded.append(slot)
                if status is Status.DECLARED:
                    yield Add(keys.ngone, 1)
                    yield from self._node_lost(keys, slot)
        needed = settings.max_nodes if full else settings.min_nodes
        if len(live) < needed:
            return _Close.NOT_READY
        late: list[int] = []
        if len(live) > settings.max_nodes:
            raw_descs = yield MultiGet([keys.node(s) for s in live])
            descs = [
                (slot, NodeDesc.decode(keys.node(slot), raw))
                for slot, raw in zip(live, raw_descs, strict=True)
            ]
            admitted = set(choose_members(keys.number, descs, settings.max_nodes))
            late = [s for s in live if s not in admitted]
        world_size = len(live) - len(late)
        record = SizeRecord(joined, world_size, tuple(excluded), tuple(late), closer=token)
        raw = record.encode()
        current = yield CompareSet(keys.size, b"", raw)
        if current != raw:
            SizeRecord.decode(keys.size, current, settings.max_nodes)  # validate the winner's
            return _Close.TAKEN
        yield from self._publish_ranks(keys, record)
        logger.info(
            "round %d of the rendezvous '%s' closed with %d node(s) (%d slot(s), %d gone)",
            keys.number,
            settings.run_id,
            world_size,
            joined,
            len(excluded),
        )
        if keys.number >= 2:
            yield CleanUp(keys.number - 2)
        return _Close.DONE

    def _publish_ranks(self, keys: RoundKeys, record: SizeRecord) -> Program[None]:
        """Write the rank record of every slot of a closed round (deterministic: any node can
        do it again from the size record and the descriptors, with the same result)."""
        # Seal the slot counter first: a later joiner sees from its add alone that it is
        # late; the slots taken since the snapshot get a "late" record below.
        taken = slot_count((yield Add(keys.joined, SEAL)))
        members = record.members()
        raw_descs = (yield MultiGet([keys.node(s) for s in members])) if members else []
        descs = [
            (slot, NodeDesc.decode(keys.node(slot), raw))
            for slot, raw in zip(members, raw_descs, strict=True)
        ]
        ordered = assign_ranks(keys.number, descs)
        master = ordered[0][1].master if ordered else None
        out_keys = [keys.quorum, self.keys.round]
        out_values = [b"1", str(keys.number + 1).encode()]
        ranked = {slot for slot, _ in ordered}
        for rank, (slot, _) in enumerate(ordered):
            out_keys.append(keys.rank(slot))
            out_values.append(RankRecord(rank, record.world_size, master).encode())
        for slot in range(1, max(record.joined, taken) + 1):
            if slot not in ranked:
                out_keys.append(keys.rank(slot))
                out_values.append(LATE_RANK)
        yield MultiSet(out_keys, out_values)

    def _read_size(self, keys: RoundKeys, timeout: float | None = None) -> Program[SizeRecord]:
        raw = yield Get(keys.size, timeout)
        return SizeRecord.decode(keys.size, raw, self.settings.max_nodes)

    # ------------------------------------------------------------------ waiting
    def _await(self, pending: _Pending, deadline: float) -> Program[RankRecord | None]:
        """Wait until this node's rank record appears; do the timed duties meanwhile
        (watching peers, closing after the last call, the join timeout). Returns the record
        of a member, None if late; raises on close/timeout."""
        keys = pending.keys
        settings = self.settings
        rank_key = keys.rank(pending.slot)
        last_call = settings.timeout.last_call.total_seconds()
        monitor_tick = self.interval / 2
        self._update_role(pending)
        # A monitor looks at once: a peer that died before we came is declared one expiry
        # after this first look (nobody can know how long it has been silent already).
        next_tick = (yield NOW) + (0.0 if pending.monitor else self._watch_period(pending))
        while True:
            now = yield NOW
            watch_quorum = (
                pending.monitor
                and pending.quorum_at is None
                and pending.size_seen_at is None
                and settings.min_nodes < settings.max_nodes
            )
            key = keys.quorum if watch_quorum else rank_key
            wake = min(next_tick, deadline)
            # Waking when a watched heartbeat would expire makes a death known at once: what
            # the monitors and the next in line do; the nodes further up keep their period.
            observed = None
            if pending.monitor or self._watch_period(pending) <= self.interval:
                observed = pending.observer.next_deadline()
            if observed is not None:
                wake = min(wake, observed)
            close_at = None
            if pending.quorum_at is not None and self._is_primary(pending):
                close_at = pending.quorum_at + last_call
                wake = min(wake, close_at)
            lookout_at = None
            if pending.lookout is not None:
                lookout_at = pending.lookout.observer.next_deadline()
                if lookout_at is not None:
                    wake = min(wake, lookout_at)
            try:
                if key == rank_key:
                    # One request that waits for the record and returns it.
                    raw = yield Get(rank_key, max(0.0, wake - now))
                    return (yield from self._decode_rank(pending, raw))
                yield Wait([key], max(0.0, wake - now))
            except StoreTimeoutError:
                pass
            else:
                pending.quorum_at = yield NOW
                continue
            now = yield NOW
            if close_at is not None and now >= close_at:
                outcome = yield from self._attempt_close(keys, False, pending.gate_open)
                if outcome is _Close.NOT_READY:
                    # Fewer than min_nodes are left: the last call starts again when a
                    # joiner brings the round back to min_nodes (torch clears its deadline).
                    yield DeleteKey(keys.quorum)
                    pending.quorum_at = None
                    if (yield Check([keys.size])):  # closed meanwhile (set_closed)
                        pending.size_seen_at = yield NOW
                continue
            if lookout_at is not None and now >= lookout_at:
                yield from self._look(pending)
            if now >= next_tick or (observed is not None and now >= observed):
                yield from self._tick(pending)
                next_tick = now + (monitor_tick if pending.monitor else self._watch_period(pending))
            if now >= deadline:
                if (yield from self._is_redundant(pending)):
                    deadline = now + settings.timeout.join.total_seconds()
                    continue
                return (yield from self._time_out(pending))

    def _look(self, pending: _Pending) -> Program[None]:
        """A look-out's look at its block of the previous round, when a heartbeat there
        could have expired: declares the dead, forgets the gone; the look-out whose
        declaration vacates the last member dissolves that round (opens the gate)."""
        watch = pending.lookout
        assert watch is not None
        statuses = yield from watch.observer.observe_program(list(watch.slots))
        for key, status in statuses.items():
            if status is Status.ALIVE:
                continue
            slot = watch.slots.pop(key)
            watch.observer.forget([key])
            if status is Status.DECLARED:
                vacated = yield from self._vacate_dead(watch.keys, slot)
                if vacated == watch.world_size:
                    yield from self._dissolve(watch.keys.number, evaluate=pending.number)
        if not watch.slots:
            pending.lookout = None

    def _vacate_dead(self, keys: RoundKeys, slot: int) -> Program[int]:
        """Account for the member in ``slot`` of the completed round ``keys``, declared dead
        by this node: it has vacated the round. Returns the vacated count."""
        vacated: int = yield Add(keys.nvacated, 1)
        yield from self._node_lost(keys, slot)
        return vacated

    def _gate_opened(self, pending: _Pending) -> None:
        """The previous round has dissolved (every member left or was declared dead): stop
        watching its members. Their heartbeats stay in the observers otherwise, and one
        seen unchanged would keep the next wake-up in the past (a busy loop)."""
        pending.gate_open = True
        if pending.prev_members:
            prev_keys = self.keys.of(pending.number - 1)
            pending.observer.forget([prev_keys.alive(s) for s in pending.prev_members])
            pending.prev_members = []
        pending.lookout = None

    @staticmethod
    def _is_primary(pending: _Pending) -> bool:
        """Whether this node is the lowest live slot of its round (as far as it knows): the
        one that closes the round when the last call ends."""
        return all(s in pending.gone for s in range(1, pending.slot))

    def _watch_period(self, pending: _Pending) -> float:
        """How often a non-monitor looks at the two monitors: every keep-alive interval for
        the slots next in line, less often further up (``live_below // 4`` intervals, at
        most :data:`MAX_WATCH_INTERVALS`). N waiting nodes then cost O(N / 16) looks per
        interval instead of N (a round slowed past one interval no longer multiplies its
        own load), and after the loss of the m lowest slots the next in line still takes
        over within about m / 4 intervals."""
        live_below = pending.slot - 1 - sum(1 for s in pending.gone if s < pending.slot)
        return self.interval * min(MAX_WATCH_INTERVALS, max(1, live_below // 4))

    @staticmethod
    def _update_role(pending: _Pending) -> None:
        live_below = pending.slot - 1 - len([s for s in pending.gone if s < pending.slot])
        pending.monitor = live_below < 2

    def _tick(self, pending: _Pending) -> Program[None]:
        """One round of watching. The two lowest live slots of the round (monitors) watch
        every slot of the round and every member of the previous round that has not come
        back; the other nodes watch the two monitors (so that a dead monitor is replaced)."""
        keys = pending.keys
        if pending.monitor:
            joined = slot_count((yield Add(keys.joined, 0)))
            # The slots taken by the previous look (and at the first look, the ones below
            # this node's): they have had a tick to write their heartbeat, so the read finds
            # them all (a missing key costs a few ``check`` calls to find, and during a join
            # storm hundreds are missing). A newer slot is first looked at next tick.
            upto = pending.watched_upto if pending.watched_upto else pending.slot
            pending.watched_upto = joined
            watched = [s for s in range(1, min(upto, joined) + 1) if s != pending.slot]
        else:
            # The two lowest live slots, without walking every slot below (O(1), not O(N)).
            below = (s for s in range(1, pending.slot) if s not in pending.gone)
            watched = list(itertools.islice(below, 2))
        targets = {keys.alive(s): (keys, s) for s in watched if s not in pending.gone}
        prev_keys: RoundKeys | None = None
        if pending.monitor and not pending.gate_open:
            if (yield Check([keys.gate])):
                self._gate_opened(pending)
            else:
                prev_keys = self.keys.of(pending.number - 1)
                for slot in (yield from self._previous_members(pending, prev_keys)):
                    targets[prev_keys.alive(slot)] = (prev_keys, slot)
        statuses = yield from pending.observer.observe_program(list(targets))
        for key, status in statuses.items():
            round_keys, slot = targets[key]
            if status is Status.ALIVE:
                continue
            pending.observer.forget([key])
            if round_keys is keys:
                pending.gone.add(slot)
                if status is Status.DECLARED:
                    yield Add(keys.ngone, 1)
                    yield from self._node_lost(keys, slot)
            else:
                assert pending.prev_members is not None and prev_keys is not None
                pending.prev_members.remove(slot)
                if status is Status.DECLARED:
                    yield from self._vacate_dead(prev_keys, slot)
        if prev_keys is not None and pending.prev_members == []:
            yield from self._dissolve(prev_keys.number, evaluate=None)
            self._gate_opened(pending)
        was_monitor = pending.monitor
        self._update_role(pending)
        if pending.monitor and not was_monitor:
            logger.debug("node %s now watches round %d", self.node, pending.number)
        if (
            pending.monitor
            and pending.gate_open
            and pending.quorum_at is None
            and not (yield Check([keys.size]))
        ):
            live = slot_count((yield Add(keys.joined, 0))) - len(pending.gone)
            if live >= self.settings.max_nodes:
                yield from self._attempt_close(keys, full=True, gate_open=True)
            elif live >= self.settings.min_nodes:
                yield CompareSet(keys.quorum, b"", b"1")
        if pending.monitor:
            yield from self._repair_ranks(pending)

    def _previous_members(self, pending: _Pending, prev_keys: RoundKeys) -> Program[list[int]]:
        if pending.prev_members is None:
            size = yield from self._read_size(prev_keys)
            if size.closed:
                raise RendezvousStateError(
                    f"round {prev_keys.number} is marked closed but round {pending.number} "
                    "was joined: the rendezvous state is inconsistent"
                )
            pending.prev_size = size
            pending.prev_members = size.members()
        return list(pending.prev_members)

    def _repair_ranks(self, pending: _Pending) -> Program[None]:
        """If the round was closed but its closer died before publishing the ranks, publish
        them (the same values) once the records have been missing for the liveness expiry."""
        keys = pending.keys
        if not (yield Check([keys.size])):
            return
        now = yield NOW
        if pending.size_seen_at is None:
            pending.size_seen_at = now
            return
        if now - pending.size_seen_at < self.liveness.expiry:
            return
        if (yield Check([keys.rank(pending.slot)])):
            return
        record = yield from self._read_size(keys)
        if record.closed:
            yield from self._publish_closed(keys)
            return
        logger.warning(
            "round %d was closed but its rank records are missing after %.1fs: the closer "
            "died; publishing them",
            keys.number,
            self.liveness.expiry,
        )
        yield from self._publish_ranks(keys, record)

    def _node_lost(self, keys: RoundKeys, slot: int) -> Program[None]:
        msg = (
            f"The node in slot {slot} of round {keys.number} of the rendezvous "
            f"'{self.settings.run_id}' missed its heartbeats for "
            f"{self.liveness.expiry:.3f}s and was declared dead by '{self.node}'."
        )
        logger.warning(msg)
        yield Record(msg)

    def _is_redundant(self, pending: _Pending) -> Program[bool]:
        """torch's redundancy list: the previous round is still running with max_nodes
        members, none of which has left; such a node waits without timeout."""
        if pending.number == 0 or pending.was_member or pending.gate_open:
            return False
        if (yield Check([pending.keys.gate])):
            return False
        prev_keys = self.keys.of(pending.number - 1)
        if pending.prev_size is None:
            pending.prev_size = yield from self._read_size(prev_keys)
        if pending.prev_size.closed or pending.prev_size.world_size < self.settings.max_nodes:
            return False
        return not (yield Check([prev_keys.nvacated]))

    def _time_out(self, pending: _Pending) -> Program[RankRecord | None]:
        """The join timeout expired: leave the round (rollback) and raise, unless the round
        completed with this node in the meantime."""
        keys = pending.keys
        if (yield Check([keys.rank(pending.slot)])):
            raw = yield Get(keys.rank(pending.slot))
            return (yield from self._decode_rank(pending, raw))
        yield Track(None)
        if (yield from self.liveness.retire_program(keys.alive(pending.slot))):
            yield Add(keys.ngone, 1)
        self.pending = None
        live = slot_count((yield Add(keys.joined, 0))) - (yield Add(keys.ngone, 0))
        missing = yield from self._describe_missing(pending)
        raise RendezvousTimeoutError(
            f"The node '{self.node}' timed out after "
            f"{self.settings.timeout.join.total_seconds():g}s waiting for round "
            f"{keys.number} of the rendezvous '{self.settings.run_id}' to complete "
            f"({max(live, 0)} node(s) waiting, min_nodes={self.settings.min_nodes}, "
            f"max_nodes={self.settings.max_nodes}); it has left the round.{missing}"
        )

    def _describe_missing(self, pending: _Pending) -> Program[str]:
        """The members of the previous round that neither came back nor are gone (a round
        waits for them): host, pid and last heartbeat, for a join timeout's message."""
        if pending.number == 0:
            return ""
        prev = self.keys.of(pending.number - 1)
        try:
            slots = yield from self._previous_members(pending, prev)
        except RendezvousStateError:
            return ""
        if not slots:
            return ""
        now: float = yield NOW
        parts = []
        for slot in slots:
            who = f"slot {slot}"
            if (yield Check([prev.node(slot)])):
                desc = NodeDesc.decode(prev.node(slot), (yield Get(prev.node(slot))))
                who += f" (host {desc.addr}, pid {desc.pid}"
            else:
                who += " (unknown node"
            since = pending.observer.last_change(prev.alive(slot))
            beat = "not watched" if since is None else f"{now - since:.1f}s ago"
            parts.append(f"{who}, last heartbeat {beat})")
        return (
            f" Still waiting for {len(parts)} member(s) of round {prev.number} to come back "
            f"or be declared dead: {'; '.join(parts)}."
        )

    def _decode_rank(self, pending: _Pending, raw: bytes) -> Program[RankRecord | None]:
        """This node's rank record: the record of a member, None if late; raises if the
        rendezvous was closed."""
        key = pending.keys.rank(pending.slot)
        record = RankRecord.decode(key, raw, self.settings.max_nodes)
        if record.closed:
            yield from self._raise_closed(pending)
        if record.late:
            logger.debug("node %s is late for round %d", self.node, pending.number)
            return None
        return record

    def _raise_closed(self, pending: _Pending, retire: bool = True) -> Program[None]:
        redundant = yield from self._is_redundant(pending)
        yield Track(None)
        if retire:
            yield from self.liveness.retire_program(pending.keys.alive(pending.slot))
        self.pending = None
        if redundant:
            raise RendezvousGracefulExitError(
                f"The rendezvous '{self.settings.run_id}' is closed, terminating pending "
                "rendezvous."
            )
        raise RendezvousClosedError(f"The rendezvous '{self.settings.run_id}' is closed.")

    # ------------------------------------------------------------------ completion
    def _complete(self, pending: _Pending, record: RankRecord) -> Program[Completed]:
        keys = pending.keys
        self.pending = None
        master = record.master
        if master is None:
            master = yield from self._exchange_master(keys, record.rank)
        if record.rank == 0:
            prefix = keys.store_prefix + "/"
            yield MultiSet(
                [
                    prefix + RendezvousStoreInfo.MASTER_ADDR_KEY,
                    prefix + RendezvousStoreInfo.MASTER_PORT_KEY,
                ],
                [master[0].encode(), str(master[1]).encode()],
            )
        self.membership = Completed(keys, pending.slot, record.rank, record.world_size, master)
        return self.membership

    def _exchange_master(self, keys: RoundKeys, rank: int) -> Program[tuple[str, int]]:
        """The bootstrap endpoint when rank 0's descriptor did not carry one: rank 0 provides
        one (the :class:`Bootstrap` effect) and publishes it; the others read it."""
        if rank == 0:
            addr, port = yield Bootstrap()
            yield Set(keys.master, MasterRecord(addr, port).encode())
            return addr, port
        raw = yield Get(keys.master)
        record = MasterRecord.decode(keys.master, raw)
        return record.addr, record.port

    def doorbells(self, member: Completed) -> tuple[list[str], str, str]:
        """While ``member`` runs: the keys whose appearance means that nodes wait for the next
        round, and the two counters (joined, gone) of the next round that say how many."""
        keys = member.keys
        following = self.keys.of(keys.number + 1)
        bells = [following.joined]
        if member.world_size >= self.settings.max_nodes:
            bells.append(keys.nvacated)
        return bells, following.joined, following.ngone

    # ------------------------------------------------------------------ leaving and closing
    def leave_all(self) -> Program[None]:
        """Leave the completed round and the open one (shutdown)."""
        yield Track(None)
        member = self.membership
        if member is not None:
            self.membership = None
            yield from self._leave_member_round(member, evaluate=-1)
        pending = self.pending
        if pending is not None:
            self.pending = None
            if (yield from self.liveness.retire_program(pending.keys.alive(pending.slot))):
                yield Add(pending.keys.ngone, 1)

    def close(self) -> Program[None]:
        """Close the rendezvous (``set_closed``): RendezvousTimeoutError past the close
        timeout."""
        deadline = (yield NOW) + self.settings.timeout.close.total_seconds()
        yield Set(self.keys.closed, b"1")
        number = yield Add(self.keys.round, 0)
        while True:
            keys = self.keys.of(number)
            current = yield CompareSet(keys.size, b"", CLOSED_SIZE)
            if current == CLOSED_SIZE:
                yield from self._publish_closed(keys)
                return
            SizeRecord.decode(keys.size, current, self.settings.max_nodes)
            number += 1
            if (yield NOW) > deadline:
                raise RendezvousTimeoutError(
                    f"Closing the rendezvous '{self.settings.run_id}' did not finish within "
                    f"the close timeout of {self.settings.timeout.close.total_seconds():g}s "
                    f"(stopped at round {number})."
                )

    def _publish_closed(self, keys: RoundKeys) -> Program[None]:
        joined = slot_count((yield Add(keys.joined, SEAL)))
        out_keys = [keys.quorum] + [keys.rank(s) for s in range(1, joined + 1)]
        yield MultiSet(out_keys, [b"1"] + [CLOSED_RANK] * joined)


def clean_up_program(keys: RoundKeys) -> Program[None]:
    """Delete the rendezvous keys of round ``keys`` (every node has left it: two rounds
    back); the user keys under its store prefix are the executor's (they need a listing)."""
    if not (yield Check([keys.joined])):
        return
    joined = slot_count(parse_counter_value(keys.joined, (yield Get(keys.joined))))
    for slot in range(1, joined + 1):
        for key in keys.per_slot(slot):
            yield DeleteKey(key)
    for key in keys.round_level():
        yield DeleteKey(key)
