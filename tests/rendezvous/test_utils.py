"""rdzv.rendezvous.utils: endpoint and config parsing, host matching (torch's utils_test and
the IPv6 rule)."""

from __future__ import annotations

import re
import socket

import pytest

from rdzv.rendezvous.utils import (
    matches_machine_hostname,
    parse_rendezvous_config,
    parse_rendezvous_endpoint,
)

CONFIG_FORMAT = (
    "The rendezvous configuration string must be in format <key1>=<value1>,...,<keyN>=<valueN>."
)


# --------------------------------------------------------------------------- config strings
def test_parse_rendezvous_config_returns_dict() -> None:
    config = parse_rendezvous_config(
        " b=str,c=2, e=a/b=c ,f=hello,  g = world ,h=/a/b/c  , i= ==x  "
    )
    assert config == {
        "b": "str",
        "c": "2",
        "e": "a/b=c",
        "f": "hello",
        "g": "world",
        "h": "/a/b/c",
        "i": "==x",
    }


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_parse_rendezvous_config_empty(text: str) -> None:
    assert parse_rendezvous_config(text) == {}


@pytest.mark.parametrize("text", ["a=1,", "a=1,,c=3", "a=1,  ,c=3", "=1", "a=1, =2", ","])
def test_parse_rendezvous_config_rejects_empty_keys(text: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(CONFIG_FORMAT)}$"):
        parse_rendezvous_config(text)


@pytest.mark.parametrize("text", ["a", "a=", "a= ", "b=2,a", "b=2,a= "])
def test_parse_rendezvous_config_rejects_empty_values(text: str) -> None:
    expected = "The rendezvous configuration option 'a' must have a value specified."
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        parse_rendezvous_config(text)


def test_parse_rendezvous_config_last_duplicate_wins() -> None:
    assert parse_rendezvous_config("a=1,a=2") == {"a": "2"}


# --------------------------------------------------------------------------- ports
# --------------------------------------------------------------------------- endpoints
@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("dummy.com:0", ("dummy.com", 0)),
        ("dummy.com:123", ("dummy.com", 123)),
        ("dummy.com:65535", ("dummy.com", 65535)),
        ("dummy-1.com:123", ("dummy-1.com", 123)),
        ("dummy_1:123", ("dummy_1", 123)),
        ("192.168.1.2:29500", ("192.168.1.2", 29500)),
        ("[2001:db8::1]:123", ("2001:db8::1", 123)),
        ("[::1]:0", ("::1", 0)),
        ("[::1]:65535", ("::1", 65535)),
        ("  host:90  ", ("host", 90)),
    ],
)
def test_parse_rendezvous_endpoint_returns_tuple(endpoint: str, expected: tuple[str, int]) -> None:
    assert parse_rendezvous_endpoint(endpoint, default_port=123) == expected


@pytest.mark.parametrize(
    ("endpoint", "host"),
    [
        ("dummy.com", "dummy.com"),
        ("192.168.1.2", "192.168.1.2"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[::1]", "::1"),
    ],
)
def test_parse_rendezvous_endpoint_default_port(endpoint: str, host: str) -> None:
    assert parse_rendezvous_endpoint(endpoint, default_port=4321) == (host, 4321)


@pytest.mark.parametrize(
    "endpoint",
    ["::1", "2001:db8::1", "fe80::1%eth0", "::ffff:127.0.0.1", "0:0:0:0:0:0:0:1"],
)
def test_unbracketed_ipv6_is_a_host_without_port(endpoint: str) -> None:
    # torch splits "::1" into (":", 1); rdzv reads two or more colons as an IPv6 address.
    assert parse_rendezvous_endpoint(endpoint, default_port=29400) == (endpoint, 29400)


@pytest.mark.parametrize("endpoint", [None, "", "   "])
def test_parse_rendezvous_endpoint_empty(endpoint: str | None) -> None:
    assert parse_rendezvous_endpoint(endpoint, default_port=123) == ("localhost", 123)


@pytest.mark.parametrize(
    "endpoint",
    [
        "~",
        "dummy.com :123",
        "~:123",
        ":123",
        "a b",
        "a:b:c",  # two colons but not an IPv6 address
        "[dummy.com]:123",  # brackets hold IPv6 addresses only
        "[::1",
        "[::1]x",
        "[::1]123",
        "[]:123",
    ],
)
def test_parse_rendezvous_endpoint_rejects_hosts(endpoint: str) -> None:
    expected = (
        f"The hostname of the rendezvous endpoint '{endpoint.strip()}' must be a dot-separated "
        "list of labels, an IPv4 address, or an IPv6 address."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        parse_rendezvous_endpoint(endpoint, default_port=123)


@pytest.mark.parametrize(
    "endpoint",
    ["dummy.com:", "dummy.com:abc", "dummy.com:-123", "dummy.com:-", "[::1]:", "[::1]:x"],
)
def test_parse_rendezvous_endpoint_rejects_ports(endpoint: str) -> None:
    expected = (
        f"The port number of the rendezvous endpoint '{endpoint}' must be an integer between "
        "0 and 65536."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        parse_rendezvous_endpoint(endpoint, default_port=123)


@pytest.mark.parametrize("endpoint", ["dummy.com:65536", "dummy.com:70000", "[::1]:99999"])
def test_parse_rendezvous_endpoint_rejects_big_ports(endpoint: str) -> None:
    with pytest.raises(ValueError, match="must be an integer between 0 and 65536"):
        parse_rendezvous_endpoint(endpoint, default_port=123)


# --------------------------------------------------------------------------- host matching
@pytest.mark.parametrize(
    "host",
    ["localhost", "127.0.0.1", "127.1.2.3", "::1", "0:0:0:0:0:0:0:1", "[::1]"],
)
def test_matches_machine_hostname_loopback(host: str) -> None:
    assert matches_machine_hostname(host)


def test_matches_machine_hostname_hostname() -> None:
    assert matches_machine_hostname(socket.gethostname())


def _canonical_names() -> list[str]:
    infos = socket.getaddrinfo(
        socket.gethostname(), None, proto=socket.IPPROTO_TCP, flags=socket.AI_CANONNAME
    )
    return [info[3] for info in infos if info[3]]


def test_matches_machine_hostname_fqdn() -> None:
    names = _canonical_names()
    assert names, "getaddrinfo(gethostname()) reported no canonical name"
    for name in names:
        assert matches_machine_hostname(name)


def test_matches_machine_hostname_every_address() -> None:
    infos = socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)
    assert infos
    for info in infos:
        assert matches_machine_hostname(str(info[4][0]))


@pytest.mark.parametrize("host", ["dummy", "0.0.0.0", "::2", "", "not a host", "a" * 300])
def test_matches_machine_hostname_false(host: str) -> None:
    assert not matches_machine_hostname(host)
