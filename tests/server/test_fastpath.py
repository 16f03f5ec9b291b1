"""The server's C fast path (rdzv.server._fastpath) against its Python path.

The differential test feeds the same random request streams, cut at random places and
interleaved over two connections, to a server with the fast path and one without, and
requires byte-identical replies, the same closed connections and the same final state.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdzv import wire
from rdzv.engine import Engine
from rdzv.server import StoreServer, fastpath
from rdzv.server.connection import Connection
from rdzv.wire import Op
from tests.conftest import subprocess_env

U64 = struct.Struct("<Q").pack
KEYS = [b"/a", b"/b", b"/n", b"/q"]
VALUES = [b"", b"1", b"-5", b" 7", b"+3", b"x", b"007", b"-", b"9223372036854775807", b"v" * 40]


def test_the_extension_is_built() -> None:
    # CI installs the package with pip, which compiles src/rdzv/server/_fastpath.c: without it the
    # server silently runs its slower pure-Python path.
    assert fastpath.AVAILABLE, (
        "rdzv.server._fastpath is not built: run `pip install -e .` (needs a C compiler and the "
        "Python headers) or `python setup.py build_ext --inplace`"
    )


class FakeTransport:
    """Just enough of an asyncio transport for a server connection, recording writes."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.writes = 0
        self.sizes: list[int] = []
        self.reading = True

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.out += data
            self.writes += 1
            self.sizes.append(len(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 4242) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class SocketTransport(FakeTransport):
    """A FakeTransport over one end of a socket pair, so that the receiver may also send on
    the descriptor itself. ``stalled``: the socket's buffer is full (the client does not
    read yet): the receiver's own sends fail. ``holding`` (implied by ``stalled``): writes
    queue in the transport (``get_write_buffer_size`` counts them) and reach the socket, in
    order, only with :meth:`drain` (or a close), which returns all the peer received."""

    def __init__(self, stalled: bool = False, holding: bool = False) -> None:
        super().__init__()
        self.sock, self.peer = socket.socketpair()
        weakref.finalize(self, self.sock.close)
        weakref.finalize(self, self.peer.close)
        self.peer.setblocking(False)
        self.holding = stalled or holding
        self.held = bytearray()
        self.filler = 0  # bytes sent to fill the socket's buffer, not replies
        if stalled:
            self.sock.setblocking(False)
            while True:
                try:
                    self.filler += self.sock.send(b"\xff" * 65536)
                except BlockingIOError:
                    break

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        self.writes += 1
        self.sizes.append(len(data))
        if self.holding or self.held:
            self.held += data
        else:
            self.sock.sendall(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else super().get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return len(self.held)

    def abort(self) -> None:
        self.closed = True
        self.held.clear()

    def drain(self) -> bytes:
        """The replies the peer received, once the transport sent what it held (as a close
        does; an abort drops it)."""
        received = bytearray()
        for _ in range(10_000):
            try:
                received += self.peer.recv(1 << 16)
                continue
            except BlockingIOError:
                pass
            if not self.held:
                break
            self.sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                del self.held[: self.sock.send(self.held)]
        self.out += received[self.filler :]
        self.filler = max(0, self.filler - len(received))
        return bytes(self.out)


class Harness:
    """A StoreServer (never started) with hand-driven connections."""

    def __init__(self, fast: bool) -> None:
        self.server = StoreServer(fastpath=fast)
        # Timers and deferred turns of the never-started server go to a loop of its own,
        # run only by tests that ask for it (run_once).
        self.loop = self.server._loop = asyncio.new_event_loop()
        weakref.finalize(self, self.loop.close)
        self.conns: list[Connection] = []
        self.transports: list[FakeTransport] = []
        self.lost: list[bool] = []

    def connect(self, transport: FakeTransport | None = None) -> int:
        conn = Connection(self.server)
        transport = transport or FakeTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        self.conns.append(conn)
        self.transports.append(transport)
        self.lost.append(False)
        return len(self.conns) - 1

    def feed(self, i: int, data: bytes) -> None:
        """Deliver ``data`` on connection ``i``; empty: the client closes it."""
        if self.lost[i]:
            return
        if not data:
            self.transports[i].closed = self.lost[i] = True
            self.conns[i].connection_lost(None)
            return
        self.conns[i].data_received(data)
        for j, transport in enumerate(self.transports):  # asyncio reports the close later
            if transport.closed and not self.lost[j]:
                self.lost[j] = True
                self.conns[j].connection_lost(None)

    def run_once(self) -> None:
        """Run one iteration of the server's loop (what call_soon scheduled)."""
        self.loop.run_until_complete(asyncio.sleep(0))

    def state(self) -> dict[str, Any]:
        engine: Engine = self.server.engine
        return {
            "data": dict(engine.items()),
            "queues": {k: list(v) for k, v in engine.queues()},
            "bound": sorted(self.server.engine.bound_keys()),
            "waiters": engine.num_waiters(),
            "parked": [(len(c.waiters), c.wait_keys) for c in self.conns],
            "replies": [
                t.drain() if isinstance(t, SocketTransport) else bytes(t.out)
                for t in self.transports
            ],
            "closed": [t.closed for t in self.transports],
        }


def _request(draw: Callable[..., Any], extended: bool) -> bytes:
    key = draw(st.sampled_from(KEYS))
    keys = draw(st.lists(st.sampled_from(KEYS), min_size=0, max_size=4))
    value = draw(st.sampled_from(VALUES))
    amount = draw(st.sampled_from([1, -1, 0, 5, 2**62, -(2**63)]))
    if draw(st.integers(0, 99)) == 42:  # rare: requests that close the connection
        return draw(
            st.sampled_from(
                [
                    bytes((Op.GET,)) + U64(wire.DEFAULT_LIMITS.max_key_bytes + 1),  # key limit
                    wire.encode_key(Op.EXT_GET_WAIT, key),  # unnegotiated when not extended
                ]
            )
        )
    common = [
        wire.encode_set(key, value),
        wire.encode_keys(Op.WAIT, [key]),  # parked by the fast path when the key is absent
        wire.encode_key(Op.GET, key),
        wire.encode_key_int(Op.ADD, key, amount),
        wire.encode_keys(Op.CHECK, keys),
        wire.encode_keys(Op.WAIT, keys),
        wire.encode_keys(Op.MULTI_GET, keys),
        wire.encode_key(Op.DELETE_KEY, key),
        wire.encode_set(key, value, Op.APPEND),
        wire.encode_compare_set(key, value, b"cs"),
        wire.encode_set(key, value, Op.QUEUE_PUSH),
        wire.encode_key(Op.QUEUE_POP, key),
        wire.encode_key_int(Op.BARRIER, key, 2),
        wire.encode_op(Op.GETNUMKEYS),
        wire.encode_op(Op.CANCEL_WAIT),
        wire.encode_ping(draw(st.sampled_from([0, 0x1234, wire.RDZV_PING_NONCE, 2**32 - 1]))),
        wire.encode_keys(Op.MULTI_GET, [key] * 17),  # more keys than the fast path takes
    ]
    if extended:
        common += [
            wire.encode_key_int(Op.EXT_ADD, key, amount),
            wire.encode_key(Op.EXT_GET_WAIT, key),
            wire.encode_set(key, value, Op.EXT_SET_EPHEMERAL),
            wire.encode_key_int(Op.EXT_BARRIER, key, 2),
        ]
    return draw(st.sampled_from(common))  # type: ignore[no-any-return]


@st.composite
def schedules(draw: Callable[..., Any]) -> list[tuple[int, bytes]]:
    """Chunks to deliver, as (connection, bytes), each connection's stream in order (empty
    bytes: the client closes the connection)."""
    streams = []
    for _ in range(2):
        extended = draw(st.booleans())
        frames = [
            draw(
                st.sampled_from(
                    [wire.encode_validate()] * 8
                    + [
                        bytes((Op.VALIDATE,)) + struct.pack("<I", 0x12345678),  # bad magic
                        wire.encode_ping(0x1234),  # no VALIDATE first
                        wire.encode_validate() * 2,  # VALIDATE twice
                    ]
                )
            )
        ]
        if extended:
            frames.append(wire.encode_ping(wire.RDZV_PING_NONCE))
        frames += [_request(draw, extended) for _ in range(draw(st.integers(0, 30)))]
        stream = b"".join(frames)
        # Cut between most requests (a client waiting for each reply), and inside a few.
        cuts = set(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=4)))
        end = 0
        for frame in frames:
            end += len(frame)
            if draw(st.integers(0, 3)) != 3:
                cuts.add(end)
        bounds = sorted(cuts | {0, len(stream)})
        pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
        pieces = [p for p in pieces if p]
        if draw(st.integers(0, 4)) == 0:
            pieces.insert(draw(st.integers(1, len(pieces))), b"")  # the client closes
        streams.append(pieces)
    order = draw(st.permutations([0] * len(streams[0]) + [1] * len(streams[1])))
    taken = [0, 0]
    plan = []
    for i in order:
        plan.append((i, streams[i][taken[i]]))
        taken[i] += 1
    return plan


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules())
def test_fast_and_python_paths_agree(plan: list[tuple[int, bytes]]) -> None:
    if not fastpath.ENABLED:
        pytest.fail("the fast path is not enabled (extension missing or RDZV_FASTPATH=0)")
    harnesses = [Harness(fast=True), Harness(fast=False)]
    for h in harnesses:
        h.connect()
        h.connect()
        for i, chunk in plan:
            h.feed(i, chunk)
    fast, slow = (h.state() for h in harnesses)
    assert fast == slow


