"""Shared-secret authentication for the store protocol (sans-I/O pieces).

A server configured with a token refuses every operation of a connection until the client has
proved that it knows the token; the token itself never crosses the wire. The exchange is a
mutual HMAC-SHA256 challenge-response (the same construction as RFC 2104 keyed MACs used in
e.g. SCRAM's client/server proofs):

1. server -> client: ``server_nonce`` (32 random bytes, fresh per connection);
2. client -> server: ``client_nonce`` (32 random bytes) and
   ``client_proof = HMAC(token, "rdzv-auth-v1 client" | server_nonce | client_nonce)``;
3. server -> client: ``server_proof = HMAC(token, "rdzv-auth-v1 server" | server_nonce |
   client_nonce)`` if the client proof verifies (constant-time compare), else a refusal.

A recorded exchange cannot be replayed: the server's nonce differs on every connection, so an
old proof never verifies again. The client checks the server's proof, so a client does not
talk to a server that merely pretends to accept it.

Clients that cannot authenticate (torch's C++ client) are refused, unless their address is in
one of the networks the operator allowed (:class:`NetworkAllowlist`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from rdzv.errors import AuthError

__all__ = [
    "NONCE_BYTES",
    "PROOF_BYTES",
    "TOKEN_ENV",
    "NetworkAllowlist",
    "client_proof",
    "load_token",
    "new_nonce",
    "server_proof",
    "verify",
]

#: Environment variable holding the shared secret.
TOKEN_ENV = "RDZV_TOKEN"
#: Length of each nonce (bytes): 256 bits, as large as the HMAC-SHA256 output.
NONCE_BYTES = 32
#: Length of a proof (bytes): HMAC-SHA256.
PROOF_BYTES = 32
#: Minimum token length (bytes) accepted; shorter secrets are refused as guessable.
MIN_TOKEN_BYTES = 16

_CLIENT_LABEL = b"rdzv-auth-v1 client"
_SERVER_LABEL = b"rdzv-auth-v1 server"


def unauthenticated_warning(what: str, endpoint: str) -> str:
    """The console warning for a store served on ``endpoint`` without a token (``what``
    names it, e.g. "the workers' store"): what is at stake and how to set a token."""
    return (
        f"{what} on {endpoint} is unauthenticated: anyone who can reach that address can "
        f"read and change it. Set a shared token on every node (export {TOKEN_ENV}=$(openssl "
        "rand -hex 32), the same value everywhere; see docs/security.md)"
    )


def load_token(
    token: str | bytes | None = None,
    token_file: str | os.PathLike[str] | None = None,
    *,
    use_env: bool = True,
) -> bytes | None:
    """Resolve the shared secret: the explicit ``token``, else the contents of
    ``token_file`` (surrounding whitespace stripped), else ``$RDZV_TOKEN`` (if ``use_env``),
    else None (no authentication).

    Raises AuthError if both ``token`` and ``token_file`` are given, the file cannot be read
    (the message names the path), or the secret is shorter than 16 bytes.
    """
    if token is not None and token_file is not None:
        raise AuthError("give either a token or a token file, not both")
    source = "the token argument"
    if token is None and token_file is not None:
        path = Path(token_file)
        try:
            token = path.read_bytes().strip()
        except OSError as exc:
            raise AuthError(
                f"cannot read the token file {path}: {exc.strerror or exc}; "
                "create it with a random secret (e.g. `openssl rand -hex 32 > FILE`)"
            ) from exc
        source = f"token file {path}"
    elif token is None and use_env:
        token = os.environ.get(TOKEN_ENV) or None
        source = f"${TOKEN_ENV}"
    if token is None:
        return None
    secret = token.encode("utf-8") if isinstance(token, str) else bytes(token)
    if len(secret) < MIN_TOKEN_BYTES:
        raise AuthError(
            f"the secret from {source} is {len(secret)} bytes; use at least "
            f"{MIN_TOKEN_BYTES} random bytes (e.g. `openssl rand -hex 32`)"
        )
    return secret


def new_nonce() -> bytes:
    """A fresh random nonce of :data:`NONCE_BYTES` bytes (``secrets.token_bytes``)."""
    return secrets.token_bytes(NONCE_BYTES)


def _mac(token: bytes, label: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(token, label + server_nonce + client_nonce, hashlib.sha256).digest()


def client_proof(token: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """What the client sends to prove it knows ``token`` (32 bytes)."""
    return _mac(token, _CLIENT_LABEL, server_nonce, client_nonce)


def server_proof(token: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """What the server sends back to prove it knows ``token`` too (32 bytes)."""
    return _mac(token, _SERVER_LABEL, server_nonce, client_nonce)


def verify(expected: bytes, received: bytes) -> bool:
    """Constant-time comparison of two proofs."""
    return hmac.compare_digest(expected, received)


class NetworkAllowlist:
    """Networks from which clients may connect without authenticating (torch clients).

    Args:
        networks: CIDR strings or addresses (``"127.0.0.0/8"``, ``"::1"``, ``"10.1.2.3"``).

    Raises ValueError naming the entry that is not a network.
    """

    def __init__(self, networks: Iterable[str] = ()) -> None:
        parsed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in networks:
            try:
                parsed.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not a network; use CIDR notation such as 10.0.0.0/8 or ::1"
                ) from None
        self.networks = tuple(parsed)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __repr__(self) -> str:
        return f"NetworkAllowlist({[str(n) for n in self.networks]!r})"

    def allows(self, address: str) -> bool:
        """True if ``address`` (an IP literal, IPv4-mapped IPv6 included) is in a network."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)
