"""The c10d rendezvous backend passes the security keys of ``rdzv-conf`` to TCPStore."""

from __future__ import annotations

from pathlib import Path

import pytest

from rdzv.errors import AuthError, RendezvousConnectionError
from rdzv.rendezvous.api import RendezvousParameters
from rdzv.rendezvous.c10d import _security_options, create_c10d_store
from rdzv.server import ServerThread
from rdzv.tls import TLSConfig, server_context
from tests.security.certs import Certs


def _params(**config: str) -> RendezvousParameters:
    return RendezvousParameters("c10d", "127.0.0.1:0", "run", 1, 1, **config)


def test_security_keys_become_store_options() -> None:
    assert _security_options(_params()) == {}
    options = _security_options(
        _params(token_file="/run/secrets/rdzv", tls_ca="ca.pem", tls_server_hostname="store")
    )
    assert options == {
        "token_file": "/run/secrets/rdzv",
        "tls": TLSConfig(ca="ca.pem", server_hostname="store"),
    }


def test_tls_with_is_host_is_refused() -> None:
    with pytest.raises(ValueError, match="is_host=true cannot be combined with tls"):
        create_c10d_store(_params(tls_ca="ca.pem", is_host="true"))


def test_c10d_store_over_tls_with_a_token(certs: Certs, tmp_path: Path) -> None:
    token = b"rendezvous-token-0123456789abcdef"
    token_file = tmp_path / "token"
    token_file.write_bytes(token)
    context = server_context(certs.server.cert, certs.server.key)
    thread = ServerThread(ssl=context, token=token).start()
    try:
        endpoint = f"127.0.0.1:{thread.port}"
        conf = {"tls_ca": str(certs.ca), "token_file": str(token_file)}
        params = RendezvousParameters("c10d", endpoint, "run", 1, 1, **conf)
        store, published = create_c10d_store(params)
        store.set("k", b"v")
        assert published == ("127.0.0.1", thread.port)
        params = RendezvousParameters("c10d", endpoint, "run", 1, 1, tls_ca=str(certs.ca))
        with pytest.raises(RendezvousConnectionError) as info:
            create_c10d_store(params)
        assert isinstance(info.value.__cause__, AuthError)
    finally:
        thread.stop()
