"""Clients reconnect after a server restart: retries of idempotent operations, replay of
unacknowledged writes, outcome-unknown errors for the others. Each test runs on both
drivers of the one client core (TCPStore, and AsyncTCPStore through a blocking facade)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rdzv.errors import NetworkError
from rdzv.server import ServerThread
from rdzv.store.async_tcp import AsyncTCPStore
from rdzv.store.base import Store
from rdzv.store.tcp import TCPStore
from tests.server.helpers import eventually
from tests.store.async_bridge import AsyncBridge, LoopThread

Client = Callable[..., Store]


@pytest.fixture(params=["TCPStore", "AsyncTCPStore"])
def client(request: pytest.FixtureRequest) -> Iterator[Client]:
    """``client(port, **kwargs)``: a connected store of the parametrised client class."""
    loops: list[LoopThread] = []

    def make(port: int, **kwargs: Any) -> Store:
        if request.param == "TCPStore":
            return TCPStore("127.0.0.1", port, **kwargs)
        if not loops:
            loops.append(LoopThread())
        store = AsyncTCPStore("127.0.0.1", port, **kwargs)
        loops[0].run(store.connect())
        return AsyncBridge(loops[0], store)

    yield make
    for loop in loops:
        loop.stop()


def restart(server: ServerThread, **kwargs: object) -> ServerThread:
    """Stop ``server`` and start a new one on the same port (state kept only through
    ``data_dir``: a server without it comes back empty, like a crash that lost writes)."""
    port = server.port
    server.stop()
    return ServerThread("127.0.0.1", port, **kwargs).start()


def test_blocked_get_continues_across_a_restart(tmp_path: Path, client: Client) -> None:
    server = ServerThread("127.0.0.1", 0, data_dir=tmp_path).start()
    store = client(server.port, timeout=30)
    store.set("before", b"1")
    got: list[bytes | BaseException] = []

    def blocked() -> None:
        try:
            got.append(store.get("late"))
        except BaseException as exc:
            got.append(exc)

    bg = threading.Thread(target=blocked)
    bg.start()
    eventually(lambda: server.call(lambda s: s.engine.num_waiters()) == 1, what="parked")
    server = restart(server, data_dir=tmp_path)
    try:
        # The client re-registers its wait on the new server.
        eventually(lambda: server.call(lambda s: s.engine.num_waiters()) == 1, timeout=20)
        other = TCPStore("127.0.0.1", server.port, timeout=10)
        assert other.get("before") == b"1"
        other.set("late", b"here")
        bg.join(20)
        assert got == [b"here"]
        assert store.num_keys() == 2  # the store keeps working on its new connection
        other.close()
        store.close()
    finally:
        server.stop()


def test_unacknowledged_sets_are_sent_again(client: Client) -> None:
    server = ServerThread("127.0.0.1", 0).start()
    store = client(server.port, timeout=30)
    store.set("acked", b"1")
    assert store.check(["acked"])  # a reply: "acked" is acknowledged
    store.set("unacked", b"2")
    store.multi_set(["m1", "m2"], [b"3", b"4"])
    server = restart(server)  # in memory: everything is lost, as in a crash
    try:
        assert store.multi_get(["unacked", "m1", "m2"]) == [b"2", b"3", b"4"]
        assert not store.check(["acked"])  # acknowledged before: not replayed
        store.close()
    finally:
        server.stop()


def test_add_in_flight_has_an_unknown_outcome_and_the_store_recovers(client: Client) -> None:
    server = ServerThread("127.0.0.1", 0).start()
    store = client(server.port, timeout=30)
    assert store.add("n", 1) == 1
    port = server.port
    server.stop()
    with pytest.raises(NetworkError, match=r"during add .*may or may not have been applied"):
        store.add("n", 1)
    server = ServerThread("127.0.0.1", port).start()
    try:
        assert store.add("n", 5) == 5  # reconnected on the next call
        store.close()
    finally:
        server.stop()


def test_unacknowledged_append_is_reported_not_replayed(client: Client) -> None:
    server = ServerThread("127.0.0.1", 0).start()
    store = client(server.port, timeout=30)
    store.append("log", b"a")
    store.set("k", b"v")
    server = restart(server)
    try:
        with pytest.raises(NetworkError, match=r"1 earlier append request"):
            store.get("k")
        assert store.get("k") == b"v"  # the set was replayed, the append was not
        assert not store.check(["log"])
        store.close()
    finally:
        server.stop()


def test_reconnect_false_keeps_torch_behaviour(client: Client) -> None:
    server = ServerThread("127.0.0.1", 0).start()
    store = client(server.port, timeout=30, reconnect=False)
    store.set("k", b"v")
    server = restart(server)
    try:
        with pytest.raises(NetworkError, match="closed the connection"):
            store.get("k")
        with pytest.raises(NetworkError, match="cannot be used"):
            store.get("k")
    finally:
        server.stop()


def test_tcpstore_reconnect_can_be_switched_off_and_on() -> None:
    # TCPStore.reconnect, settable (DynamicRendezvousHandler.shutdown switches it off for its
    # last calls): off, a connection lost earlier is not reconnected and the call fails at
    # once; on again, it is. A connection lost while it is off is broken, as torch's.
    server = ServerThread("127.0.0.1", 0).start()
    store = TCPStore("127.0.0.1", server.port, timeout=30)
    try:
        store.set("k", b"v")
        server = restart(server)
        with pytest.raises(NetworkError, match="reconnects on its next call"):
            store.add("n", 1)  # finds the connection lost; its outcome is unknown
        store.reconnect = False
        with pytest.raises(NetworkError, match="cannot be used"):
            store.set("k", b"w")  # not reconnected, although the server is back
        store.reconnect = True
        store.set("k", b"w")  # reconnected
        assert store.get("k") == b"w"
        server = restart(server)
        store.reconnect = False
        with pytest.raises(NetworkError, match="closed the connection"):
            store.get("k")
        store.reconnect = True
        with pytest.raises(NetworkError, match="cannot be used"):
            store.get("k")
    finally:
        store.close()
        server.stop()


def test_reconnect_gives_up_after_the_timeout(client: Client) -> None:
    server = ServerThread("127.0.0.1", 0).start()
    store = client(server.port, timeout=1)
    store.set("k", b"v")
    server.stop()
    start = time.monotonic()
    with pytest.raises(NetworkError, match="could not connect"):
        store.get("k")
    assert time.monotonic() - start < 10


def test_async_store_reconnects(tmp_path: Path) -> None:
    server = ServerThread("127.0.0.1", 0, data_dir=tmp_path).start()
    port = server.port

    async def main() -> None:
        nonlocal server
        store = AsyncTCPStore("127.0.0.1", port, timeout=30)
        await store.connect()
        await store.set("before", b"1")
        blocked = asyncio.ensure_future(store.get("late"))
        await asyncio.sleep(0)
        await asyncio.to_thread(
            eventually, lambda: server.call(lambda s: s.engine.num_waiters()) == 1
        )
        server = await asyncio.to_thread(restart, server, data_dir=tmp_path)
        await asyncio.to_thread(
            eventually, lambda: server.call(lambda s: s.engine.num_waiters()) == 1, 20.0
        )
        other = AsyncTCPStore("127.0.0.1", port, timeout=10)
        assert await other.get("before") == b"1"
        await other.set("late", b"here")
        assert await asyncio.wait_for(blocked, 20) == b"here"
        await other.close()
        await store.append("log", b"x")  # unacknowledged, then lost in a restart
        server = await asyncio.to_thread(restart, server)
        with pytest.raises(NetworkError, match="earlier append"):
            await store.num_keys()
        assert await store.num_keys() == 0
        with pytest.raises(NetworkError, match="during add"):
            await asyncio.to_thread(server.stop)
            await store.add("n", 1)
        await store.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()
