"""Token authentication end to end: rdzv clients, raw replays, torch clients."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from rdzv import auth, wire
from rdzv.errors import AuthError
from rdzv.server import ServerThread, StoreServer
from rdzv.store.async_tcp import AsyncTCPStore
from rdzv.store.tcp import TCPStore
from tests.server.helpers import Raw, eventually

TOKEN = b"correct-horse-battery-staple-0123"
OTHER = b"wrong-horse-battery-staple-45678"


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    caplog.set_level(logging.INFO, logger="rdzv.server")


@pytest.fixture
def token_server() -> Iterator[ServerThread]:
    thread = ServerThread(token=TOKEN).start()
    yield thread
    thread.stop()


def test_client_with_the_token_works(token_server: ServerThread) -> None:
    with TCPStore("127.0.0.1", token_server.port, token=TOKEN, timeout=5) as store:
        store.set("k", b"v")
        assert store.get("k") == b"v"
        with store.clone() as twin:  # the clone authenticates too
            assert twin.get("k") == b"v"


def test_token_from_file_and_environment(
    token_server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "token"
    path.write_bytes(TOKEN + b"\n")
    with TCPStore("127.0.0.1", token_server.port, token_file=path, timeout=5) as store:
        store.set("k", b"file")
    monkeypatch.setenv(auth.TOKEN_ENV, TOKEN.decode())
    with TCPStore("127.0.0.1", token_server.port, timeout=5) as store:
        assert store.get("k") == b"file"


def test_wrong_token_is_refused_and_logged(
    token_server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(AuthError, match=r"refused our token.*wrong token"):
        TCPStore("127.0.0.1", token_server.port, token=OTHER, timeout=5)
    eventually(lambda: "wrong token" in caplog.text, what="the logged refusal")
    assert "closing connection from 127.0.0.1:" in caplog.text


def test_missing_token_is_refused(token_server: ServerThread) -> None:
    with pytest.raises(AuthError, match="requires authentication: pass token="):
        TCPStore("127.0.0.1", token_server.port, timeout=5)


def test_client_with_token_refuses_a_server_without_auth() -> None:
    thread = ServerThread().start()
    try:
        with pytest.raises(AuthError, match="does not require authentication"):
            TCPStore("127.0.0.1", thread.port, token=TOKEN, timeout=5)
    finally:
        thread.stop()


def test_client_with_token_refuses_a_torch_server() -> None:
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with pytest.raises(AuthError, match="does not support authentication"):
        TCPStore("127.0.0.1", master.port, token=TOKEN, timeout=5)


def test_async_client(token_server: ServerThread) -> None:
    async def main() -> None:
        async with AsyncTCPStore("127.0.0.1", token_server.port, token=TOKEN, timeout=5) as s:
            await s.set("a", b"1")
            assert await s.get("a") == b"1"
        with pytest.raises(AuthError, match="refused our token"):
            await AsyncTCPStore("127.0.0.1", token_server.port, token=OTHER, timeout=5).connect()
        with pytest.raises(AuthError, match="requires authentication"):
            await AsyncTCPStore("127.0.0.1", token_server.port, timeout=5).connect()

    asyncio.run(main())


def test_master_store_with_token_requires_it() -> None:
    with TCPStore("127.0.0.1", 0, is_master=True, token=TOKEN, timeout=5) as master:
        with pytest.raises(AuthError, match="requires authentication"):
            TCPStore("127.0.0.1", master.port, timeout=5)
        with TCPStore("127.0.0.1", master.port, token=TOKEN, timeout=5) as client:
            client.set("x", b"y")
        assert master.get("x") == b"y"


# --------------------------------------------------------------------------- raw protocol


def _begin(c: Raw) -> bytes:
    """Negotiate and ask for a challenge; returns the server nonce."""
    c.send(wire.encode_ping(wire.RDZV_PING_NONCE) + wire.encode_op(wire.Op.EXT_AUTH_BEGIN))
    hello = int.from_bytes(c.recv_exact(4), "little")
    assert hello == wire.RDZV_HELLO | wire.HELLO_AUTH_REQUIRED
    assert c.recv_exact(1) == b"\x00"
    return c.recv_exact(wire.AUTH_NONCE_BYTES)


def _assert_auth_error(c: Raw) -> None:
    assert c.recv_exact(2) == bytes((wire.EXT_ERROR, wire.ErrorCode.AUTH))
    n = int.from_bytes(c.recv_exact(8), "little")
    c.recv_exact(n)
    c.assert_closed()


def test_replayed_handshake_fails(
    token_server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    # A legitimate exchange, recorded.
    c = Raw(token_server.port)
    server_nonce = _begin(c)
    client_nonce = auth.new_nonce()
    recorded = wire.encode_auth_proof(
        client_nonce, auth.client_proof(TOKEN, server_nonce, client_nonce)
    )
    c.send(recorded)
    assert c.recv_exact(1) == b"\x00"
    assert c.recv_exact(32) == auth.server_proof(TOKEN, server_nonce, client_nonce)
    c.send(wire.encode_op(wire.Op.GETNUMKEYS))
    assert int.from_bytes(c.recv_exact(8), "little") == 0  # authenticated: served
    c.close()
    # The attacker replays the recorded bytes on a new connection: a fresh nonce defeats it.
    attacker = Raw(token_server.port)
    assert _begin(attacker) != server_nonce
    attacker.send(recorded)
    _assert_auth_error(attacker)
    eventually(lambda: "wrong token" in caplog.text, what="the logged refusal")


def test_proof_without_challenge_and_requests_before_auth_are_refused(
    token_server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    c = Raw(token_server.port)
    c.send(wire.encode_ping(wire.RDZV_PING_NONCE))
    c.recv_exact(4)
    c.send(wire.encode_auth_proof(bytes(32), bytes(32)))
    _assert_auth_error(c)
    c = Raw(token_server.port)
    c.send(wire.encode_ping(wire.RDZV_PING_NONCE))
    c.recv_exact(4)
    c.send(wire.encode_set(b"/k", b"v"))
    c.assert_closed()
    eventually(lambda: "refused SET before authentication" in caplog.text, what="the log")
    assert raw_num_keys_is_zero(token_server)


def raw_num_keys_is_zero(thread: ServerThread) -> bool:
    return thread.call(lambda server: server.engine.num_keys()) == 0


# --------------------------------------------------------------------------- torch clients


def _torch_client(port: int) -> dist.TCPStore:
    return dist.TCPStore(
        "127.0.0.1",
        port,
        is_master=False,
        wait_for_workers=False,
        timeout=timedelta(seconds=2),
    )


def test_torch_client_is_refused(
    token_server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(RuntimeError):
        _torch_client(token_server.port).set("k", "v")
    assert "a torch client cannot authenticate" in caplog.text
    assert raw_num_keys_is_zero(token_server)


def test_torch_client_from_an_allowed_network() -> None:
    thread = ServerThread(token=TOKEN, allow_unauthenticated=["127.0.0.0/8", "::1"]).start()
    try:
        client = _torch_client(thread.port)
        client.set("k", "v")
        assert client.get("k") == b"v"
        # rdzv clients from there may skip the token, or still authenticate.
        with TCPStore("127.0.0.1", thread.port, timeout=5) as plain:
            assert plain.get("k") == b"v"
        with TCPStore("127.0.0.1", thread.port, token=TOKEN, timeout=5) as authed:
            assert authed.get("k") == b"v"
    finally:
        thread.stop()


def test_allowlist_of_another_network_does_not_admit_loopback() -> None:
    thread = ServerThread(token=TOKEN, allow_unauthenticated=["10.0.0.0/8"]).start()
    try:
        with pytest.raises(RuntimeError):
            _torch_client(thread.port).set("k", "v")
    finally:
        thread.stop()


def test_token_requires_extensions() -> None:
    with pytest.raises(ValueError, match="allow_extensions"):
        StoreServer(token=TOKEN, allow_extensions=False)


def test_a_connection_that_does_not_authenticate_is_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    thread = ServerThread(token=TOKEN, auth_timeout=0.2).start()
    try:
        idle = Raw(thread.port)
        idle.assert_closed()
        eventually(lambda: "not authenticated within 0.2 s" in caplog.text, what="the log")
        with TCPStore("127.0.0.1", thread.port, token=TOKEN, timeout=5) as store:
            time.sleep(0.5)  # past the deadline: an authenticated connection stays open
            store.set("k", b"v")
            assert store.get("k") == b"v"
        assert caplog.text.count("not authenticated within") == 1
    finally:
        thread.stop()
