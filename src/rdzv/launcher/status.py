"""Read-only inspection of a dynamic rendezvous, for ``rdzv status``.

Reads the keys documented in ``docs/rendezvous.md`` (layout in
:mod:`rdzv.rendezvous.state`) with ``check``, ``get`` and ``multi_get`` only: it never writes,
so it cannot disturb a running job (``add(key, 0)`` would create missing counters; it is not
used).

* the latest complete round (``round`` hint - 1): its size record, and per member slot the
  node descriptor (address, agent pid), rank record and heartbeat value; plus, when the
  agents are rdzv agents, their worker count and role from the round's store
  (:mod:`rdzv.launcher.assignment`);
* the open round(s) from the hint on: the slots waiting there;
* ``closed``;
* the failure records the agents published in the latest round's store
  (:data:`rdzv.launcher.failures.FAILURE_LOG_KEY`): failed, hung and lost ranks, root cause
  first.

Heartbeat *ages* are measured without comparing clocks: a heartbeat is a counter, so
:class:`HeartbeatClock` remembers, on this process's monotonic clock, when it last saw each
counter change. A one-shot ``rdzv status`` samples the counters for a short while (until each
live one moved, or ``sample`` seconds); ``--watch`` keeps the history between refreshes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rdzv.errors import RendezvousStateError
from rdzv.launcher.assignment import NAMESPACE, NodeInfo, status_url_key
from rdzv.launcher.failures import FAILURE_LOG_KEY, FailureRecord
from rdzv.rendezvous.liveness import DEAD_PREFIX, LEFT
from rdzv.rendezvous.state import (
    NodeDesc,
    RankRecord,
    RoundKeys,
    RunKeys,
    SizeRecord,
    slot_count,
)
from rdzv.store.base import Store

__all__ = [
    "HeartbeatClock",
    "RendezvousStatus",
    "SlotStatus",
    "read_status",
    "render_table",
]

# Upper bound used to validate records whose max_nodes the reader does not know.
_ANY_SIZE = 2**31
# How many rounds past the hint are looked at for waiting nodes.
_MAX_OPEN_ROUNDS = 4
# At most this many slots of one open round are read (a hostile counter cannot make the
# reader loop for ever).
_MAX_SLOTS = 1 << 16


@dataclass
class SlotStatus:
    """One slot of a round: who holds it and how it is doing.

    ``heartbeat``: the counter, or ``"left"`` / ``"dead"``; ``heartbeat_age``: seconds since
    this reader saw the counter change (None: not seen changing yet; see
    ``heartbeat_age_min``, the time it has been watched without a change).
    """

    round: int
    slot: int
    addr: str | None
    pid: int | None
    rank: int | None = None
    state: str = "unknown"
    heartbeat: int | str | None = None
    heartbeat_age: float | None = None
    heartbeat_age_min: float | None = None
    nproc: int | None = None
    role: str | None = None
    web: str | None = None

    @property
    def alive(self) -> bool:
        return isinstance(self.heartbeat, int)


@dataclass
class RendezvousStatus:
    """What :func:`read_status` found. ``round``: the latest complete round (None if none
    completed yet); ``members`` by rank; ``waiting``: slots of later, open rounds."""

    run_id: str
    endpoint: str
    closed: bool
    round: int | None
    world_size: int
    members: list[SlotStatus] = field(default_factory=list)
    excluded: list[int] = field(default_factory=list)
    open_round: int = 0
    waiting: list[SlotStatus] = field(default_factory=list)
    workers: int | None = None
    #: Failure records of the latest round (:meth:`FailureRecord.to_json` objects), oldest
    #: first: failed, hung and lost ranks.
    failures: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class HeartbeatClock:
    """Remembers when each heartbeat counter was last seen changing (monotonic seconds)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int | str | None, float, bool]] = {}

    def observe(self, key: str, value: int | str | None, now: float) -> tuple[float | None, float]:
        """Record ``value`` of ``key``; returns (age since last change or None, watched for)."""
        previous = self._seen.get(key)
        if previous is None:
            self._seen[key] = (value, now, False)
            return None, 0.0
        old, since, changed = previous
        if value != old:
            self._seen[key] = (value, now, True)
            return 0.0, 0.0
        return (now - since if changed else None), now - since


def _exists(store: Store, key: str) -> bool:
    return store.check([key])


def _get(store: Store, key: str) -> bytes | None:
    return store.get(key) if store.check([key]) else None


def _get_many(store: Store, keys: list[str]) -> list[bytes | None]:
    """Values of ``keys``, None for missing ones, without blocking and without writing."""
    if not keys:
        return []
    if store.check(keys):
        return list(store.multi_get(keys))
    return [_get(store, k) for k in keys]


def _counter(raw: bytes | None) -> int:
    if raw is None:
        return 0
    try:
        return int(raw)
    except ValueError:
        raise RendezvousStateError(f"expected a counter, found {raw[:32]!r}") from None


