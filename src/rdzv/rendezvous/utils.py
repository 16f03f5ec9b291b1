"""Helpers shared by the rendezvous backends: endpoints, config strings, host matching.

Same names, semantics and error texts as ``torch.distributed.elastic.rendezvous.utils``
(``parse_rendezvous_endpoint``, ``_parse_rendezvous_config``, ``_matches_machine_hostname``),
public here, with one deliberate fix: an IPv6 literal written without brackets is a host.

Endpoint rule (:func:`parse_rendezvous_endpoint`): :mod:`rdzv.endpoint`'s (``"[v6]:port"``;
an unbracketed IPv6 address has no port), with ``""`` / ``None`` / blanks meaning
``("localhost", default_port)``, port 0 accepted and torch's error texts.
"""

from __future__ import annotations

import ipaddress
import socket

from rdzv.endpoint import EndpointError, parse_endpoint

__all__ = [
    "matches_machine_hostname",
    "parse_rendezvous_config",
    "parse_rendezvous_endpoint",
]


def parse_rendezvous_config(config_str: str) -> dict[str, str]:
    """Parse ``"<key1>=<value1>,...,<keyN>=<valueN>"`` (torchrun's ``--rdzv-conf``) to a dict.

    Surrounding whitespace of the string, keys and values is removed; a value may contain
    ``=`` and ``/`` (only the first ``=`` of an item separates key and value); all values are
    strings; a blank string gives ``{}``; a repeated key keeps its last value.

    Raises ValueError (torch's texts) for an empty key (``"=v"``, ``"a=1,"``, ``"a=1,,b=2"``):
    "The rendezvous configuration string must be in format <key1>=<value1>,...,<keyN>=<valueN>.",
    and for a missing or empty value (``"a"``, ``"a="``): "The rendezvous configuration option
    'a' must have a value specified."
    """
    config: dict[str, str] = {}
    config_str = config_str.strip()
    if not config_str:
        return config
    for item in config_str.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not key:
            raise ValueError(
                "The rendezvous configuration string must be in format "
                "<key1>=<value1>,...,<keyN>=<valueN>."
            )
        value = value.strip()
        if not sep or not value:
            raise ValueError(
                f"The rendezvous configuration option '{key}' must have a value specified."
            )
        config[key] = value
    return config


def parse_rendezvous_endpoint(endpoint: str | None, default_port: int) -> tuple[str, int]:
    """Split a rendezvous endpoint ``<host>[:<port>]`` into ``(host, port)``.

    Args:
        endpoint: ``host``, ``host:port``, ``[ipv6]``, ``[ipv6]:port`` or an unbracketed IPv6
            address (which never carries a port; see the module docstring). Surrounding
            whitespace is ignored; ``None`` or blank means ``localhost``.
        default_port: the port when the endpoint has none (any int, e.g. ``-1`` as "absent").

    Returns:
        ``(host, port)``; an IPv6 host is returned without brackets.

    Raises:
        ValueError: "The port number of the rendezvous endpoint '<endpoint>' must be an integer
            between 0 and 65536." when the port is not 1-5 digits or is >= 65536 (65536 itself
            is refused; the text is torch's); "The hostname of the rendezvous endpoint
            '<endpoint>' must be a dot-separated list of labels, an IPv4 address, or an IPv6
            address." when the host is empty or contains other characters (blanks, ``~``), or
            when brackets hold something that is not an IPv6 address.
    """
    if endpoint is None or not endpoint.strip():
        return ("localhost", default_port)
    endpoint = endpoint.strip()
    try:
        return parse_endpoint(endpoint, default_port, min_port=0)
    except EndpointError as exc:
        if exc.field == "port":
            raise ValueError(
                f"The port number of the rendezvous endpoint '{endpoint}' must be an integer "
                "between 0 and 65536."
            ) from None
        raise ValueError(
            f"The hostname of the rendezvous endpoint '{endpoint}' must be a dot-separated "
            "list of labels, an IPv4 address, or an IPv6 address."
        ) from None


def _addresses(host: str) -> list[tuple[str, str]]:
    """``(canonical name, address)`` for each TCP address of ``host``; [] if it does not
    resolve."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP, flags=socket.AI_CANONNAME)
    except (OSError, UnicodeError, ValueError):
        return []
    return [(info[3], str(info[4][0])) for info in infos]


def matches_machine_hostname(host: str) -> bool:
    """Whether ``host`` names this machine (same rule as torch's ``_matches_machine_hostname``).

    True for ``localhost``, any loopback address (``127.0.0.0/8``, ``::1`` in any spelling,
    with or without brackets), :func:`socket.gethostname`, the canonical name (FQDN) that
    ``getaddrinfo(gethostname())`` reports, or when ``host`` and this machine's hostname
    resolve to a common address. False otherwise (``0.0.0.0``, ``::2``, unknown names).
    Resolution failures count as "no match" and are never raised. May give false negatives
    for names known only through CNAMEs or addresses of secondary NICs not bound to the
    hostname.
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if addr is not None and addr.is_loopback:
        return True
    this_host = socket.gethostname()
    if host == this_host:
        return True
    host_ips = {ip for _, ip in _addresses(host)}
    for canonical, ip in _addresses(this_host):
        if canonical and canonical == host:
            return True
        if (addr is not None and ip == str(addr)) or ip in host_ips:
            return True
    return False
