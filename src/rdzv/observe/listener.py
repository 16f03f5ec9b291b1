"""The metrics listener process of ``rdzv serve --metrics-port`` (started by
:class:`rdzv.observe.publisher.StoreListener`; ``python -m rdzv.observe.listener FD``).

It serves :mod:`rdzv.observe.http` from the latest state the store process published on the
channel (file descriptor ``FD``), so a scrape costs the store nothing; it asks the store
process for key listings (``/api/keys``) at most every :data:`~rdzv.observe.http.KEYS_INTERVAL`
seconds, answering a request beyond that from the previous answer to the same query, or 503.
Bodies are rendered once per published state, whatever the scrape rate; the process runs
at a lower priority (:data:`NICENESS`) and, on Linux, under ``SCHED_BATCH`` (its wake-ups
never preempt the store or its clients). It exits when the channel closes (the store process
exited or closed it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from rdzv.observe.channel import WATCH_TIMEOUT, Channel, ChannelClosed
from rdzv.observe.http import KEYS_INTERVAL, ObserveServer, Unavailable
from rdzv.observe.metrics import ServerCollector, registry_for
from rdzv.stats import ServerSnapshot

__all__ = ["FRESH_TIMEOUT", "KEYS_TIMEOUT", "NICENESS", "WATCH_RENEW", "RemoteStore", "main"]

_log = logging.getLogger("rdzv.observe.listener")

#: Seconds a key listing may take in the store process before the request gets 503.
KEYS_TIMEOUT = 5.0
#: Added to the listener's nice value: on a busy machine, a flood of scrapes slows the
#: scrapes, not the store (its figures just lag). The process also runs under
#: ``SCHED_BATCH`` where there is one (Linux): same fair share, no wake-up preemption.
NICENESS = 10
#: Seconds between two messages telling the store process the page is watched.
WATCH_RENEW = 1.0
#: Seconds a status request after a pause waits for a fresh document.
FRESH_TIMEOUT = 2.0
#: Key-listing answers kept for requests beyond the rate (the latest queries).
_CACHED_QUERIES = 32


class RemoteStore:
    """The store process's latest published state, and key listings asked of it."""

    def __init__(self, channel: Channel, snapshot: ServerSnapshot, status: dict[str, Any]) -> None:
        self._channel = channel
        self._snapshot = snapshot
        self._status = status
        self._version = 0
        self._status_version = 0
        self._fresh = threading.Condition()
        self._watch_sent = time.monotonic()  # the first state carries a document
        self._keys_lock = threading.Lock()
        self._next_keys = 0.0
        self._asked = 0
        self._answer: Any = None
        self._answered = threading.Event()
        self._answers: dict[tuple[str, int], dict[str, Any]] = {}

    def snapshot(self) -> ServerSnapshot:
        return self._snapshot

    def status(self) -> dict[str, Any]:
        """The latest status document. The store process publishes it only while it is
        asked for (:data:`~rdzv.observe.channel.WATCH_TIMEOUT`): tell it so at most every
        :data:`WATCH_RENEW` seconds, and after a pause wait (at most :data:`FRESH_TIMEOUT`
        seconds) for a fresh one."""
        now = time.monotonic()
        if now - self._watch_sent >= WATCH_RENEW:
            idle = now - self._watch_sent >= WATCH_TIMEOUT
            self._watch_sent = now
            with self._fresh:
                seen = self._status_version
                try:
                    self._channel.send({"watch": 1})
                except ChannelClosed:
                    return self._status
                if idle:
                    self._fresh.wait_for(lambda: self._status_version != seen, FRESH_TIMEOUT)
        return self._status

    def version(self) -> int:
        """How many states were received (bodies are rendered once per state)."""
        return self._version

    def receive(self, message: Any) -> None:
        """Take a message of the store process: ``("state", snapshot, status)`` or
        ``("keys", id, answer)``."""
        if message[0] == "state":
            self._snapshot = ServerSnapshot.from_json(message[1])
            self._version += 1
            if message[2] is not None:
                with self._fresh:
                    self._status = message[2]
                    self._status_version += 1
                    self._fresh.notify_all()
        elif message[0] == "keys" and message[1] == self._asked:
            self._answer = message[2]
            self._answered.set()

    def _cached(self, query: tuple[str, int]) -> dict[str, Any]:
        answer = self._answers.get(query)
        if answer is None:
            raise Unavailable("key listings are rate-limited; retry in a second")
        return answer

    def keys(self, prefix: str, limit: int) -> dict[str, Any]:
        """The store's key listing (:meth:`rdzv.observe.status.StoreStatus.keys`); raises
        :class:`~rdzv.observe.http.Unavailable` when another listing is under way or the
        store process did not answer within :data:`KEYS_TIMEOUT` seconds, unless the same
        query was answered before (that answer is returned)."""
        query = (prefix, limit)
        if not self._keys_lock.acquire(blocking=False):
            return self._cached(query)
        try:
            delay = self._next_keys - time.monotonic()
            if delay > 0:  # at most KEYS_INTERVAL: pace this request rather than refuse it
                time.sleep(delay)
            self._next_keys = time.monotonic() + KEYS_INTERVAL
            self._asked += 1
            self._answered.clear()
            self._channel.send({"keys": self._asked, "prefix": prefix, "limit": limit})
            if not self._answered.wait(KEYS_TIMEOUT) or self._answer is None:
                return self._cached(query)
            answer: dict[str, Any] = self._answer
            self._answers.pop(query, None)
            self._answers[query] = answer
            while len(self._answers) > _CACHED_QUERIES:
                del self._answers[next(iter(self._answers))]
            return answer
        except ChannelClosed:
            raise Unavailable("the store process is gone") from None
        finally:
            self._keys_lock.release()


def main(argv: list[str]) -> int:
    """Serve until the channel on file descriptor ``argv[0]`` closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C reaches the store, which closes us
    with contextlib.suppress(OSError):  # best effort: under CPU contention the store wins
        os.nice(NICENESS)
    with contextlib.suppress(OSError, AttributeError):  # Linux; the threads started later inherit
        # no wake-up preemption: a scrape waits for the running store or client's slice
        # instead of interrupting its round trip; still a fair share (it keeps up)
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    channel = Channel(socket.socket(fileno=int(argv[0])))
    try:
        _, host, port, tokens_hex = channel.receive()
        _, snapshot, status = channel.receive()
    except ChannelClosed:
        return 1
    tokens = [bytes.fromhex(t) for t in tokens_hex]
    remote = RemoteStore(channel, ServerSnapshot.from_json(snapshot), status)
    try:
        server = ObserveServer(
            host,
            port,
            registry=registry_for(ServerCollector(remote.snapshot)),
            status=remote.status,
            tokens=tokens,
            keys=remote.keys,
            version=remote.version,
        ).start()
    except OSError as exc:
        channel.send({"error": f"cannot listen on {host}:{port}: {exc}"})
        return 1
    channel.send({"port": server.port})
    try:
        while True:
            remote.receive(channel.receive())
    except (ChannelClosed, ValueError):
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