def _heartbeat(raw: bytes | None) -> int | str | None:
    if raw is None:
        return None
    if raw == LEFT:
        return "left"
    if raw.startswith(DEAD_PREFIX):
        return "dead"
    try:
        return int(raw)
    except ValueError:
        return raw[:32].decode("utf-8", "replace")


def _slots(store: Store, keys: RoundKeys, slots: list[int]) -> list[SlotStatus]:
    raw = _get_many(store, [k for s in slots for k in (keys.node(s), keys.alive(s))])
    result = []
    for i, slot in enumerate(slots):
        node_raw, hb_raw = raw[2 * i], raw[2 * i + 1]
        desc = NodeDesc.decode(keys.node(slot), node_raw) if node_raw is not None else None
        result.append(
            SlotStatus(
                round=keys.number,
                slot=slot,
                addr=desc.addr if desc else None,
                pid=desc.pid if desc else None,
                heartbeat=_heartbeat(hb_raw),
            )
        )
    return result


def _agent_infos(
    store: Store, keys: RoundKeys, world_size: int
) -> list[tuple[NodeInfo | None, str | None]]:
    """Worker counts and roles the rdzv agents of the round published, and the URLs of
    their status pages (None where absent)."""
    base = f"{keys.store_prefix}/{NAMESPACE}"
    tickets = _get(store, f"{base}/ticket")
    if tickets is None or world_size < 1:
        return [(None, None)] * world_size
    namespace = f"{base}/{(_counter(tickets) - 1) // world_size}"
    raw = _get_many(store, [f"{namespace}/node/{r}" for r in range(world_size)])
    urls = _get_many(store, [status_url_key(namespace, r) for r in range(world_size)])
    infos: list[tuple[NodeInfo | None, str | None]] = []
    for rank, (value, url) in enumerate(zip(raw, urls, strict=True)):
        web = None if url is None else url.decode("utf-8", "replace")
        try:
            infos.append((NodeInfo.decode(value, rank) if value is not None else None, web))
        except RendezvousStateError:
            infos.append((None, web))
    return infos


def _failures(store: Store, keys: RoundKeys) -> list[dict[str, Any]]:
    raw = _get(store, f"{keys.store_prefix}/{FAILURE_LOG_KEY}")
    if raw is None:
        return []
    out = []
    for line in raw.splitlines():
        try:
            out.append(json.loads(FailureRecord.from_json(line).to_json()))
        except ValueError:
            continue  # a corrupt line: skip it, show the rest
    return out


def read_status(
    store: Store, run_id: str, endpoint: str = "", *, prefix: str | None = None
) -> RendezvousStatus:
    """One read of the rendezvous ``run_id`` kept in ``store`` (keys under
    ``rdzv/<run_id>/`` unless ``prefix``). Only reads.

    Raises RendezvousStateError on a corrupt record and the store's errors (NetworkError,
    StoreTimeoutError) unchanged.
    """
    run = RunKeys(prefix if prefix is not None else f"rdzv/{run_id}/")
    closed = _exists(store, run.closed)
    hint = _counter(_get(store, run.round))
    status = RendezvousStatus(run_id, endpoint, closed, None, 0, open_round=hint)
    if hint > 0:
        keys = run.of(hint - 1)
        size_raw = _get(store, keys.size)
        if size_raw is not None:
            size = SizeRecord.decode(keys.size, size_raw, _ANY_SIZE)
            if not size.closed:
                members = size.members()
                slots = _slots(store, keys, members)
                ranks = _get_many(store, [keys.rank(s) for s in members])
                for slot, raw in zip(slots, ranks, strict=True):
                    if raw is not None:
                        record = RankRecord.decode(keys.rank(slot.slot), raw, _ANY_SIZE)
                        slot.rank = None if record.late or record.closed else record.rank
                    slot.state = "member" if slot.alive else str(slot.heartbeat or "unknown")
                slots.sort(key=lambda s: (s.rank is None, s.rank or 0, s.slot))
                infos = _agent_infos(store, keys, size.world_size)
                for slot in slots:
                    if slot.rank is not None and slot.rank < len(infos):
                        info, slot.web = infos[slot.rank]
                        if info is not None:
                            slot.nproc, slot.role = info.nproc, info.role
                status.failures = _failures(store, keys)
                for failure in status.failures:
                    if failure.get("kind") == "lost":
                        for slot in slots:
                            if slot.rank == failure.get("node_rank") and slot.alive:
                                slot.state = "lost"
                status.round = keys.number
                status.world_size = size.world_size
                status.members = slots
                status.excluded = list(size.excluded)
                if all(s.nproc is not None for s in slots):
                    status.workers = sum(s.nproc or 0 for s in slots)
    for number in range(hint, hint + _MAX_OPEN_ROUNDS):
        keys = run.of(number)
        joined = _get(store, keys.joined)
        if joined is None:
            break
        # A sealed counter (the round closed) still says how many slots were taken.
        count = min(slot_count(_counter(joined)), _MAX_SLOTS)
        waiting = _slots(store, keys, list(range(1, count + 1)))
        for slot in waiting:
            slot.state = "waiting" if slot.alive else str(slot.heartbeat or "joining")
        status.waiting.extend(s for s in waiting if s.state != "left")
    return status


