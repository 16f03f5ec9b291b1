"""The shared state of the dynamic rendezvous: key layout and the JSON records in the store.

Every value the dynamic rendezvous reads from a store is untrusted: anyone who can reach the
store can write anything. Records are therefore small JSON documents (never pickle) that are
parsed with hard limits and validated field by field; anything unexpected raises
:class:`~rdzv.errors.RendezvousStateError` naming the key, and nothing read from the store is
ever executed or used to build objects beyond plain str/int/bool values.

Records (see ``docs/rendezvous.md`` for who writes what and when):

* :class:`NodeDesc` under ``r<p>/node/<slot>``: who holds a slot;
* :class:`SizeRecord` under ``r<p>/size``: the frozen membership of a round (or "closed");
* :class:`RankRecord` under ``r<p>/rank/<slot>``: one slot's outcome (rank, late, closed);
* :class:`MasterRecord` under ``r<p>/master``: the bootstrap address published by rank 0.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rdzv.errors import RendezvousStateError

__all__ = [
    "MAX_RECORD_BYTES",
    "SEAL",
    "MasterRecord",
    "NodeDesc",
    "RankRecord",
    "RoundKeys",
    "RunKeys",
    "SizeRecord",
    "assign_ranks",
    "choose_members",
    "parse_counter_value",
    "slot_count",
]

#: Largest record accepted from the store (bytes). A size record lists the excluded slots of
#: a round; 1 MiB leaves room for ~100 000 of them while refusing absurd allocations.
MAX_RECORD_BYTES = 1 << 20
#: Largest host name / address accepted in a record (RFC 1035 limits a name to 253 octets).
_MAX_ADDR = 255
#: Largest slot or round number accepted (int64, as the store's counters).
_MAX_INT = 2**63 - 1
#: Added to a round's slot counter when the round is frozen: a joiner whose slot exceeds it
#: knows from the ``add`` alone that it came too late; the count is ``value % SEAL``.
SEAL = 1 << 40
_ADDR_RE = re.compile(r"^[A-Za-z0-9_.:%\[\]-]{1,255}$")
_NONCE_RE = re.compile(r"^[A-Za-z0-9]{1,64}$")


# ---------------------------------------------------------------------------- key layout
class RunKeys:
    """Keys of one rendezvous run, under ``prefix`` (default ``rdzv/<run_id>/``)."""

    __slots__ = ("closed", "prefix", "round")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        #: ASCII counter: a hint of the lowest round that may still be open.
        self.round = prefix + "round"
        #: Set to ``"1"`` by set_closed.
        self.closed = prefix + "closed"

    def of(self, round_: int) -> RoundKeys:
        return RoundKeys(self.prefix, round_)


def slot_count(value: int) -> int:
    """The number of slots taken, from a (possibly sealed) slot counter value."""
    return value % SEAL


class RoundKeys:
    """Keys of round ``number`` (``<prefix>r<number>/...``)."""

    __slots__ = (
        "base",
        "gate",
        "joined",
        "master",
        "ngone",
        "number",
        "nvacated",
        "quorum",
        "size",
        "store_prefix",
    )

    def __init__(self, prefix: str, number: int) -> None:
        self.number = number
        self.base = f"{prefix}r{number}/"
        #: Counter; ``add(joined, 1)`` hands out the slots 1, 2, ...
        self.joined = self.base + "joined"
        #: Counter of slots that left or died while the round was open (an estimate).
        self.ngone = self.base + "ngone"
        #: Doorbell: the previous round has dissolved, this one may complete.
        self.gate = self.base + "gate"
        #: Doorbell: the last-call window has started (also set when the round completes).
        self.quorum = self.base + "quorum"
        #: compare_set by the closer: the frozen membership (:class:`SizeRecord`).
        self.size = self.base + "size"
        #: Counter of members that left (or were found dead) after completion; its
        #: existence is the "vacancy" doorbell.
        self.nvacated = self.base + "nvacated"
        #: The bootstrap address published by rank 0 when not carried by the rank records.
        self.master = self.base + "master"
        #: Namespace of the store handed to the members (``RendezvousInfo.store``).
        self.store_prefix = self.base + "store"

    def node(self, slot: int) -> str:
        return f"{self.base}node/{slot}"

    def alive(self, slot: int) -> str:
        return f"{self.base}hb/{slot}"

    def rank(self, slot: int) -> str:
        return f"{self.base}rank/{slot}"

    def per_slot(self, slot: int) -> tuple[str, str, str]:
        return self.node(slot), self.alive(slot), self.rank(slot)

    def round_level(self) -> list[str]:
        return [
            self.joined,
            self.ngone,
            self.gate,
            self.quorum,
            self.size,
            self.nvacated,
            self.master,
        ]


# ---------------------------------------------------------------------------- parsing helpers
def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _load(key: str, raw: bytes, what: str) -> Any:
    if len(raw) > MAX_RECORD_BYTES:
        raise RendezvousStateError(
            f"the {what} under key {key!r} is {len(raw)} bytes, more than the "
            f"{MAX_RECORD_BYTES} allowed: the rendezvous state is corrupt or hostile"
        )
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RendezvousStateError(
            f"the {what} under key {key!r} is not valid JSON ({exc}); value starts with "
            f"{raw[:48]!r}: the rendezvous state is corrupt or hostile"
        ) from None


def _bad(key: str, what: str, why: str) -> RendezvousStateError:
    return RendezvousStateError(
        f"the {what} under key {key!r} is invalid: {why}; the rendezvous state is corrupt "
        "or hostile"
    )


def _obj(key: str, doc: Any, what: str, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise _bad(key, what, f"expected a JSON object, got {type(doc).__name__}")
    missing = required - doc.keys()
    if missing:
        raise _bad(key, what, f"missing field(s) {sorted(missing)}")
    extra = doc.keys() - required - optional
    if extra:
        raise _bad(key, what, f"unknown field(s) {sorted(extra)[:5]}")
    return doc


def _flag(key: str, doc: Any, what: str, name: str) -> bool:
    """Whether ``doc`` is the marker record ``{name: true}`` (and nothing else)."""
    if isinstance(doc, dict) and doc.get(name) is True:
        _obj(key, doc, what, {name}, set())
        return True
    return False


def _int(key: str, what: str, field: str, value: Any, lo: int, hi: int = _MAX_INT) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _bad(key, what, f"field {field!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _addr(key: str, what: str, field: str, value: Any) -> str:
    if not isinstance(value, str) or not _ADDR_RE.match(value):
        raise _bad(key, what, f"field {field!r} must be a host name or address, got {value!r:.80}")
    return value


def _endpoint(key: str, what: str, field: str, value: Any) -> tuple[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise _bad(key, what, f"field {field!r} must be [host, port] or null")
    return _addr(key, what, field, value[0]), _int(key, what, field, value[1], 0, 65535)


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def parse_counter_value(key: str, raw: bytes) -> int:
    """A counter written by ``add`` (ASCII decimal, int64, >= 0)."""
    text = raw.strip()
    if not text or len(text) > 20 or not text.isdigit():
        raise RendezvousStateError(
            f"the counter under key {key!r} is {raw[:48]!r}, not a non-negative integer: the "
            "rendezvous state is corrupt or hostile"
        )
    return int(text)


# ---------------------------------------------------------------------------- records
@dataclass(frozen=True, order=True)
class NodeDesc:
    """Who holds a slot: the node's address, pid and per-process handler id (torch's
    ``_NodeDesc``), a random nonce that makes it unique across hosts, the round and rank it
    last held (for stable ranks) and the bootstrap endpoint it offers if it becomes rank 0."""

    addr: str
    pid: int
    local_id: int
    nonce: str
    prev_round: int | None = None
    prev_rank: int | None = None
    master: tuple[str, int] | None = None

    def __repr__(self) -> str:
        return f"{self.addr}_{self.pid}_{self.local_id}"

    @property
    def uid(self) -> str:
        """A token unique to this handler (used to recognise its own writes)."""
        return f"{self.addr}_{self.pid}_{self.local_id}_{self.nonce}"

    def encode(self) -> bytes:
        return _dump(
            {
                "addr": self.addr,
                "pid": self.pid,
                "local_id": self.local_id,
                "nonce": self.nonce,
                "prev": None
                if self.prev_round is None
                else [self.prev_round, self.prev_rank if self.prev_rank is not None else 0],
                "master": None if self.master is None else list(self.master),
            }
        )

    @staticmethod
    def decode(key: str, raw: bytes) -> NodeDesc:
        what = "node descriptor"
        doc = _obj(
            key,
            _load(key, raw, what),
            what,
            {"addr", "pid", "local_id", "nonce"},
            {"prev", "master"},
        )
        nonce = doc["nonce"]
        if not isinstance(nonce, str) or not _NONCE_RE.match(nonce):
            raise _bad(key, what, "field 'nonce' must be 1-64 ASCII letters or digits")
        prev = doc.get("prev")
        prev_round: int | None = None
        prev_rank: int | None = None
        if prev is not None:
            if not isinstance(prev, list) or len(prev) != 2:
                raise _bad(key, what, "field 'prev' must be [round, rank] or null")
            prev_round = _int(key, what, "prev", prev[0], 0)
            prev_rank = _int(key, what, "prev", prev[1], 0)
        return NodeDesc(
            addr=_addr(key, what, "addr", doc["addr"]),
            pid=_int(key, what, "pid", doc["pid"], 0),
            local_id=_int(key, what, "local_id", doc["local_id"], 0),
            nonce=nonce,
            prev_round=prev_round,
            prev_rank=prev_rank,
            master=_endpoint(key, what, "master", doc.get("master")),
        )


@dataclass(frozen=True)
class SizeRecord:
    """The frozen membership of a round, written once by compare_set.

    ``joined`` slots (1..joined) were considered; ``excluded`` of them were gone (left or
    dead) at the snapshot, ``late`` ones were live but beyond ``max_nodes``; the other
    ``world_size`` slots are the members. Slots above ``joined`` are late too. ``closed``:
    the rendezvous was closed instead. ``closer`` identifies the writer (so that it
    recognises its own compare_set).
    """

    joined: int = 0
    world_size: int = 0
    excluded: tuple[int, ...] = ()
    late: tuple[int, ...] = ()
    closer: str = ""
    closed: bool = False

    def encode(self) -> bytes:
        if self.closed:
            return CLOSED_SIZE
        return _dump(
            {
                "joined": self.joined,
                "world_size": self.world_size,
                "excluded": list(self.excluded),
                "late": list(self.late),
                "closer": self.closer,
            }
        )

    def members(self) -> list[int]:
        """Member slots in slot order."""
        out = set(self.excluded) | set(self.late)
        return [s for s in range(1, self.joined + 1) if s not in out]

    @staticmethod
    def decode(key: str, raw: bytes, max_nodes: int) -> SizeRecord:
        what = "round size record"
        doc = _load(key, raw, what)
        if _flag(key, doc, what, "closed"):
            return SizeRecord(closed=True)
        doc = _obj(key, doc, what, {"joined", "world_size", "excluded", "late", "closer"}, set())
        joined = _int(key, what, "joined", doc["joined"], 1)
        lists = []
        for field in ("excluded", "late"):
            raw_list = doc[field]
            if not isinstance(raw_list, list) or len(raw_list) > joined:
                raise _bad(key, what, f"field {field!r} must be a list of at most 'joined' slots")
            lists.append(tuple(_int(key, what, field, s, 1, joined) for s in raw_list))
        excluded, late = lists
        if len(set(excluded) | set(late)) != len(excluded) + len(late):
            raise _bad(key, what, "a slot is listed twice in 'excluded' and 'late'")
        world_size = _int(key, what, "world_size", doc["world_size"], 1, max_nodes)
        if world_size != joined - len(excluded) - len(late):
            raise _bad(key, what, f"world_size {world_size} does not match the listed slots")
        closer = doc["closer"]
        if not isinstance(closer, str) or len(closer) > 512:
            raise _bad(key, what, "field 'closer' must be a short string")
        return SizeRecord(joined, world_size, excluded, late, closer)


CLOSED_SIZE = _dump({"closed": True})


@dataclass(frozen=True)
class RankRecord:
    """One slot's outcome: a rank in a world (with the bootstrap endpoint when known), or
    ``late`` (not admitted: try the next round), or ``closed``."""

    rank: int = -1
    world_size: int = 0
    master: tuple[str, int] | None = None
    late: bool = False
    closed: bool = False

    def encode(self) -> bytes:
        if self.closed:
            return CLOSED_RANK
        if self.late:
            return LATE_RANK
        return _dump(
            {
                "rank": self.rank,
                "world_size": self.world_size,
                "master": None if self.master is None else list(self.master),
            }
        )

    @staticmethod
    def decode(key: str, raw: bytes, max_nodes: int) -> RankRecord:
        what = "rank record"
        doc = _load(key, raw, what)
        if _flag(key, doc, what, "late"):
            return RankRecord(late=True)
        if _flag(key, doc, what, "closed"):
            return RankRecord(closed=True)
        doc = _obj(key, doc, what, {"rank", "world_size", "master"}, set())
        world_size = _int(key, what, "world_size", doc["world_size"], 1, max_nodes)
        rank = _int(key, what, "rank", doc["rank"], 0, world_size - 1)
        return RankRecord(rank, world_size, _endpoint(key, what, "master", doc["master"]))


CLOSED_RANK = _dump({"closed": True})
LATE_RANK = _dump({"late": True})


@dataclass(frozen=True)
class MasterRecord:
    """The bootstrap endpoint (``MASTER_ADDR``/``MASTER_PORT``) published by rank 0."""

    addr: str
    port: int

    def encode(self) -> bytes:
        return _dump({"addr": self.addr, "port": self.port})

    @staticmethod
    def decode(key: str, raw: bytes) -> MasterRecord:
        what = "bootstrap endpoint record"
        doc = _obj(key, _load(key, raw, what), what, {"addr", "port"}, set())
        return MasterRecord(
            _addr(key, what, "addr", doc["addr"]), _int(key, what, "port", doc["port"], 0, 65535)
        )


# ---------------------------------------------------------------------------- ranks
def choose_members(round_: int, live: Sequence[tuple[int, NodeDesc]], max_nodes: int) -> list[int]:
    """The slots admitted to round ``round_`` when more than ``max_nodes`` are live: the
    members of the previous round first (a running job keeps its nodes over spares that
    arrived earlier), then by slot (arrival order)."""
    ordered = sorted(live, key=lambda item: (item[1].prev_round != round_ - 1, item[0]))
    return sorted(slot for slot, _ in ordered[:max_nodes])


def assign_ranks(
    round_: int, members: Sequence[tuple[int, NodeDesc]]
) -> list[tuple[int, NodeDesc]]:
    """Order the members of round ``round_`` by rank (index 0 is rank 0).

    The rule (deterministic, computed identically by every writer):

    1. nodes that were members of the previous round (``prev_round == round_ - 1``) come
       first, in the order of their previous rank: survivors keep their relative order, so
       rank 0 stays rank 0 as long as it lives;
    2. then every other node, ordered by ``(addr, pid, local_id, nonce)``: torch's order
       (sorted node descriptors), which also groups the nodes of one host together.
    """

    def sort_key(item: tuple[int, NodeDesc]) -> tuple[int, int, str, int, int, str]:
        desc = item[1]
        if desc.prev_round == round_ - 1 and desc.prev_rank is not None:
            return (0, desc.prev_rank, desc.addr, desc.pid, desc.local_id, desc.nonce)
        return (1, 0, desc.addr, desc.pid, desc.local_id, desc.nonce)

    return sorted(members, key=sort_key)
