"""TLS for the store protocol: building stdlib :mod:`ssl` contexts for servers and clients.

A TLS server accepts only TLS connections: plain clients (torch's C++ client included, which
has no TLS) fail the handshake and are closed. Clients verify the server's certificate
against ``ca`` (or the system store) and its host name; servers may require client
certificates signed by their ``ca`` (mutual TLS). Minimum protocol version: TLS 1.2.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

__all__ = ["TLSConfig", "client_context", "server_context"]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class TLSConfig:
    """Client-side TLS settings (what ``TCPStore(tls=...)`` accepts besides an SSLContext).

    Attributes:
        ca: PEM file of the CA(s) that sign the server certificate; None: the system store.
        cert: PEM client certificate (chain) for servers that require one (mutual TLS).
        key: PEM private key of ``cert`` (None: the key is in ``cert``).
        server_hostname: the name to check the server certificate against; None: the host
            connected to (an IP address is checked against the certificate's IP SANs).
    """

    ca: PathLike | None = None
    cert: PathLike | None = None
    key: PathLike | None = None
    server_hostname: str | None = None


def _load(what: str, action: str, fn: object, *args: object) -> None:
    try:
        fn(*args)  # type: ignore[operator]
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the TLS {what} ({action}): {exc}") from exc


def client_context(tls: ssl.SSLContext | TLSConfig) -> tuple[ssl.SSLContext, str | None]:
    """``(context, server_hostname)`` for a client; an SSLContext is used as given.

    Raises ValueError naming the file when a certificate, key or CA cannot be loaded.
    """
    if isinstance(tls, ssl.SSLContext):
        return tls, None
    if tls.ca is None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # the system store
    else:
        # Only the given CA (loading the system store too costs ~10 ms per context).
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        _load("CA", f"ca={tls.ca}", ctx.load_verify_locations, tls.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert is not None:
        _load("certificate", f"cert={tls.cert}", ctx.load_cert_chain, tls.cert, tls.key)
    return ctx, tls.server_hostname


def server_context(
    cert: PathLike,
    key: PathLike | None = None,
    ca: PathLike | None = None,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    """A server context presenting ``cert``/``key``; with ``ca``, client certificates signed
    by it are verified when offered, and required with ``require_client_cert``.

    Raises ValueError naming the file when it cannot be loaded, or for
    ``require_client_cert`` without ``ca``.
    """
    if require_client_cert and ca is None:
        raise ValueError("require_client_cert needs a CA to verify client certificates (ca=)")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load("certificate", f"cert={cert}", ctx.load_cert_chain, cert, key)
    if ca is not None:
        _load("CA", f"ca={ca}", ctx.load_verify_locations, ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx
