"""Endpoints (``host:port``): one rule to read them and one to write them, for every place
that takes one: TCPStore (client and server), the rendezvous endpoint (``--rdzv-endpoint``),
etcd endpoints, ``rdzv store`` and ``rdzv status``.

Reading (:func:`parse_endpoint`):

* ``host`` or ``host:port``: a host name (letters, digits, ``_``, ``.``, ``-``) or an IPv4
  address, split on its one colon;
* ``[v6]`` or ``[v6]:port``: an IPv6 address in brackets, as in URLs (RFC 3986);
* an endpoint with **two or more** colons and no brackets (``::1``, ``2001:db8::1``,
  ``fe80::1%eth0``) is an IPv6 address **without** a port. torch splits on the last colon
  instead and reads ``::1`` as host ``:``, port 1; write ``[::1]:29500`` to give a port;
* a port is 1 to 5 ASCII digits in ``min_port..65535``; without one, ``default_port``
  applies (required when there is none).

Writing (:func:`format_endpoint`): ``host:port`` with IPv6 addresses bracketed, which
:func:`parse_endpoint` reads back unchanged.

This module sits below the client and the server (it imports nothing of rdzv).
"""

from __future__ import annotations

import ipaddress
import re

__all__ = [
    "EndpointError",
    "check_endpoint",
    "connect_host",
    "format_endpoint",
    "parse_endpoint",
]

#: Host names: word characters, dots and dashes (torch's rule for rendezvous endpoints).
_NAME = re.compile(r"[\w.-]+")
_PORT = re.compile(r"[0-9]{1,5}")
#: Where a client reaches a server bound to a wildcard address (see :func:`connect_host`).
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


class EndpointError(ValueError):
    """A malformed endpoint. ``field`` names the part that is wrong (``"host"`` or
    ``"port"``), ``reason`` says what is wrong with it; the message names the endpoint."""

    def __init__(self, endpoint: str, field: str, reason: str) -> None:
        super().__init__(f"bad endpoint {endpoint!r}: {reason}")
        self.endpoint = endpoint
        self.field = field
        self.reason = reason


def format_endpoint(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed (``[::1]:29500``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def parse_endpoint(
    endpoint: str, default_port: int | None = None, *, min_port: int = 1
) -> tuple[str, int]:
    """Split ``endpoint`` (see the module docstring for the forms) into ``(host, port)``.

    Args:
        endpoint: ``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or an unbracketed IPv6
            address (never with a port). Surrounding whitespace is ignored.
        default_port: the port when ``endpoint`` has none (any int, e.g. ``-1`` for
            "absent"); None: a port is required.
        min_port: the lowest port accepted (1; 0 where "any free port" makes sense).

    Returns:
        ``(host, port)``; an IPv6 host without brackets.

    Raises:
        EndpointError (a ValueError): the host is empty, is not a host name or IP address,
        or brackets hold something else than an IPv6 address (``field="host"``); the port is
        missing while required, not 1-5 digits or outside ``min_port..65535``
        (``field="port"``). The message names the endpoint and the rule.
    """
    text = endpoint.strip()
    port_text: str | None = None
    if text.startswith("["):
        close = text.find("]")
        host, rest = (text[1:close], text[close + 1 :]) if close > 0 else (text, "")
        if close < 0 or (rest and not rest.startswith(":")):
            raise EndpointError(endpoint, "host", "unbalanced [ ] around the IPv6 address")
        if not _is_ipv6(host):
            raise EndpointError(endpoint, "host", f"{host!r} in brackets is not an IPv6 address")
        if rest:
            port_text = rest[1:]
    elif text.count(":") >= 2:
        host = text  # an IPv6 address without a port
        if not _is_ipv6(host):
            raise EndpointError(
                endpoint,
                "host",
                "not an IPv6 address (to give a port with one, bracket it: [::1]:29500)",
            )
    else:
        host, sep, port_part = text.partition(":")
        if sep:
            port_text = port_part
        if not host:
            raise EndpointError(endpoint, "host", "the host is empty")
        if not _NAME.fullmatch(host):
            raise EndpointError(
                endpoint, "host", f"{host!r} is not a host name, an IPv4 or an IPv6 address"
            )
    if port_text is None:
        if default_port is None:
            raise EndpointError(endpoint, "port", "no port: write HOST:PORT (e.g. [::1]:29500)")
        return host, default_port
    if not _PORT.fullmatch(port_text) or not min_port <= int(port_text) <= 65535:
        raise EndpointError(
            endpoint, "port", f"the port must be a number in {min_port}..65535, got {port_text!r}"
        )
    return host, int(port_text)


def check_endpoint(host_name: object, port: object) -> tuple[str, int]:
    """Validate a ``(host_name, port)`` pair as TCPStore takes it: TypeError when
    ``host_name`` is not a str or ``port`` not an int, ValueError when ``port`` is outside
    0..65535 (0: any free port, for a server)."""
    if not isinstance(host_name, str):
        raise TypeError(f"host_name must be a str, got {type(host_name).__name__}")
    if not isinstance(port, int) or isinstance(port, bool):
        raise TypeError(f"port must be an int, got {type(port).__name__}: {port!r}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    return host_name, port


def connect_host(host_name: str) -> str:
    """Where a client reaches a server bound to ``host_name``: the loopback address of its
    family for a wildcard (``""``, ``0.0.0.0``, ``::``), else ``host_name`` itself."""
    return _WILDCARDS.get(host_name, host_name)
