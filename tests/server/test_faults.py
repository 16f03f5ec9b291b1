"""Fault injection on the network side: clients that do not authenticate, half-send requests,
park waits on huge key sets, or pipeline thousands of requests without reading the replies.

Each test fails on a server without the protection it names (issue 16, items 5, 7 and 9).
Real sockets on 127.0.0.1 port 0, except where a hand-driven connection makes an ordering
property deterministic.
"""

from __future__ import annotations

import asyncio
import logging
import struct

import pytest

from rdzv import auth, wire
from rdzv.server import ServerThread, StoreServer
from rdzv.server.connection import INPUT_SLICE, TURN_REQUESTS
from rdzv.wire import Op
from tests.server.helpers import Raw, eventually
from tests.server.test_fastpath import Harness

U64 = struct.Struct("<Q").pack
TOKEN = b"fault-injection-token-0123456789"


@pytest.fixture(autouse=True)
def _log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    caplog.set_level(logging.INFO, logger="rdzv.server")


def _half_multi_set(size: int) -> bytes:
    """The first ``size`` bytes of a 200 MiB MULTI_SET (200 values of 1 MiB)."""
    item = U64(1) + b"k" + U64(2**20) + b"v" * 2**20
    frame = bytes((Op.MULTI_SET,)) + U64(200) + item * (size // len(item) + 1)
    return frame[:size]


# ------------------------------------------------------------------ item 5: before auth
def test_unauthenticated_client_cannot_make_the_server_buffer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    thread = ServerThread(token=TOKEN, auth_timeout=60).start()
    try:
        c = Raw(thread.port)
        c.send(_half_multi_set(64 * 1024))
        c.assert_closed(timeout=5)  # long before auth_timeout
        eventually(lambda: "without authenticating" in caplog.text, what="the log")
        assert thread.call(lambda s: s._partial_total) == 0
        # The handshake itself still works: an rdzv client with the token connects.
        from rdzv.store.tcp import TCPStore

        with TCPStore("127.0.0.1", thread.port, token=TOKEN, timeout=5) as store:
            store.set("k", b"v")
            assert store.get("k") == b"v"
    finally:
        thread.stop()


# ------------------------------------------------------------------ item 5: slowloris
def test_half_sent_request_is_closed_after_request_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    thread = ServerThread(request_timeout=0.5).start()
    try:
        idle = Raw(thread.port)  # a complete request, then silence: never timed out
        idle.ping()
        slow = Raw(thread.port)
        slow.send(wire.encode_set(b"/slow", b"x" * 1000)[:500])
        slow.assert_closed(timeout=5)
        assert "request_timeout=0.5" in caplog.text
        assert "500 bytes received" in caplog.text or "bytes received" in caplog.text
        idle.ping()  # the idle connection is still served
        assert thread.call(lambda s: (s._partial_total, len(s._partial))) == (0, 0)
    finally:
        thread.stop()


def test_partial_request_bytes_are_bounded_per_server(caplog: pytest.LogCaptureFixture) -> None:
    limit = 1 << 20
    thread = ServerThread(max_partial_bytes=limit).start()
    try:
        first = Raw(thread.port)
        first.send(_half_multi_set(600_000))
        eventually(lambda: thread.call(lambda s: s._partial_total) >= 590_000, what="buffered")
        frame = wire.encode_set(b"/big", b"y" * 1_000_000)
        second = Raw(thread.port)
        second.send(frame[:600_000])  # over the limit together: the stalled one goes
        first.assert_closed(timeout=5)
        assert "max_partial_bytes=1048576" in caplog.text
        second.send(frame[600_000:])
        second.ping()  # the one still sending was kept, and its request executed
        assert second.call(wire.encode_key(Op.GET, b"/big"), 8 + 1_000_000)[8:] == b"y" * 1_000_000
        assert thread.call(lambda s: s._partial_total) == 0
    finally:
        thread.stop()


def test_one_request_over_the_partial_limit_closes_only_its_connection() -> None:
    thread = ServerThread(max_partial_bytes=100_000).start()
    try:
        other = Raw(thread.port)
        other.ping()
        big = Raw(thread.port)
        big.send(_half_multi_set(200_000))
        big.assert_closed(timeout=5)
        other.ping()
    finally:
        thread.stop()


# ------------------------------------------------------------------ item 7: huge waits
def test_keys_of_parked_waits_are_bounded_per_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    thread = ServerThread(max_wait_keys_per_connection=100).start()
    try:
        c = Raw(thread.port)
        c.send(wire.encode_keys(Op.WAIT, [b"/a%d" % i for i in range(60)]))
        c.ping()  # parked
        c.send(wire.encode_keys(Op.WAIT, [b"/b%d" % i for i in range(60)]))
        c.assert_closed()
        eventually(lambda: "max_wait_keys_per_connection=100" in caplog.text, what="the log")
        assert thread.call(lambda s: s.engine.num_waiters()) == 0
        # Keys that arrived and released a wait are no longer counted.
        d = Raw(thread.port)
        for round_ in range(3):
            keys = [b"/r%d-%d" % (round_, i) for i in range(60)]
            d.send(wire.encode_keys(Op.WAIT, keys))
            d.send(wire.encode_multi_set(keys, [b"x"] * len(keys)))
            assert d.recv_exact(1) == wire.STOP_WAITING
        d.ping()
    finally:
        thread.stop()


def test_huge_waits_are_released_incrementally_on_close() -> None:
    """Closing a connection with 400,000 parked keys must not stop the loop until all are
    unregistered: another client is served while the release is still in progress."""

    async def scenario() -> None:
        server = StoreServer(max_wait_keys_per_connection=None)
        await server.start()
        try:
            _, hog = await asyncio.open_connection("127.0.0.1", server.port)
            hog.write(wire.encode_validate())
            total = 0
            for w in range(4):
                keys = [b"/w%d-%d" % (w, i) for i in range(100_000)]
                hog.write(wire.encode_keys(Op.WAIT, keys))
                total += len(keys)
            await hog.drain()
            while server.engine.num_waiting_keys() < total:
                await asyncio.sleep(0.01)
            reader, victim = await asyncio.open_connection("127.0.0.1", server.port)
            victim.write(wire.encode_validate())
            hog.close()
            while server.num_connections > 1:
                await asyncio.sleep(0)
            assert 0 < server.engine.num_waiting_keys() < total  # released in steps
            victim.write(wire.encode_set(b"/v", b"1") + wire.encode_key(Op.GET, b"/v"))
            assert await asyncio.wait_for(reader.readexactly(9), 5) == U64(1) + b"1"
            assert server.engine.num_waiting_keys() > 0  # served before the release finished
            while server.engine.num_waiting_keys():
                await asyncio.sleep(0)
            victim.close()
        finally:
            await server.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_cancel_wait_releases_incrementally_and_never_replies() -> None:
    thread = ServerThread(max_wait_keys_per_connection=None).start()
    try:
        c = Raw(thread.port)
        keys = [b"/c%d" % i for i in range(50_000)]
        c.send(wire.encode_keys(Op.WAIT, keys))
        c.ping()
        assert c.call(bytes((Op.CANCEL_WAIT,)), 1) == wire.WAIT_CANCELED
        # Setting a key of the canceled wait (even mid-release) sends nothing to it.
        c.send(wire.encode_multi_set(keys, [b"x"] * len(keys)))
        c.ping()
        eventually(lambda: thread.call(lambda s: s.engine.num_waiters()) == 0, what="released")
    finally:
        thread.stop()


# ------------------------------------------------------------------ item 9: pipelining
@pytest.mark.parametrize("fast", [True, False])
def test_a_pipelined_flood_is_served_in_turns_with_few_writes(fast: bool) -> None:
    """52,000 PINGs in one read (a client that never reads its replies) are executed a
    turn at a time, with reading paused in between, and their replies written in a few
    large writes (a write per 4-byte reply left uvloop flushing a million buffers).
    With the fast path on, the read starts with a request it leaves to Python (VALIDATE in
    pieces), so the Python path gets the flood (after the handshake, the fast path answers
    a read's PINGs at once)."""
    h = Harness(fast=fast)
    i = h.connect()
    count = 256 * 1024 // 5
    validate = wire.encode_validate()
    h.feed(i, validate[:1])
    h.feed(i, validate[1:] + wire.encode_ping(7) * count)
    transport = h.transports[i]
    first_turn = len(transport.out) // 4
    assert 0 < first_turn <= TURN_REQUESTS + INPUT_SLICE // 5
    assert not transport.reading  # the rest waits for the next loop iteration
    turns = 1
    while not transport.reading:
        h.run_once()
        turns += 1
        assert turns < 1000
    assert bytes(transport.out) == wire.reply_ping(7, False) * count
    assert transport.writes <= count // 256
