"""rdzv.endpoint: the one rule every endpoint is read and written with."""

from __future__ import annotations

import re

import pytest

from rdzv.endpoint import (
    EndpointError,
    check_endpoint,
    connect_host,
    format_endpoint,
    parse_endpoint,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("h:1", ("h", 1)),
        ("  h.example-1_x:65535 ", ("h.example-1_x", 65535)),
        ("10.0.0.1:00080", ("10.0.0.1", 80)),
        ("[::1]:29500", ("::1", 29500)),
        ("[fe80::1%eth0]:5", ("fe80::1%eth0", 5)),
        ("h", ("h", 7)),
        ("[::1]", ("::1", 7)),
        ("::1", ("::1", 7)),  # unbracketed IPv6: no port (torch would read host ":", port 1)
        ("2001:db8::1:80", ("2001:db8::1:80", 7)),
    ],
)
def test_parse(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text, 7) == expected


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ("", "host", "empty"),
        (":5", "host", "empty"),
        ("h~x:5", "host", "not a host name"),
        ("a b:5", "host", "not a host name"),
        ("[::1:5", "host", "unbalanced"),
        ("[::1]x", "host", "unbalanced"),
        ("[h]:5", "host", "not an IPv6 address"),
        ("a:b:c", "host", "bracket it"),
        ("h:", "port", "1..65535"),
        ("h:x", "port", "1..65535"),
        ("h:0", "port", "1..65535"),
        ("h:65536", "port", "1..65535"),
        ("h:123456", "port", "1..65535"),
        ("h:+1", "port", "1..65535"),
        ("h: 1", "port", "1..65535"),
        ("h:\u0661\u0662", "port", "1..65535"),  # non-ASCII digits
    ],
)
def test_errors_name_the_endpoint_and_the_part(text: str, field: str, reason: str) -> None:
    with pytest.raises(EndpointError, match=re.escape(reason)) as info:
        parse_endpoint(text, 7)
    assert info.value.field == field
    assert repr(text) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_port_required_without_default_and_min_port() -> None:
    with pytest.raises(EndpointError, match="no port") as info:
        parse_endpoint("h")
    assert info.value.field == "port"
    assert parse_endpoint("h:0", min_port=0) == ("h", 0)


@pytest.mark.parametrize(("host", "port"), [("h", 1), ("10.0.0.1", 80), ("::1", 2), ("fe80::1", 3)])
def test_format_reads_back(host: str, port: int) -> None:
    text = format_endpoint(host, port)
    assert text == (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    assert parse_endpoint(text) == (host, port)


def test_check_endpoint_and_connect_host() -> None:
    assert check_endpoint("h", 0) == ("h", 0)
    with pytest.raises(TypeError, match="host_name must be a str"):
        check_endpoint(1, 2)
    with pytest.raises(TypeError, match="port must be an int"):
        check_endpoint("h", True)
    with pytest.raises(ValueError, match=re.escape("0..65535")):
        check_endpoint("h", 65536)
    assert [connect_host(h) for h in ("", "0.0.0.0", "::", "h")] == [
        "127.0.0.1",
        "127.0.0.1",
        "::1",
        "h",
    ]