@st.composite
def wake_storms(draw: Callable[..., Any]) -> tuple[list[str], list[tuple[int, bytes]]]:
    """Many connections WAIT on one key, a write from another connection wakes them, each
    then reads the key: (each connection's transport, the chunks to deliver). Waiters may
    have replies queued in their transport, requests behind the wait, close or cancel
    before the write, and the wait may arrive in pieces."""
    n = draw(st.integers(1, 8))
    kinds = ["socket", "socket", "full", "holding", "plain"]
    transports = [draw(st.sampled_from(kinds)) for _ in range(n)]
    wait = wire.encode_keys(Op.WAIT, [b"/id"])
    get_id = wire.encode_key(Op.GET, b"/id")
    before: list[tuple[int, bytes]] = []
    after: list[tuple[int, bytes]] = []
    # A SET whose value is a whole GET frame, cut where the value starts: the receiver must
    # not take the rest as a request of its own.
    tricky = wire.encode_set(b"/x", get_id)
    tricky_cut = len(tricky) - len(get_id)
    get_other = wire.encode_key(Op.GET, b"/other")
    for i in range(n):
        chunks = [wire.encode_validate()]
        before_wait = draw(st.sampled_from(["none", "none", "whole", "pieces"]))
        if before_wait == "whole":  # a reply before the wait, from the same read
            chunks[0] += get_other
        elif before_wait == "pieces":  # a reply from the Python path before the wait
            chunks[0] += get_other[:5]
            chunks.append(get_other[5:])
        chunks.append(wait)
        if draw(st.integers(0, 3)) == 0:  # the wait in pieces
            cut = draw(st.integers(1, len(wait) - 1))
            chunks[-1:] = [wait[:cut], wait[cut:]]
        events = ["none"] * 4 + ["behind", "begun", "later", "partial", "close", "cancel"]
        event = draw(st.sampled_from(events))
        if event == "behind":  # a request in the same read as the wait
            chunks[-1] += get_other
        elif event == "begun":  # a request begun in the same read as the wait
            chunks[-1] += tricky[:tricky_cut]
        elif event == "later":
            chunks.append(wire.encode_op(Op.GETNUMKEYS))
        elif event == "partial":  # a request begun after the wait, ended after the wake-up
            chunks.append(tricky[:tricky_cut])
        elif event in ("close", "cancel"):
            chunks.append(b"" if event == "close" else wire.encode_op(Op.CANCEL_WAIT))
        before += [(i, c) for c in chunks]
        rest = tricky[tricky_cut:] if event in ("partial", "begun") else b""
        after.append((i, rest + get_id + wire.encode_keys(Op.WAIT, [b"/id"])))
    order = draw(st.permutations(range(len(before))))
    by_conn: dict[int, list[bytes]] = {}
    for i, c in before:
        by_conn.setdefault(i, []).append(c)
    owners = [before[k][0] for k in order]  # interleaved; each connection's chunks in order
    plan = [(i, by_conn[i].pop(0)) for i in owners]
    waker = draw(
        st.sampled_from(
            [
                wire.encode_set(b"/id", b"v" * 64),
                wire.encode_key_int(Op.ADD, b"/id", 1),
                wire.encode_set(b"/id", b"x", Op.APPEND),
                wire.encode_set(b"/id", b"item", Op.QUEUE_PUSH),  # wakes one
            ]
        )
    )
    plan.append((n, wire.encode_validate() + waker))
    plan += draw(st.permutations(after))
    return transports, plan


