"""Hostile and broken clients: the server stays up, answers everyone else, loses no data."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from rdzv import wire
from rdzv.server import ServerThread
from rdzv.wire import Op
from tests.conftest import subprocess_env
from tests.server.helpers import Raw, eventually

U64 = struct.Struct("<Q").pack


def _healthy(server: ServerThread) -> None:
    """A fresh client can still write, read and ping."""
    c = Raw(server.port)
    c.send(wire.encode_set(b"/health", b"ok"))
    assert c.call(wire.encode_key(Op.GET, b"/health"), 10)[8:] == b"ok"
    c.ping()
    c.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        bytes(range(256)),
        b"\x00\x00\x00\x00\x00\x00",
    ],
    ids=["http", "bytes", "zero-magic"],
)
def test_garbage_closes_the_connection(server: ServerThread, garbage: bytes) -> None:
    c = Raw(server.port, validate=False)
    c.send(garbage)
    c.assert_closed()
    _healthy(server)


def test_unknown_opcode_closes_only_that_connection(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    bystander = Raw(server.port)
    bystander.send(wire.encode_set(b"/keep", b"1"))
    c = Raw(server.port)
    c.send(b"\x63")
    c.assert_closed()
    bystander.ping()
    assert bystander.call(wire.encode_key(Op.GET, b"/keep"), 9)[8:] == b"1"
    eventually(lambda: "unknown opcode 0x63" in caplog.text, what="the logged reason")


@pytest.mark.parametrize("op", [Op.SET, Op.GET, Op.APPEND, Op.QUEUE_PUSH])
def test_length_prefix_2_pow_63_is_refused_at_once(server: ServerThread, op: Op) -> None:
    c = Raw(server.port)
    c.send(bytes((op,)) + U64(2**63))  # and nothing else: no allocation, no waiting
    c.assert_closed(timeout=5)
    _healthy(server)


def test_huge_key_count_is_refused_at_once(server: ServerThread) -> None:
    c = Raw(server.port)
    c.send(bytes((Op.MULTI_SET,)) + U64(2**63))
    c.assert_closed()
    _healthy(server)


def test_half_sent_request_does_not_stall_others(server: ServerThread) -> None:
    slow = Raw(server.port)
    frame = wire.encode_set(b"/slow", b"x" * 100_000)
    slow.send(frame[:50_000])
    for _ in range(3):
        _healthy(server)
    slow.send(frame[50_000:])
    slow.ping()
    c = Raw(server.port)
    assert c.call(wire.encode_key(Op.GET, b"/slow"), 8 + 100_000)[8:] == b"x" * 100_000


def test_thousand_idle_connections(server: ServerThread) -> None:
    idle = [Raw(server.port) for _ in range(1000)]
    try:
        eventually(lambda: server.call(lambda s: s.num_connections) >= 1000, what="accepted")
        _healthy(server)
        for i in (0, 499, 999):
            idle[i].ping(i)
    finally:
        for c in idle:
            c.close()
    eventually(lambda: server.call(lambda s: s.num_connections) == 0, what="all closed")


def test_client_that_never_reads_is_paused_not_buffered(server: ServerThread) -> None:
    big = b"v" * (4 * 2**20)
    writer = Raw(server.port)
    writer.send(wire.encode_set(b"/big", big))
    writer.ping()
    hog = Raw(server.port)
    # Ask for 400 MiB of replies in one write and read none of them.
    hog.send(wire.encode_key(Op.GET, b"/big") * 100)

    def paused() -> bool:
        conns = server.call(lambda s: [(c._backlog, c.transport) for c in s._connections])
        return any(backlog for backlog, _ in conns)

    eventually(paused, what="the hog's remaining requests postponed")
    buffered = server.call(
        lambda s: max(c.transport.get_write_buffer_size() for c in s._connections)
    )
    assert buffered < 16 * 2**20  # a few replies, not 400 MiB
    for _ in range(3):
        _healthy(server)
    # Reading drains the backlog: every reply arrives, in order.
    for _ in range(100):
        assert hog.recv_exact(8 + len(big), timeout=30)[8:16] == b"vvvvvvvv"
    hog.ping()


def test_client_killed_mid_wait(server: ServerThread, tmp_path: object) -> None:
    script = (
        "import sys\n"
        "from rdzv.store.tcp import TCPStore\n"
        f"s = TCPStore('127.0.0.1', {server.port}, timeout=60)\n"
        "s.set('before-kill', b'kept')\n"
        "print('waiting', flush=True)\n"
        "s.wait(['never'])\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "waiting\n"
        eventually(lambda: server.call(lambda s: s.engine.num_waiters()) == 1, what="parked")
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()
    eventually(lambda: server.call(lambda s: s.engine.num_waiters()) == 0, what="dropped")
    c = Raw(server.port)
    assert c.call(wire.encode_key(Op.GET, b"/before-kill"), 12)[8:] == b"kept"
    c.send(wire.encode_set(b"/never", b"now"))  # waking a dead waiter is harmless
    c.ping()
    _healthy(server)
