"""The asyncio executor of the dynamic rendezvous: many nodes as coroutines, each with its own
connection to a real server, keep-alive as event-loop timers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from rdzv.errors import RendezvousClosedError, RendezvousTimeoutError
from rdzv.rendezvous.async_node import AsyncRendezvousNode
from rdzv.rendezvous.decision import RendezvousTimeout
from rdzv.rendezvous.dynamic import DynamicRendezvousHandler
from rdzv.server import ServerThread
from rdzv.store.async_tcp import AsyncTCPStore
from rdzv.store.tcp import TCPStore

HOST = "127.0.0.1"
INTERVAL = 0.2
ATTEMPTS = 3  # expiry 0.6 s: well above an event-loop stall on a loaded machine


@pytest.fixture
def server() -> Iterator[ServerThread]:
    thread = ServerThread(HOST, 0).start()
    try:
        yield thread
    finally:
        thread.stop()


async def _connect(port: int) -> AsyncTCPStore:
    return await AsyncTCPStore(HOST, port, timeout=30, wait_for_workers=False).connect()


async def _nodes(
    port: int, n: int, min_nodes: int, max_nodes: int, interval: float = INTERVAL, **kwargs: object
) -> tuple[list[AsyncRendezvousNode], list[AsyncTCPStore]]:
    shared = await _connect(port)
    stores = [shared]
    nodes = []
    for _ in range(n):
        store = await _connect(port)
        stores.append(store)
        nodes.append(
            AsyncRendezvousNode(
                "job",
                store,
                min_nodes,
                max_nodes,
                keep_alive_interval=interval,
                keep_alive_max_attempt=ATTEMPTS,
                master_endpoint=(HOST, port),
                keep_alive_store=shared,
                **kwargs,  # type: ignore[arg-type]
            )
        )
    return nodes, stores


async def _close(nodes: list[AsyncRendezvousNode], stores: list[AsyncTCPStore]) -> None:
    for node in nodes:
        node.stop()
    for store in stores:
        await store.close()


def test_many_coroutine_nodes_complete_one_round(server: ServerThread) -> None:
    async def main() -> None:
        # Heartbeats every 60 s: none during the round, so only rendezvous operations count.
        nodes, stores = await _nodes(server.port, 200, 200, 200, interval=60.0)
        try:
            done = await asyncio.wait_for(asyncio.gather(*(n.next_rendezvous() for n in nodes)), 30)
            assert sorted(d.rank for d in done) == list(range(200))
            assert {d.world_size for d in done} == {200}
            assert {d.master for d in done} == {(HOST, server.port)}
            # O(1) store operations per node: four each, plus a constant for the closer and
            # the first look of the two monitors.
            assert sum(n.ops[0] for n in nodes) <= 4 * 200 + 40
        finally:
            await _close(nodes, stores)

    asyncio.run(main())


def test_async_nodes_and_blocking_handlers_share_a_round(server: ServerThread) -> None:
    """Both executors run the same decisions on the same keys."""

    async def main() -> None:
        nodes, stores = await _nodes(server.port, 2, 3, 3)
        client = TCPStore(HOST, server.port, is_master=False, timeout=30)
        handler = DynamicRendezvousHandler(
            "job",
            client,
            3,
            3,
            local_addr=HOST,
            keep_alive_interval=INTERVAL,
            keep_alive_max_attempt=ATTEMPTS,
            master_endpoint=(HOST, server.port),
        )
        try:
            blocking = asyncio.get_running_loop().run_in_executor(None, handler.next_rendezvous)
            done = await asyncio.wait_for(asyncio.gather(*(n.next_rendezvous() for n in nodes)), 30)
            info = await asyncio.wait_for(blocking, 30)
            assert sorted([d.rank for d in done] + [info.rank]) == [0, 1, 2]
        finally:
            handler.shutdown()
            client.close()
            await _close(nodes, stores)

    asyncio.run(main())


def test_a_stopped_node_is_declared_dead_by_its_peers(server: ServerThread) -> None:
    """A node whose keep-alive timer stops (its death) is excluded after keep-alive x
    attempts, and the survivors complete the next round without it."""

    async def main() -> None:
        nodes, stores = await _nodes(
            server.port, 4, 3, 4, timeout=RendezvousTimeout(join=30, last_call=0.1)
        )
        try:
            first = await asyncio.wait_for(
                asyncio.gather(*(n.next_rendezvous() for n in nodes)), 30
            )
            assert {d.world_size for d in first} == {4}
            nodes[1].stop()  # dies: no more heartbeats
            survivors = [nodes[0], *nodes[2:]]
            second = await asyncio.wait_for(
                asyncio.gather(*(n.next_rendezvous() for n in survivors)), 30
            )
            assert {d.world_size for d in second} == {3}
            assert sorted(d.rank for d in second) == [0, 1, 2]
            assert {d.keys.number for d in second} == {1}
        finally:
            await _close(nodes, stores)

    asyncio.run(main())


def test_join_timeout_and_close(server: ServerThread) -> None:
    async def main() -> None:
        nodes, stores = await _nodes(server.port, 2, 3, 3, timeout=RendezvousTimeout(join=0.5))
        try:
            with pytest.raises(RendezvousTimeoutError, match="min_nodes=3"):
                await asyncio.wait_for(nodes[0].next_rendezvous(), 30)
            # Closing before or after the other node takes its slot: it is woken or refused.
            waiting = asyncio.ensure_future(nodes[1].next_rendezvous())
            await nodes[0].set_closed()
            with pytest.raises(RendezvousClosedError):
                await asyncio.wait_for(waiting, 30)
        finally:
            await _close(nodes, stores)

    asyncio.run(main())