def _heartbeat_keys(status: RendezvousStatus, run: RunKeys) -> dict[str, SlotStatus]:
    return {run.of(s.round).alive(s.slot): s for s in (*status.members, *status.waiting)}


def measure_ages(
    store: Store,
    status: RendezvousStatus,
    clock: HeartbeatClock,
    *,
    sample: float,
    prefix: str | None = None,
    poll: float = 0.1,
) -> None:
    """Fill the heartbeat ages of ``status``: observe the counters now and, for up to
    ``sample`` seconds, until every live one has been seen changing (``clock`` keeps what
    earlier calls saw, for ``--watch``)."""
    run = RunKeys(prefix if prefix is not None else f"rdzv/{status.run_id}/")
    slots = _heartbeat_keys(status, run)
    keys = list(slots)
    deadline = time.monotonic() + sample
    while True:
        now = time.monotonic()
        values = _get_many(store, keys)
        pending = False
        for key, raw in zip(keys, values, strict=True):
            slot = slots[key]
            slot.heartbeat = _heartbeat(raw)
            slot.heartbeat_age, slot.heartbeat_age_min = clock.observe(key, slot.heartbeat, now)
            if slot.alive and slot.heartbeat_age is None:
                pending = True
        if not pending or now >= deadline:
            return
        time.sleep(min(poll, max(0.0, deadline - now)))


def _age(slot: SlotStatus) -> str:
    if not slot.alive:
        return "-"
    if slot.heartbeat_age is not None:
        return f"{slot.heartbeat_age:.1f}s"
    if slot.heartbeat_age_min:
        return f">{slot.heartbeat_age_min:.1f}s"
    return "?"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def render_table(status: RendezvousStatus) -> str:
    """A human-readable table of ``status``."""
    where = f" at {status.endpoint}" if status.endpoint else ""
    head = f"rendezvous {status.run_id!r}{where}"
    if status.closed:
        head += " (closed)"
    lines = [head]
    if status.round is None:
        lines.append("no round has completed yet")
    else:
        workers = f", {status.workers} worker(s)" if status.workers is not None else ""
        lines.append(f"round {status.round}: {status.world_size} node(s){workers}")
        rows = [
            ["RANK", "SLOT", "ADDR", "AGENT PID", "WORKERS", "ROLE", "HEARTBEAT", "AGE", "STATE"]
        ]
        for s in status.members:
            rows.append(
                [
                    "-" if s.rank is None else str(s.rank),
                    str(s.slot),
                    s.addr or "?",
                    "?" if s.pid is None else str(s.pid),
                    "-" if s.nproc is None else str(s.nproc),
                    s.role or "-",
                    "?" if s.heartbeat is None else str(s.heartbeat),
                    _age(s),
                    s.state,
                ]
            )
        lines.extend("  " + line for line in _table(rows))
    if status.failures:
        lines.append(f"failures in round {status.round} (first = root cause):")
        rows = [["RANK", "NODE", "HOST", "PID", "WHAT", "WHEN"]]
        for f in status.failures:
            record = FailureRecord.from_json(json.dumps(f))
            rows.append(
                [
                    "-" if record.rank is None else str(record.rank),
                    str(record.node_rank),
                    record.host,
                    "-" if record.pid is None else str(record.pid),
                    record.how(),
                    time.strftime("%H:%M:%S", time.localtime(record.time)),
                ]
            )
        lines.extend("  " + line for line in _table(rows))
    if status.waiting:
        lines.append(f"waiting for round {status.open_round}: {len(status.waiting)} node(s)")
        rows = [["ROUND", "SLOT", "ADDR", "AGENT PID", "HEARTBEAT", "AGE", "STATE"]]
        for s in status.waiting:
            rows.append(
                [
                    str(s.round),
                    str(s.slot),
                    s.addr or "?",
                    "?" if s.pid is None else str(s.pid),
                    "?" if s.heartbeat is None else str(s.heartbeat),
                    _age(s),
                    s.state,
                ]
            )
        lines.extend("  " + line for line in _table(rows))
    else:
        lines.append(f"no node waiting (open round {status.open_round})")
    return "\n".join(lines)


def render_web(status: RendezvousStatus) -> str:
    """The status page URLs of the round's agents (``rdzv status --web``), one per line."""
    lines = [
        f"node {s.rank} ({s.addr or '?'}): {s.web}" for s in status.members if s.web is not None
    ]
    if not lines:
        return (
            f"no agent of rendezvous {status.run_id!r} serves a status page "
            "(start rdzv run with --metrics-port PORT)"
        )
    return "\n".join(lines)


def render_json(status: RendezvousStatus) -> str:
    return json.dumps(status.to_json(), sort_keys=True)
