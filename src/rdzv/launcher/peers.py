"""Agent-to-agent signals in the round's store: heartbeats, restart requests, exit barrier.

A rendezvous tells an agent when *new* nodes wait (``num_nodes_waiting()``) but not when a
participant of the current round dies. The agents therefore watch each other, without
comparing clocks and with O(1) store operations per agent and beat:

* ``{ns}/hb/{group_rank}``: each agent ``add(1)``\\ s its counter every beat;
* each agent watches one peer, its successor ``(group_rank + 1) % nodes`` (a ring, so every
  node is watched by exactly one other): if that counter does not move for ``node_timeout``
  seconds of the watcher's own monotonic clock, the peer is lost;
* ``{ns}/restart``: set by an agent that leaves the group (worker failure, lost peer); every
  agent checks it each beat and re-rendezvous at once rather than waiting for its workers to
  notice the missing peer.
* ``{ns}/exit/count`` and ``{ns}/exit/done``: the exit barrier of agents whose workers all
  succeeded (heartbeats continue while waiting, so nobody mistakes a finished node for a lost
  one).

``ns`` is the generation namespace of :mod:`rdzv.launcher.assignment`.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time

from rdzv.errors import RdzvError, StoreTimeoutError
from rdzv.store.base import Store

__all__ = ["PeerEvent", "PeerMonitor"]

_log = logging.getLogger("rdzv.launcher.peers")


class PeerEvent(enum.Enum):
    """What a beat found."""

    NONE = "none"
    PEER_LOST = "peer_lost"
    RESTART_REQUESTED = "restart_requested"
    #: The round's store failed every beat for ``node_timeout``: its host is gone.
    STORE_LOST = "store_lost"


class PeerMonitor:
    """Heartbeats of one agent in a group of ``group_world_size`` agents.

    Args:
        store: the round's store.
        namespace: the generation's key prefix.
        group_rank, group_world_size: this node and the number of nodes.
        node_timeout: seconds without progress of the watched peer before it is lost
            (0 disables watching; beats and restart requests still work).
        interval: seconds between beats.
    """

    def __init__(
        self,
        store: Store,
        namespace: str,
        group_rank: int,
        group_world_size: int,
        node_timeout: float,
        interval: float,
    ) -> None:
        # Beats use a connection of their own whose calls (and reconnect attempts) give up
        # after a beat interval, so that a dead store host is noticed in node_timeout and
        # not after the store's own (long) timeout.
        self._store = _bounded_clone(store, max(interval, 1.0))
        self._ns = namespace
        self._rank = group_rank
        self._nodes = group_world_size
        self._timeout = node_timeout
        self._interval = interval
        self._peer = (group_rank + 1) % group_world_size
        self._seen = -1
        now = time.monotonic()
        self._seen_at = now
        self._next_beat = now
        self._store_failing_since: float | None = None
        self.last_error: BaseException | None = None
        #: After a timed-out :meth:`exit_barrier`: (node, seconds since its last heartbeat
        #: or None) of every node that never arrived.
        self.missing: list[tuple[int, float | None]] = []
        #: Beats sent (for metrics).
        self.beats = 0

    @property
    def active(self) -> bool:
        return self._nodes > 1

    @property
    def watched_peer(self) -> int:
        return self._peer

    def snapshot(self) -> dict[str, object]:
        """This monitor's view (JSON-able; readable from another thread): the watched
        ``peer``, ``beats`` sent, ``peer_silence`` (seconds since the peer's counter last
        moved, on this process's clock) and ``node_timeout``."""
        return {
            "peer": self._peer,
            "beats": self.beats,
            "peer_silence": round(time.monotonic() - self._seen_at, 3),
            "node_timeout": self._timeout,
        }

    def due(self, now: float) -> float:
        """Seconds until the next beat is due (<= 0: now)."""
        return self._next_beat - now if self.active else float("inf")

    def beat(self) -> PeerEvent:
        """Beat if due: bump our counter, read the watched peer's, check the restart flag.

        Store errors are logged once; once they last ``node_timeout`` the result is
        ``STORE_LOST`` (the store's host is gone, so the round is over). ``last_error`` then
        says what failed.
        """
        now = time.monotonic()
        if not self.active or now < self._next_beat:
            return PeerEvent.NONE
        self._next_beat = now + self._interval
        try:
            self._store.add(f"{self._ns}/hb/{self._rank}", 1)
            self.beats += 1
            seen = self._store.add(f"{self._ns}/hb/{self._peer}", 0)
            restart = self._store.check([f"{self._ns}/restart"])
        except RdzvError as exc:
            self.last_error = exc
            if self._store_failing_since is None:
                self._store_failing_since = now
                _log.warning("heartbeat through the round's store failed: %s", exc)
            if self._timeout > 0 and now - self._store_failing_since >= self._timeout:
                return PeerEvent.STORE_LOST
            return PeerEvent.NONE
        self._store_failing_since = None
        if restart:
            return PeerEvent.RESTART_REQUESTED
        if seen != self._seen:
            self._seen, self._seen_at = seen, now
        elif self._timeout > 0 and now - self._seen_at >= self._timeout:
            _log.warning(
                "node %d sent no heartbeat for %.1f s: considering it lost",
                self._peer,
                now - self._seen_at,
            )
            return PeerEvent.PEER_LOST
        return PeerEvent.NONE

    def close(self) -> None:
        """Close the beats' own connection."""
        close = getattr(self._store, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()

    def _sample_missing(self, arrived: set[int], beats: dict[int, tuple[int, float]]) -> None:
        """Note which nodes arrived at the exit barrier, and when the others' heartbeat
        counters last moved (one check and one read per node not yet arrived)."""
        now = time.monotonic()
        for node in range(self._nodes):
            if node in arrived:
                continue
            if self._store.check([f"{self._ns}/exit/node/{node}"]):
                arrived.add(node)
                continue
            count = self._store.add(f"{self._ns}/hb/{node}", 0)
            seen = beats.get(node)
            if seen is None or seen[0] != count:
                beats[node] = (count, now if seen is not None else float("nan"))

    def _still_missing(
        self, arrived: set[int], beats: dict[int, tuple[int, float]]
    ) -> list[tuple[int, float | None]]:
        self._sample_missing(arrived, beats)
        now = time.monotonic()
        out: list[tuple[int, float | None]] = []
        for node in range(self._nodes):
            if node not in arrived:
                moved = beats.get(node, (0, float("nan")))[1]
                out.append((node, None if moved != moved else now - moved))
        return out

    def request_restart(self) -> None:
        """Ask every agent of this generation to re-rendezvous (best effort)."""
        if not self.active:
            return
        try:
            self._store.set(f"{self._ns}/restart", str(self._rank))
        except RdzvError as exc:
            _log.warning("could not ask the other nodes to restart: %s", exc)

    def exit_barrier(self, timeout: float) -> bool:
        """Wait until every agent of the generation arrived here (beating meanwhile).

        Returns True when all arrived; False if ``timeout`` seconds passed, the watched peer
        was lost or a restart was requested (a peer will not come), or the store failed.
        After a timeout, :attr:`missing` lists the nodes that never arrived with the seconds
        since their heartbeat counter last moved (as seen here while waiting; None if it
        never moved meanwhile).
        """
        self.missing = []
        if not self.active:
            return True
        deadline = time.monotonic() + timeout
        done_key = f"{self._ns}/exit/done"
        arrived = {self._rank}
        beats: dict[int, tuple[int, float]] = {}
        try:
            self._store.set(f"{self._ns}/exit/node/{self._rank}", "1")
            if self._store.add(f"{self._ns}/exit/count", 1) >= self._nodes:
                self._store.set(done_key, "1")
                return True
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.missing = self._still_missing(arrived, beats)
                    return False
                try:
                    self._store.wait([done_key], min(remaining, self._interval))
                    return True
                except StoreTimeoutError:
                    pass
                self._sample_missing(arrived, beats)
                event = self.beat()
                if event is not PeerEvent.NONE:
                    _log.warning("exit barrier abandoned: %s", event.value)
                    return False
        except RdzvError as exc:
            _log.warning("exit barrier failed: %s", exc)
            return False


def _bounded_clone(store: Store, timeout: float) -> Store:
    """A new connection to ``store`` with ``timeout`` (seconds) for every call, or ``store``
    itself when it cannot be cloned."""
    try:
        twin = store.clone()
    except (RdzvError, OSError, NotImplementedError):
        return store
    # A PrefixStore's timeout is its view's only; the connection under it (ours alone, a
    # fresh clone) must give up its reconnect attempts in time too.
    layer: object = twin
    while isinstance(layer, Store):
        layer.set_timeout(timeout)
        layer = getattr(layer, "underlying_store", None)
    return twin