def _transport(kind: str) -> FakeTransport:
    if kind == "plain":  # no descriptor: the receiver never sends itself
        return FakeTransport()
    return SocketTransport(stalled=kind == "full", holding=kind == "holding")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wake_storms())
def test_woken_waits_are_answered_alike(storm: tuple[list[str], list[tuple[int, bytes]]]) -> None:
    transports, plan = storm
    harnesses = [Harness(fast=True), Harness(fast=False)]
    for h in harnesses:
        for kind in transports:
            h.connect(_transport(kind))
        h.connect(SocketTransport())  # the writer
        for i, chunk in plan:
            h.feed(i, chunk)
    fast, slow = (h.state() for h in harnesses)
    assert fast == slow


# --------------------------------------------------------------------------- unit tests
def _validated(h: Harness) -> int:
    i = h.connect()
    h.feed(i, wire.encode_validate())
    return i


def test_common_requests_never_reach_python() -> None:
    h = Harness(fast=True)
    i = _validated(h)
    slow_calls: list[bytes] = []
    receiver = h.conns[i]._receiver
    assert receiver is not None and receiver.enabled
    original = h.conns[i]._receive

    def spy(data: bytes) -> None:
        slow_calls.append(data)
        original(data)

    h.conns[i]._receiver = fastpath.Receiver(h.server._fast, spy, fastpath.REPLY_LIMIT)
    h.conns[i]._receiver.write = h.transports[i].write
    h.conns[i]._receiver.enabled = True
    stream = (
        wire.encode_set(b"/k", b"v")
        + wire.encode_keys(Op.WAIT, [b"/k"])
        + wire.encode_key(Op.GET, b"/k")
        + wire.encode_key_int(Op.ADD, b"/c", 3)
        + wire.encode_keys(Op.CHECK, [b"/k", b"/c"])
        + wire.encode_keys(Op.MULTI_GET, [b"/k", b"/missing"])
    )
    h.feed(i, stream)
    assert slow_calls == []
    assert bytes(h.transports[i].out) == (
        b"\x00" + U64(1) + b"v" + struct.pack("<q", 3) + b"\x00" + U64(1) + b"v" + U64(0)
    )
    assert h.transports[i].writes == 1  # one write for the whole batch


