"""The store process's side of ``rdzv serve --metrics-port``: start the listener process
(:mod:`rdzv.observe.listener`) and publish the server's state to it.

Scrapes never run in the store process: every :data:`PUBLISH_PERIOD` seconds a thread of
the store process takes one snapshot (:meth:`rdzv.server.StoreServer.snapshot`, value sizes
at most every second) and the status document (:class:`rdzv.observe.status.StoreStatus`)
and sends them down a socketpair to the listener, which answers every HTTP request from the
latest of them. The store's cost is one snapshot per period, whatever the scrape rate; the
status document (O(runs) engine reads) only while someone reads it (the listener says so,
:data:`~rdzv.observe.channel.WATCH_TIMEOUT`). The
only request that reaches the store process is a key listing (``/api/keys``), which the
listener asks for through the same channel at most every :data:`KEYS_INTERVAL` seconds.

The listener exits when the channel closes: when the store process exits (even killed) or
closes the listener (:meth:`StoreListener.close`).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rdzv.observe.channel import WATCH_TIMEOUT, Channel, ChannelClosed
from rdzv.observe.http import KEYS_INTERVAL, MAX_KEYS, listener_url
from rdzv.observe.metrics import SnapshotCache
from rdzv.observe.status import StoreStatus

if TYPE_CHECKING:
    from rdzv.server import StoreServer

__all__ = ["PUBLISH_PERIOD", "START_TIMEOUT", "StoreListener"]

_log = logging.getLogger("rdzv.observe.publisher")

#: Seconds between two snapshots sent to the listener: what a scrape's figures may lag.
PUBLISH_PERIOD = 0.1
#: Seconds the listener process may take to start and bind its address.
START_TIMEOUT = 30.0


class StoreListener:
    """The metrics and status listener of a store server, in a process of its own.

    Args:
        server: the store server (created with ``metrics=True`` for request counts).
        host, port: the listener's address (port 0: a free one, read :attr:`port`).
        tokens: accepted bearer tokens; empty: no authentication.
        period: seconds between published snapshots.

    :meth:`start` raises OSError when the listener cannot bind ``host:port`` or does not
    start within :data:`START_TIMEOUT` seconds.
    """

    def __init__(
        self,
        server: StoreServer,
        host: str,
        port: int,
        tokens: Sequence[bytes] = (),
        period: float = PUBLISH_PERIOD,
    ) -> None:
        self.host = host
        self.port = port
        self._tokens = [bytes(t) for t in tokens]
        self._period = period
        self._cache = SnapshotCache(server)
        self._status = StoreStatus(server.engine)
        self._channel: Channel | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._keys_at = -float("inf")
        self._watched_until = time.monotonic() + WATCH_TIMEOUT  # the first state has it
        self._publish_now = False

    @property
    def url(self) -> str:
        """``http://host:port/`` of the status page."""
        return listener_url(self.host, self.port)

    def _state(self) -> list[Any]:
        snap = self._cache.get()
        watched = time.monotonic() < self._watched_until
        return ["state", snap.to_json(), self._status(snap) if watched else None]

    def start(self) -> StoreListener:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)  # the child imports this very rdzv
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "rdzv.observe.listener", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
            )
        finally:
            theirs.close()
        channel = self._channel = Channel(ours)
        try:
            channel.send(["config", self.host, self.port, [t.hex() for t in self._tokens]])
            channel.send(self._state())
            ours.settimeout(START_TIMEOUT)
            reply = channel.receive()
            ours.settimeout(None)
        except (ChannelClosed, ValueError) as exc:
            self.close()
            raise OSError(f"the metrics listener did not start: {exc}") from exc
        if "error" in reply:
            self.close()
            raise OSError(str(reply["error"]))
        self.port = int(reply["port"])
        self._thread = threading.Thread(
            target=self._run, name="rdzv-metrics-publisher", daemon=True
        )
        self._thread.start()
        return self

    def _run(self) -> None:
        channel = self._channel
        assert channel is not None
        next_at = time.monotonic() + self._period
        try:
            while not self._stopping.is_set():
                wait = next_at - time.monotonic()
                if wait > 0:
                    readable, _, _ = select.select([channel.sock], [], [], wait)
                    if readable:
                        self._answer(channel, channel.receive())
                    if not self._publish_now:
                        continue
                self._publish_now = False
                next_at = max(next_at + self._period, time.monotonic())
                try:
                    state = self._state()
                except Exception:  # a bug here must cost the page its freshness, not the store
                    _log.exception("metrics listener: taking a snapshot failed")
                    continue
                channel.send(state)
        except (ChannelClosed, ValueError, OSError) as exc:
            if not self._stopping.is_set():
                code = None if self._proc is None else self._proc.poll()
                _log.error("metrics listener process is gone (exit code %s): %s", code, exc)

    def _answer(self, channel: Channel, request: Any) -> None:
        """A request of the listener: ``{"watch": 1}`` (the status page is watched: include
        the status document in the states of the next
        :data:`~rdzv.observe.channel.WATCH_TIMEOUT` seconds,
        starting now), or a key listing (``{"keys": id, "prefix": P, "limit": N}``; None
        when asked more often than every :data:`KEYS_INTERVAL` seconds)."""
        if isinstance(request, dict) and request.get("watch") == 1:
            if time.monotonic() >= self._watched_until:
                self._publish_now = True
            self._watched_until = time.monotonic() + WATCH_TIMEOUT
            return
        if not isinstance(request, dict) or not isinstance(request.get("keys"), int):
            _log.warning("metrics listener: unexpected request %.100r", request)
            return
        prefix, limit = request.get("prefix"), request.get("limit")
        result = None
        now = time.monotonic()
        if isinstance(prefix, str) and isinstance(limit, int) and 1 <= limit <= MAX_KEYS and (
            now - self._keys_at >= KEYS_INTERVAL * 0.9  # the listener paces itself too
        ):  # fmt: skip
            self._keys_at = now
            result = self._status.keys(prefix, limit)
        channel.send(["keys", request["keys"], result])

    def close(self) -> None:
        """Stop publishing and stop the listener process (idempotent)."""
        self._stopping.set()
        if self._channel is not None:
            self._channel.close()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
