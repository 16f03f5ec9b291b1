"""What the status page shows, as JSON: a store server's or an agent's view of the job.

* :class:`StoreStatus` (``rdzv serve``): store statistics from the server's snapshot, and
  every rendezvous run found in the store (:func:`rdzv.launcher.status.read_status`: the
  current round, its nodes with heartbeats, waiting nodes) with the failure records the
  agents published in the round's store (:func:`rdzv.launcher.failures.read_failure_log`).
  It reads the engine directly through :class:`EngineReader` (single dictionary lookups,
  atomic under the GIL): never through the event loop, never writing.
* :class:`AgentStatus` (``rdzv run``): the agent's own snapshot (rounds, local workers,
  earlier failures, restarts), the nodes of the round (host, workers, heartbeat age) and
  the published failure records, read through the round's store.

Values are never shown; keys only as counts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from rdzv.engine import Engine
from rdzv.errors import RdzvError, StoreError, StoreTimeoutError
from rdzv.launcher.assignment import NodeInfo
from rdzv.launcher.failures import FAILURE_LOG_KEY, FailureRecord, read_failure_log
from rdzv.launcher.status import HeartbeatClock, read_status
from rdzv.rendezvous.state import RunKeys
from rdzv.store.base import Store

if TYPE_CHECKING:
    from rdzv.launcher.agent import ElasticAgent
    from rdzv.stats import ServerSnapshot

__all__ = ["AgentStatus", "EngineReader", "StoreStatus"]

_log = logging.getLogger("rdzv.observe.status")

#: Most rendezvous runs a store page lists (the most recently seen first is not knowable;
#: they are sorted by run id).
MAX_RUNS = 20
#: Seconds between scans of the store's keys for rendezvous runs (O(keys)).
RUN_SCAN_INTERVAL = 2.0
#: Most failure records shown per run (the latest).
MAX_FAILURES = 50
#: Rounds of a run whose failure records a store page reads (the latest).
MAX_ROUNDS = 20


class EngineReader(Store):
    """A read-only :class:`~rdzv.store.base.Store` over an :class:`~rdzv.engine.Engine`
    owned by another thread (the server's event loop), with keys as a torch client names
    them (``"/" + prefix + key`` in the engine). Each read is one dictionary lookup, atomic
    under the GIL; writes raise :class:`~rdzv.errors.StoreError`; a missing key is never
    waited for (:class:`~rdzv.errors.StoreTimeoutError` at once)."""

    def __init__(self, engine: Engine, prefix: str = "") -> None:
        super().__init__(0)
        self._engine = engine
        self._prefix = "/" + prefix

    def clone(self) -> Store:
        return EngineReader(self._engine, self._prefix[1:])

    def _key(self, key: str) -> bytes:
        return (self._prefix + key).encode("utf-8")

    def _get(self, key: str, timeout: float) -> bytes:
        value = self._engine.get(self._key(key))
        if value is None:
            raise StoreTimeoutError(f"key {key!r} is not set (read-only view, no waiting)")
        return value

    def _check(self, keys: list[str]) -> bool:
        return self._engine.check([self._key(k) for k in keys])

    def _wait(self, keys: list[str], timeout: float) -> None:
        if not self._check(keys):
            raise StoreTimeoutError(f"keys {keys!r} are not all set (read-only view)")

    def _num_keys(self) -> int:
        return self._engine.num_keys()

    def _set(self, key: str, value: bytes) -> None:
        raise _READ_ONLY

    def _add(self, key: str, amount: int) -> int:
        raise _READ_ONLY

    def _compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        raise _READ_ONLY

    def _delete_key(self, key: str) -> bool:
        raise _READ_ONLY


_READ_ONLY = StoreError("the status page's view of the store is read-only")


def _shown(records: list[FailureRecord]) -> list[dict[str, Any]]:
    """``records`` for the page (latest :data:`MAX_FAILURES`, each once, oldest first)."""
    unique = {(r.namespace, r.kind, r.node_rank, r.rank, r.time): r for r in records}
    ordered = sorted(unique.values(), key=lambda r: r.time)[-MAX_FAILURES:]
    return [asdict(record) | {"how": record.how()} for record in ordered]


class StoreStatus:
    """The status of a store server (``rdzv serve``); call it with a snapshot of the server
    for the JSON document (in the store process: :mod:`rdzv.observe.publisher`)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._reader = EngineReader(engine)
        self._clock = HeartbeatClock()
        self._lock = threading.Lock()
        self._runs: list[str] = []
        self._scanned = -float("inf")

    def _run_ids(self) -> list[str]:
        now = time.monotonic()
        if now - self._scanned >= RUN_SCAN_INTERVAL:
            self._scanned = now
            found = set()
            for key in self._engine.list_keys():  # one atomic copy of the key list
                if key.startswith(b"/rdzv/") and key.endswith(b"/round"):
                    run_id = key[len(b"/rdzv/") : -len(b"/round")]
                    if b"/" not in run_id:
                        found.add(run_id.decode("utf-8", "replace"))
            self._runs = sorted(found)[:MAX_RUNS]
        return self._runs

    def _run(self, run_id: str) -> dict[str, Any]:
        status = read_status(self._reader, run_id)
        now = time.monotonic()
        run = RunKeys(f"rdzv/{run_id}/")
        for slot in (*status.members, *status.waiting):
            value = slot.heartbeat
            key = run.of(slot.round).alive(slot.slot)
            slot.heartbeat_age, slot.heartbeat_age_min = self._clock.observe(key, value, now)
        data = status.to_json()
        records: list[FailureRecord] = []
        if status.round is not None:  # each round's store keeps its own log
            for number in range(max(0, status.round - MAX_ROUNDS + 1), status.round + 1):
                reader = EngineReader(self._engine, run.of(number).store_prefix + "/")
                if reader.check([FAILURE_LOG_KEY]):
                    records += read_failure_log(reader)
        data["failures"] = _shown(records)
        return data

    def keys(self, prefix: str, limit: int) -> dict[str, Any]:
        """The first ``limit`` keys (sorted) starting with ``prefix``, as torch clients name
        them (without the wire's leading "/"), with their value sizes in bytes; values are
        never returned. O(keys) (one copy of the key list)."""
        wanted = ("/" + prefix).encode("utf-8")
        matching = sorted(k for k in self._engine.list_keys() if k.startswith(wanted))
        keys = []
        for key in matching[:limit]:
            value = self._engine.get(key)
            name = key.decode("utf-8", "backslashreplace")
            keys.append({"key": name[1:] if name.startswith("/") else name,
                         "bytes": None if value is None else len(value)})  # fmt: skip
        return {"prefix": prefix, "total": len(matching), "keys": keys}

    def __call__(self, snap: ServerSnapshot) -> dict[str, Any]:
        """The document, with the store statistics of ``snap``."""
        runs = []
        with self._lock:  # one reader at a time keeps the heartbeat clock consistent
            for run_id in self._run_ids():
                try:
                    runs.append(self._run(run_id))
                except RdzvError as exc:
                    runs.append({"run_id": run_id, "error": str(exc)})
        return {
            "kind": "store",
            "time": time.time(),
            "store": {
                "connections": snap.open,
                "accepted": sum(snap.open.values()) + sum(snap.closed.values()),
                "requests": sum(snap.requests.values()),
                "requests_by_op": snap.requests,
                "waiters": snap.waiters,
                "keys": snap.keys,
                "value_bytes": snap.value_bytes,
                "auth_failures": sum(snap.auth_failures.values()),
                "limit_hits": sum(snap.limit_hits.values()),
                "journal_commits": snap.commits,
                "read_only": snap.read_only,
            },
            "runs": runs,
        }


class AgentStatus:
    """The status of an elastic agent (``rdzv run``); call it for the JSON document.

    ``round_store`` reads (node records, heartbeats, failure records) go through the agent's
    store client from the listener's thread (the client gives each thread its own
    connection); their errors are reported in the document, never raised.
    """

    def __init__(self, agent: ElasticAgent) -> None:
        self._agent = agent
        self._clock = HeartbeatClock()
        self._lock = threading.Lock()

    def _nodes(self, store: Store, namespace: str, count: int) -> list[dict[str, Any]]:
        keys = [f"{namespace}/node/{i}" for i in range(count)]
        beats = [f"{namespace}/hb/{i}" for i in range(count)]
        now = time.monotonic()
        nodes = []
        for rank, (key, beat) in enumerate(zip(keys, beats, strict=True)):
            info = NodeInfo.decode(store.get(key), rank) if store.check([key]) else None
            counter = int(store.get(beat)) if store.check([beat]) else None
            age, watched = self._clock.observe(beat, counter, now)
            nodes.append(
                {
                    "group_rank": rank,
                    "host": None if info is None else info.host,
                    "nproc": None if info is None else info.nproc,
                    "role": None if info is None else info.role,
                    "heartbeat": counter,
                    "heartbeat_age": age,
                    "heartbeat_watched": round(watched, 3),
                }
            )
        return nodes

    def __call__(self) -> dict[str, Any]:
        agent = self._agent
        data = agent.snapshot()
        store = agent.round_store
        namespace = data.get("namespace")
        count = data.get("group_world_size")
        nodes: list[dict[str, Any]] = []
        # The root causes the agent saw, and the log of the current round's store.
        records = [FailureRecord.from_json(raw) for raw in data["causes"]]
        error = None
        if store is not None and isinstance(namespace, str) and isinstance(count, int):
            with self._lock:
                try:
                    nodes = self._nodes(store, namespace, count)
                    records += read_failure_log(store)
                except (RdzvError, OSError, ValueError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
        return {
            "kind": "agent",
            "time": time.time(),
            "agent": data,
            "nodes": nodes,
            "failures": _shown(records),
            "error": error,
        }


StatusSource = Callable[[], dict[str, Any]]
