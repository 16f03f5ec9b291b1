"""The c10d rendezvous backend passes the security keys of ``rdzv-conf`` to TCPStore."""

from __future__ import annotations

from rdzv.rendezvous.api import RendezvousParameters
from rdzv.rendezvous.backends import _security_options
from rdzv.tls import TLSConfig


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
