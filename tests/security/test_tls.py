"""TLS: server certificates, client certificates (mutual TLS), bad certificates, plain
clients against a TLS server."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterator
from datetime import timedelta

import pytest
import torch.distributed as dist

from rdzv import auth
from rdzv.errors import AuthError, NetworkError
from rdzv.server import ServerThread
from rdzv.store.async_tcp import AsyncTCPStore
from rdzv.store.tcp import TCPStore
from rdzv.tls import TLSConfig, client_context, server_context
from tests.security.certs import Certs

TOKEN = b"tls-and-token-together-0123456789"


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)


@pytest.fixture
def tls_server(certs: Certs) -> Iterator[ServerThread]:
    thread = ServerThread(ssl=server_context(certs.server.cert, certs.server.key)).start()
    yield thread
    thread.stop()


@pytest.fixture
def mtls_server(certs: Certs) -> Iterator[ServerThread]:
    context = server_context(
        certs.server.cert, certs.server.key, ca=certs.ca, require_client_cert=True
    )
    thread = ServerThread(ssl=context).start()
    yield thread
    thread.stop()


def test_tls_client_with_the_ca(tls_server: ServerThread, certs: Certs) -> None:
    with TCPStore("127.0.0.1", tls_server.port, tls=TLSConfig(ca=certs.ca), timeout=5) as s:
        s.set("k", b"v")
        assert s.get("k") == b"v"
        assert s.extensions
        with s.clone() as twin:
            assert twin.get("k") == b"v"
    # An SSLContext is accepted as is; server_hostname checks the certificate's DNS name.
    context, _ = client_context(TLSConfig(ca=certs.ca))
    tls = TLSConfig(ca=certs.ca, server_hostname="localhost")
    with TCPStore("127.0.0.1", tls_server.port, tls=context, timeout=5) as s:
        assert s.get("k") == b"v"
    with TCPStore("127.0.0.1", tls_server.port, tls=tls, timeout=5) as s:
        assert s.get("k") == b"v"


def test_async_tls_client(tls_server: ServerThread, certs: Certs) -> None:
    async def main() -> None:
        tls = TLSConfig(ca=certs.ca)
        async with AsyncTCPStore("127.0.0.1", tls_server.port, tls=tls, timeout=5) as s:
            await s.set("a", b"1")
            assert await s.get("a") == b"1"
        with pytest.raises(AuthError, match=r"TLS .* failed.*CERTIFICATE_VERIFY_FAILED"):
            untrusted = TLSConfig(ca=certs.other_ca)
            await AsyncTCPStore("127.0.0.1", tls_server.port, tls=untrusted, timeout=5).connect()

    asyncio.run(main())


def test_untrusted_server_certificate_is_refused(tls_server: ServerThread, certs: Certs) -> None:
    with pytest.raises(AuthError, match="CERTIFICATE_VERIFY_FAILED"):
        TCPStore("127.0.0.1", tls_server.port, tls=TLSConfig(ca=certs.other_ca), timeout=5)


@pytest.mark.parametrize(
    ("which", "reason"),
    [("expired_server", "certificate has expired"), ("wrong_host_server", "IP address mismatch")],
)
def test_bad_server_certificates_are_refused(certs: Certs, which: str, reason: str) -> None:
    pair = getattr(certs, which)
    thread = ServerThread(ssl=server_context(pair.cert, pair.key)).start()
    try:
        with pytest.raises(AuthError, match=reason):
            TCPStore("127.0.0.1", thread.port, tls=TLSConfig(ca=certs.ca), timeout=5)
    finally:
        thread.stop()


def test_mutual_tls(mtls_server: ServerThread, certs: Certs) -> None:
    good = TLSConfig(ca=certs.ca, cert=certs.client.cert, key=certs.client.key)
    with TCPStore("127.0.0.1", mtls_server.port, tls=good, timeout=5) as s:
        s.set("k", b"v")
    for bad in (
        TLSConfig(ca=certs.ca),  # no client certificate
        TLSConfig(ca=certs.ca, cert=certs.rogue_client.cert, key=certs.rogue_client.key),
    ):
        with pytest.raises(AuthError, match=r"TLS|client certificate"):
            TCPStore("127.0.0.1", mtls_server.port, tls=bad, timeout=5)


def test_plain_clients_are_refused_by_a_tls_server(
    tls_server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(NetworkError, match=r"closed the connection.*TLS"):
        TCPStore("127.0.0.1", tls_server.port, timeout=1)
    with pytest.raises(RuntimeError):  # torch has no TLS: its handshake fails
        dist.TCPStore(
            "127.0.0.1", tls_server.port, is_master=False, timeout=timedelta(seconds=1)
        ).set("k", "v")
    assert tls_server.call(lambda server: server.engine.num_keys()) == 0


def test_tls_and_token_together(certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rdzv.server")
    context = server_context(certs.server.cert, certs.server.key)
    thread = ServerThread(ssl=context, token=TOKEN).start()
    tls = TLSConfig(ca=certs.ca)
    try:
        with TCPStore("127.0.0.1", thread.port, tls=tls, token=TOKEN, timeout=5) as s:
            s.set("k", b"v")
        with pytest.raises(AuthError, match="requires authentication"):
            TCPStore("127.0.0.1", thread.port, tls=tls, timeout=5)
    finally:
        thread.stop()
    assert "authenticated" in caplog.text


def test_configuration_errors(certs: Certs) -> None:
    with pytest.raises(ValueError, match=r"cannot load the TLS certificate \(cert=.*missing"):
        server_context(certs.ca.parent / "missing.pem")
    with pytest.raises(ValueError, match="require_client_cert needs a CA"):
        server_context(certs.server.cert, certs.server.key, require_client_cert=True)
    with pytest.raises(ValueError, match="cannot load the TLS CA"):
        client_context(TLSConfig(ca=certs.ca.parent / "nope.pem"))
    with pytest.raises(ValueError, match="tls= is for clients"):
        TCPStore("127.0.0.1", 0, is_master=True, tls=TLSConfig(ca=certs.ca))
    assert client_context(ssl.create_default_context())[1] is None