def test_a_waiter_sends_the_set_to_python() -> None:
    h = Harness(fast=True)
    waiting = _validated(h)
    writer = _validated(h)
    h.feed(waiting, wire.encode_keys(Op.WAIT, [b"/k"]))
    assert h.transports[waiting].out == b""
    h.feed(writer, wire.encode_set(b"/k", b"v"))
    assert h.transports[waiting].out == b"\x00"  # woken: the SET took the Python path
    assert h.server.engine.num_waiters() == 0


@pytest.fixture
def slow_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The bytes each connection made from now on hands to the Python path."""
    calls: list[bytes] = []
    original = Connection._receive

    def spy(conn: Connection, data: bytes) -> None:
        calls.append(data)
        original(conn, data)

    monkeypatch.setattr(Connection, "_receive", spy)
    return calls


def test_the_handshake_never_reaches_python(slow_calls: list[bytes]) -> None:
    h = Harness(fast=True)
    i = h.connect()
    h.feed(i, wire.encode_validate() + wire.encode_ping(0x1234))  # one read, as in a storm
    assert bytes(h.transports[i].out) == struct.pack("<I", 0x1234)
    h.feed(i, wire.encode_key_int(Op.ADD, b"/c", 2))
    assert bytes(h.transports[i].out)[4:] == struct.pack("<q", 2)
    assert slow_calls == []
    assert h.conns[i].parser.validated
    j = h.connect()
    h.feed(j, wire.encode_validate())  # VALIDATE and PING in two reads
    h.feed(j, wire.encode_ping(7))
    assert bytes(h.transports[j].out) == struct.pack("<I", 7)
    assert slow_calls == []


def test_an_rdzv_ping_after_the_handshake_negotiates_in_python(slow_calls: list[bytes]) -> None:
    h = Harness(fast=True)
    i = h.connect()
    h.feed(i, wire.encode_validate() + wire.encode_ping(wire.RDZV_PING_NONCE))
    assert slow_calls == [wire.encode_ping(wire.RDZV_PING_NONCE)]  # VALIDATE taken in C
    assert h.conns[i].parser.extended
    assert bytes(h.transports[i].out) == wire.reply_ping(wire.RDZV_PING_NONCE, True)


@pytest.mark.parametrize(
    ("first", "error"),
    [
        (bytes((Op.VALIDATE,)) + struct.pack("<I", 0xDEADBEEF), "magic"),
        (wire.encode_ping(1), "the first request must be VALIDATE"),
    ],
)
def test_a_bad_handshake_is_reported_by_the_python_path(
    first: bytes, error: str, slow_calls: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(fast=True)
    i = h.connect()
    h.feed(i, first + wire.encode_ping(2))
    assert slow_calls == [first + wire.encode_ping(2)]
    assert h.transports[i].closed and h.transports[i].out == b""
    assert error in caplog.text


def test_a_validate_in_pieces_goes_to_python_and_then_the_fast_path_resumes(
    slow_calls: list[bytes],
) -> None:
    h = Harness(fast=True)
    i = h.connect()
    validate = wire.encode_validate()
    h.feed(i, validate[:2])
    h.feed(i, validate[2:])
    assert slow_calls == [validate[:2], validate[2:]]
    h.feed(i, wire.encode_ping(3))
    assert bytes(h.transports[i].out) == struct.pack("<I", 3)
    assert len(slow_calls) == 2  # validated by Python; the receiver no longer expects it


def test_a_single_key_wait_is_parked_without_python(slow_calls: list[bytes]) -> None:
    h = Harness(fast=True)
    waiting = h.connect()
    writer = h.connect()
    h.feed(waiting, wire.encode_validate() + wire.encode_keys(Op.WAIT, [b"/id"]))
    h.feed(writer, wire.encode_validate())
    assert slow_calls == []
    conn = h.conns[waiting]
    assert h.server.engine.num_waiters() == 1
    assert list(conn.waiters.values()) == [1] and conn.wait_keys == 1
    assert conn._receiver is not None and not conn._receiver.enabled
    h.feed(writer, wire.encode_set(b"/id", b"v"))  # a waiter: the SET takes the Python path
    assert slow_calls == [wire.encode_set(b"/id", b"v")]
    assert h.transports[waiting].out == wire.STOP_WAITING
    assert h.server.engine.num_waiters() == 0 and conn.wait_keys == 0
    assert conn._receiver.enabled  # woken: the fast path again
    h.feed(waiting, wire.encode_key(Op.GET, b"/id"))
    assert bytes(h.transports[waiting].out) == wire.STOP_WAITING + U64(1) + b"v"
    assert len(slow_calls) == 1


def test_a_woken_wait_is_answered_by_the_receiver() -> None:
    h = Harness(fast=True)
    executor = h.server._fast
    assert executor is not None
    to_python: list[object] = []
    on_fire = executor.on_fire
    assert on_fire is not None

    def spy(waiter: Any) -> None:
        to_python.append(waiter)
        on_fire(waiter)

    executor.on_fire = spy
    plain, full, queued, later = (
        h.connect(SocketTransport()),
        h.connect(SocketTransport(stalled=True)),
        h.connect(SocketTransport(stalled=True)),
        h.connect(SocketTransport()),
    )
    writer = h.connect(SocketTransport())
    get_other = wire.encode_key(Op.GET, b"/other")
    for i in (plain, full, queued, later):
        first = get_other if i == queued else b""  # its reply stays queued in the transport
        h.feed(i, wire.encode_validate() + first + wire.encode_keys(Op.WAIT, [b"/id"]))
    h.feed(later, wire.encode_op(Op.GETNUMKEYS))  # received after the wait
    h.feed(writer, wire.encode_validate() + wire.encode_set(b"/id", b"v"))
    # Answered in C: the plain connection, and the full one (its send fails, the transport
    # queues the reply); the others take the Python path.
    assert [w.owner[0] for w in to_python] == [h.conns[queued], h.conns[later]]  # type: ignore[attr-defined]
    transports = cast(list[SocketTransport], h.transports)
    assert transports[full].held == wire.STOP_WAITING
    assert transports[plain].drain() == wire.STOP_WAITING
    assert transports[full].drain() == wire.STOP_WAITING
    assert transports[queued].drain() == U64(0) + wire.STOP_WAITING
    assert transports[later].drain() == U64(0) + wire.STOP_WAITING
    for i in (plain, full, queued, later):
        conn = h.conns[i]
        assert not conn.waiters and conn.wait_keys == 0
    assert h.server.engine.num_waiters() == 0
    receiver = h.conns[plain]._receiver
    assert receiver is not None and receiver.enabled  # the GET that follows is served in C
    h.feed(plain, wire.encode_key(Op.GET, b"/id"))
    assert transports[plain].drain() == wire.STOP_WAITING + U64(1) + b"v"


def test_requests_behind_a_parked_wait_go_to_python(slow_calls: list[bytes]) -> None:
    h = Harness(fast=True)
    i = h.connect()
    get = wire.encode_key(Op.GET, b"/other")
    h.feed(i, wire.encode_validate() + wire.encode_keys(Op.WAIT, [b"/k"]) + get)
    assert slow_calls == [get]
    assert bytes(h.transports[i].out) == U64(0)  # answered while the wait stays parked
    assert h.server.engine.num_waiters() == 1


def test_close_and_cancel_drop_a_wait_parked_by_the_fast_path() -> None:
    h = Harness(fast=True)
    closing, cancelling = h.connect(), h.connect()
    for i in (closing, cancelling):
        h.feed(i, wire.encode_validate() + wire.encode_keys(Op.WAIT, [b"/k"]))
    assert h.server.engine.num_waiters() == 2
    h.feed(closing, b"")  # the client goes away
    assert h.server.engine.num_waiters() == 1
    h.feed(cancelling, wire.encode_op(Op.CANCEL_WAIT))
    assert bytes(h.transports[cancelling].out) == wire.WAIT_CANCELED
    assert h.server.engine.num_waiters() == 0
    h.server.engine.set(b"/k", b"v")  # wakes nobody: no reply to either
    assert h.transports[cancelling].out == wire.WAIT_CANCELED


def test_without_an_owner_the_python_path_parks(slow_calls: list[bytes]) -> None:
    h = Harness(fast=True)
    i = h.connect()
    receiver = h.conns[i]._receiver
    assert receiver is not None
    receiver.owner = None
    wait = wire.encode_keys(Op.WAIT, [b"/k"])
    h.feed(i, wire.encode_validate() + wait)
    assert slow_calls == [wait]
    assert h.server.engine.num_waiters() == 1 and h.conns[i].wait_keys == 1


def test_executor_run_never_parks_and_receivers_check_their_owner() -> None:
    engine = Engine()
    executor = fastpath.executor_for(engine, wire.DEFAULT_LIMITS)
    assert executor is not None
    wait = wire.encode_keys(Op.WAIT, [b"/k"])
    executor.on_fire = lambda waiter: None
    assert executor.run(wait, 0, False, 100) == (0, None)  # no connection to park for
    receiver = fastpath.Receiver(executor, lambda data: None, 100)
    receiver.write = lambda data: None
    receiver.enabled = True
    receiver.owner = ("not a connection",)  # type: ignore[assignment]
    with pytest.raises(AttributeError):  # it has no add_waiter
        receiver(wait)
    receiver.owner = "conn"  # type: ignore[assignment]
    with pytest.raises(TypeError, match="owner must be a"):
        receiver(wait)


def test_the_fast_path_stops_at_a_partial_request() -> None:
    h = Harness(fast=True)
    i = _validated(h)
    frame = wire.encode_key(Op.GET, b"/k")
    h.feed(i, wire.encode_set(b"/k", b"v") + frame[:3])
    assert h.transports[i].out == b""
    receiver = h.conns[i]._receiver
    assert receiver is not None and not receiver.enabled  # bytes of a request are buffered
    h.feed(i, frame[3:])
    assert bytes(h.transports[i].out) == U64(1) + b"v"
    assert receiver.enabled


def test_replies_are_written_in_bounded_batches() -> None:
    h = Harness(fast=True)
    i = _validated(h)
    value = b"x" * 100_000
    h.feed(i, wire.encode_set(b"/big", value))
    h.feed(i, wire.encode_key(Op.GET, b"/big") * 8)
    reply = U64(len(value)) + value
    assert bytes(h.transports[i].out) == reply * 8
    # A batch ends at the first reply that takes it to REPLY_LIMIT bytes or more.
    per_write = -(-fastpath.REPLY_LIMIT // len(reply))
    batches = [per_write * len(reply)] * (8 // per_write)
    if 8 % per_write:
        batches.append(8 % per_write * len(reply))
    assert h.transports[i].sizes == batches


def test_direct_send_on_the_socket_when_nothing_is_queued() -> None:
    h = Harness(fast=True)
    executor = h.server._fast
    assert executor is not None
    h.server.engine.set(b"/k", b"v")
    a, b = socket.socketpair()
    try:
        slow: list[bytes] = []
        written: list[bytes] = []
        queued = [0]
        asked = [0]

        def buffered() -> int:
            asked[0] += 1
            return queued[0]

        receiver = fastpath.Receiver(executor, slow.append, fastpath.REPLY_LIMIT)
        receiver.write = written.append
        receiver.buffered = buffered
        receiver.fd = a.fileno()
        receiver.enabled = True
        receiver(wire.encode_key(Op.GET, b"/k"))
        assert written == []
        assert b.recv(100) == U64(1) + b"v"
        assert asked == [1]
        # Nothing but the receiver's own sends since the transport said 0: not asked again.
        receiver(wire.encode_key(Op.GET, b"/k"))
        assert b.recv(100) == U64(1) + b"v"
        assert asked == [1]
        # A turn of the Python path (which ends by setting ``enabled``) left bytes in the
        # transport: they must go first.
        queued[0] = 10
        receiver.enabled = True
        receiver(wire.encode_key(Op.GET, b"/k"))
        assert written == [U64(1) + b"v"] and asked == [2]
        # ... and after that write through the transport, it is asked again.
        receiver(wire.encode_key(Op.GET, b"/k"))
        assert written == [U64(1) + b"v"] * 2 and asked == [3]
        queued[0] = 0
        receiver(b"\x0d")  # PING: the Python path, which may write
        assert slow == [b"\x0d"]
        receiver(wire.encode_key(Op.GET, b"/k"))
        assert b.recv(100) == U64(1) + b"v" and asked == [4]
        receiver.enabled = False
        receiver(b"\x0d")
        assert slow == [b"\x0d"] * 2
    finally:
        a.close()
        b.close()


def test_receiver_rejects_bad_arguments() -> None:
    executor = fastpath.executor_for(Engine(), wire.DEFAULT_LIMITS)
    assert executor is not None
    with pytest.raises(TypeError):
        fastpath.Receiver(executor, 42, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        fastpath.Receiver(executor, print, 0)
    receiver = fastpath.Receiver(executor, print, 10)
    with pytest.raises(TypeError):
        receiver.write = 5  # type: ignore[assignment]
    with pytest.raises(TypeError):
        executor.run("text", 0, False, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        executor.run(b"", 1, False, 10)


def test_executor_takes_only_the_engines_fastpath_tables() -> None:
    tables = Engine().fastpath_tables()
    with pytest.raises(TypeError, match="FastPathTables"):
        fastpath.Executor(tables[:5], 1, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="field 2"):
        fastpath.Executor(tables._replace(waiters=[]), 1, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="park"):
        fastpath.Executor(tables._replace(park=None), 1, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        fastpath.Executor(tables, -1, 1, 1)


def test_fastpath_state_says_why_it_is_off(tmp_path: Any) -> None:
    assert StoreServer().fastpath_state == "on"
    assert StoreServer(fastpath=False).fastpath_state == "off (fastpath=False)"
    durable = StoreServer(data_dir=tmp_path / "data")
    assert durable.fastpath_state.startswith("off (durable")


@pytest.mark.parametrize(("value", "enabled"), [("0", False), ("off", False), ("1", True)])
def test_rdzv_fastpath_environment_variable(value: str, enabled: bool) -> None:
    code = "from rdzv.server import fastpath; print(fastpath.ENABLED)"
    env = {**subprocess_env(), "RDZV_FASTPATH": value}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == str(enabled), out.stderr


# --------------------------------------------------------------------------- busy polling
def _poll_setup(window: float = 0.002, max_clients: int = 1) -> tuple[Any, ...]:
    loop = asyncio.new_event_loop()
    executor = fastpath.executor_for(Engine(), wire.DEFAULT_LIMITS)
    assert executor is not None
    poller = fastpath.BusyPoller(loop, executor, window, max_clients)
    receivers = []
    for _ in range(2):
        r = fastpath.Receiver(executor, lambda data: None, fastpath.REPLY_LIMIT)
        r.write = lambda data: None
        r.enabled = True
        receivers.append(r)
    return loop, executor, poller, receivers


def _run_until(loop: asyncio.AbstractEventLoop, done: Callable[[], bool], limit: float) -> float:
    """Run ``loop`` until ``done()``; the seconds it took (fails after ``limit``)."""

    async def wait() -> float:
        start = time.perf_counter()
        while not done():
            assert time.perf_counter() - start < limit, "condition not reached"
            await asyncio.sleep(0)
        return time.perf_counter() - start

    return loop.run_until_complete(wait())


def test_busy_poller_polls_for_the_window_after_a_read() -> None:
    loop, executor, poller, (r, _) = _poll_setup(window=0.02)
    try:
        assert not executor.polling
        r(wire.encode_key(Op.GET, b"/k"))
        assert executor.polling and executor.activity == 1 and executor.distinct == 1
        took = _run_until(loop, lambda: not executor.polling, limit=5.0)
        assert took >= 0.015  # polled about the window after the read, then stopped
        r(wire.encode_key(Op.GET, b"/k"))  # a later read starts it again
        assert executor.polling
        poller.close()
        _run_until(loop, lambda: not executor.polling, limit=5.0)
        r(wire.encode_key(Op.GET, b"/k"))
        assert not executor.polling  # closed for good
    finally:
        loop.close()


def test_busy_poller_backs_off_when_several_clients_read() -> None:
    loop, executor, poller, (a, b) = _poll_setup(window=1.0, max_clients=1)
    try:
        a(wire.encode_key(Op.GET, b"/k"))
        b(wire.encode_key(Op.GET, b"/k"))  # a second connection within the window
        assert executor.distinct == 2
        # Not the 1 s window: the poller stops at once, held off for the cool-down.
        took = _run_until(loop, lambda: not executor.polling, limit=0.5)
        assert took >= fastpath.POLL_COOLDOWN * 0.9
        assert took < 0.5
    finally:
        poller.close()
        loop.close()


def test_busy_poller_rejects_bad_settings() -> None:
    loop = asyncio.new_event_loop()
    executor = fastpath.executor_for(Engine(), wire.DEFAULT_LIMITS)
    assert executor is not None
    try:
        with pytest.raises(ValueError, match="window"):
            fastpath.BusyPoller(loop, executor, 0.0)
        with pytest.raises(ValueError, match="max_clients"):
            fastpath.BusyPoller(loop, executor, 0.001, max_clients=0)
        with pytest.raises(ValueError, match="busy_poll"):
            StoreServer(busy_poll=-1.0)
    finally:
        loop.close()


def test_busy_poll_state() -> None:
    assert StoreServer().busy_poll_state == "off"
    assert StoreServer(busy_poll=50e-6).busy_poll_state == "50 us"
    assert StoreServer(busy_poll=50e-6, fastpath=False).busy_poll_state == "off"
