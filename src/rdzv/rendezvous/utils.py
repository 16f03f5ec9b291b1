"""Helpers shared by the rendezvous backends: endpoints, config strings, host matching.

Same names, semantics and error texts as ``torch.distributed.elastic.rendezvous.utils``
(``parse_rendezvous_endpoint``, ``_parse_rendezvous_config``, ``_matches_machine_hostname``),
public here, with one deliberate fix: an IPv6 literal written without brackets is a host.

Endpoint rule (:func:`parse_rendezvous_endpoint`):

* ``""`` / ``None`` / blanks: ``("localhost", default_port)``;
* ``"[v6]"`` or ``"[v6]:port"``: the bracketed IPv6 address, with or without a port;
* an endpoint with **two or more** colons and no brackets (``"::1"``, ``"2001:db8::1"``,
  ``"fe80::1%eth0"``) is an IPv6 address **without** a port: ``default_port`` applies. To give
  a port with an IPv6 address, use brackets (``"[::1]:29500"``), as in URLs (RFC 3986).
  torch splits on the last colon instead and turns ``"::1"`` into host ``":"``, port 1;
* otherwise ``"host"`` or ``"host:port"`` (split on the one colon).
"""

from __future__ import annotations

import ipaddress
import re
import socket

__all__ = [
    "matches_machine_hostname",
    "parse_rendezvous_config",
    "parse_rendezvous_endpoint",
]

_PORT_RE = re.compile(r"[0-9]{1,5}")
# Hostnames: word characters, dots, colons and dashes (torch's rule); IPv6 literals with a
# zone id (``%eth0``) are validated separately with :mod:`ipaddress`.
_HOST_RE = re.compile(r"[\w.:-]+")


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


def _try_parse_port(port_str: str) -> int | None:
    """The port in ``port_str`` if it is 1 to 5 ASCII digits (no sign, no blanks), else None.

    Values above 65535 are returned as is; callers check the range.
    """
    if _PORT_RE.fullmatch(port_str):
        return int(port_str)
    return None


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


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
    if endpoint is not None:
        endpoint = endpoint.strip()
    if not endpoint:
        return ("localhost", default_port)

    port_str: str | None = None
    if endpoint.startswith("["):
        # "[v6]" or "[v6]:port"; the bracketed part must be an IPv6 address.
        close = endpoint.find("]")
        host = endpoint[1:close] if close > 0 else endpoint
        rest = endpoint[close + 1 :] if close > 0 else ""
        if close < 0 or not _is_ipv6(host) or (rest and not rest.startswith(":")):
            raise _bad_host(endpoint)
        if rest:
            port_str = rest[1:]
    elif endpoint.count(":") >= 2:
        # An unbracketed IPv6 literal: all of it is the host.
        host = endpoint
        if not _is_ipv6(host):
            raise _bad_host(endpoint)
    else:
        host, sep, port_part = endpoint.partition(":")
        if sep:
            port_str = port_part

    if port_str is None:
        port = default_port
    else:
        parsed = _try_parse_port(port_str)
        if parsed is None or parsed >= 2**16:
            raise ValueError(
                f"The port number of the rendezvous endpoint '{endpoint}' must be an integer "
                "between 0 and 65536."
            )
        port = parsed

    if not (_HOST_RE.fullmatch(host) or _is_ipv6(host)):
        raise _bad_host(endpoint)
    return host, port


def _bad_host(endpoint: str) -> ValueError:
    return ValueError(
        f"The hostname of the rendezvous endpoint '{endpoint}' must be a dot-separated list of "
        "labels, an IPv4 address, or an IPv6 address."
    )


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
