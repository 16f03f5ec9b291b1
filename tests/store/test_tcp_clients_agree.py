"""TCPStore and AsyncTCPStore validate their arguments and explain a closed connection the
same way (one validation function, tcp.check_arguments; one error for the closed
connection)."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import threading
from collections.abc import Iterator

import pytest

from rdzv import wire
from rdzv.errors import NetworkError
from rdzv.store.async_tcp import AsyncTCPStore
from rdzv.store.tcp import TCPStore

HINT = re.escape("(did it stop? torch servers also close the connection")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"world_size": "2"}, TypeError, "world_size must be an int or None, got '2'"),
        ({"world_size": True}, TypeError, "world_size must be an int or None"),
        ({"world_size": 0}, ValueError, "world size cannot be 0"),
        ({"is_master": "yes"}, TypeError, "is_master must be a bool, got str"),
    ],
)
@pytest.mark.parametrize("client", [TCPStore, AsyncTCPStore])
def test_bad_arguments_are_refused_at_construction(
    client: type, kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        client("127.0.0.1", 1, timeout=1, **kwargs)


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((b"127.0.0.1", 1), TypeError, "host_name must be a str"),
        (("127.0.0.1", "1"), TypeError, "port must be an int"),
        (("127.0.0.1", 70000), ValueError, "port must be in 0..65535"),
        (("127.0.0.1", 1, None, False, -1), ValueError, "timeout must be >= 0"),
        (("127.0.0.1", 1, None, False, "5"), TypeError, "timeout must be a datetime"),
    ],
)
@pytest.mark.parametrize("client", [TCPStore, AsyncTCPStore])
def test_endpoint_and_timeout_are_checked_alike(
    client: type, args: tuple[object, ...], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        client(*args)


@pytest.mark.parametrize("client", [TCPStore, AsyncTCPStore])
def test_tls_with_is_master_is_refused_alike(client: type) -> None:
    with pytest.raises(ValueError, match="tls= is for clients"):
        client("127.0.0.1", 0, is_master=True, tls=ssl.create_default_context())


@pytest.fixture
def closes_after_hello() -> Iterator[int]:
    """A torch-style server that answers the handshake (VALIDATE, PING), then ends the
    connection cleanly (FIN, socket kept open so no RST races it) at the next request."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    conns: list[socket.socket] = []

    def serve() -> None:
        conn, _ = listener.accept()
        conns.append(conn)
        parser = wire.RequestParser()
        while True:
            data = conn.recv(65536)
            if not data:
                return
            for request in parser.receive(data):
                if isinstance(request, wire.Ping):
                    conn.sendall(wire.reply_ping(request.nonce, extended=False))
                elif not isinstance(request, wire.Validate):
                    conn.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    for conn in conns:
        conn.close()
    listener.close()
    thread.join(10)


def test_blocking_client_explains_a_closed_connection(closes_after_hello: int) -> None:
    store = TCPStore("127.0.0.1", closes_after_hello, timeout=5, reconnect=False)
    with pytest.raises(NetworkError, match=HINT):
        store.get("k")


def test_async_client_explains_a_closed_connection(closes_after_hello: int) -> None:
    async def main() -> None:
        store = AsyncTCPStore("127.0.0.1", closes_after_hello, timeout=5, reconnect=False)
        await store.connect()
        try:
            await store.get("k")
        finally:
            await store.close()

    with pytest.raises(NetworkError, match=HINT):
        asyncio.run(main())
