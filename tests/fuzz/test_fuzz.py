"""Bounded fuzzing (a few hundred examples each); the long run is
``python -m tests.fuzz.run --examples N`` (docs/security.md, "Fuzzing")."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz.harness import (
    LiveServer,
    check_reply_decoders,
    check_request_parser,
    reply_streams,
    request_streams,
)


@settings(max_examples=400, deadline=None)
@given(request_streams())
def test_request_parser(case: tuple[bytes, list[int]]) -> None:
    check_request_parser(*case)
    check_request_parser(*case, extensions=False)


@settings(max_examples=400, deadline=None)
@given(reply_streams())
def test_reply_decoders(case: tuple[bytes, list[int], list[int]]) -> None:
    check_reply_decoders(*case)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    server = LiveServer()
    yield server
    server.close()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request_streams())
def test_live_server(live: LiveServer, case: tuple[bytes, list[int]]) -> None:
    live.feed(*case)


def test_client_survives_a_lying_reply_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply announcing 2**61 bytes costs no memory before the bytes arrive (recv sizes
    are capped): the client times out cleanly instead of allocating exabytes."""
    import socket
    import threading

    from rdzv import wire
    from rdzv.errors import NetworkError
    from rdzv.store import tcp_ops
    from rdzv.store.tcp import TCPStore

    monkeypatch.setattr(tcp_ops, "MIN_IO_TIMEOUT", 0.3)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(10)  # VALIDATE + PING
            conn.sendall(wire.reply_ping(tcp_ops.RDZV_PING_NONCE, False))  # a torch server
            conn.recv(64)  # WAIT
            conn.sendall(wire.STOP_WAITING)
            conn.recv(64)  # GET
            conn.sendall((2**61).to_bytes(8, "little") + b"xx")
            conn.recv(64)

    bg = threading.Thread(target=serve, daemon=True)
    bg.start()
    store = TCPStore("127.0.0.1", port, timeout=0.3, reconnect=False)
    with pytest.raises(NetworkError, match="no reply within"):
        store.get("k")
    store.close()
    listener.close()
