"""Server life cycle: exact binding, IPv4/IPv6, port 0, adopted sockets, shutdown."""

from __future__ import annotations

import socket

import pytest

from rdzv.errors import NetworkError
from rdzv.server import ServerThread, raise_fd_limit
from tests.server.helpers import Raw


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_binds_exactly_the_given_ipv4_host() -> None:
    thread = ServerThread("127.0.0.1", 0).start()
    try:
        assert thread.server.endpoints == [f"127.0.0.1:{thread.port}"]
        Raw(thread.port).ping()
        # Not reachable through another loopback address: no wildcard bind.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.2", thread.port), timeout=2).close()
    finally:
        thread.stop()


@pytest.mark.skipif(not _ipv6(), reason="the kernel has no IPv6 loopback")
def test_ipv6_loopback() -> None:
    thread = ServerThread("::1", 0).start()
    try:
        assert thread.server.endpoints == [f"[::1]:{thread.port}"]
        Raw(thread.port, host="::1").ping()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", thread.port), timeout=2).close()
    finally:
        thread.stop()


def test_port_in_use_is_a_clear_network_error() -> None:
    thread = ServerThread("127.0.0.1", 0).start()
    try:
        with pytest.raises(NetworkError, match=rf"127\.0\.0\.1:{thread.port}.*EADDRINUSE"):
            ServerThread("127.0.0.1", thread.port).start()
        Raw(thread.port).ping()
    finally:
        thread.stop()


def test_unresolvable_host() -> None:
    with pytest.raises(NetworkError, match="does not resolve"):
        ServerThread("no-such-host.invalid", 0).start()


def test_adopts_a_prebound_socket() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = ServerThread(sock=sock).start()
    try:
        assert thread.port == port
        Raw(port).ping()
    finally:
        thread.stop()


def test_graceful_shutdown_closes_clients() -> None:
    thread = ServerThread("127.0.0.1", 0).start()
    c = Raw(thread.port)
    c.send(bytes.fromhex("06010000000000000002000000000000002f6e"))  # WAIT [/n], pending
    c.ping()
    thread.stop()
    c.assert_closed()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", thread.port), timeout=2).close()


def test_fd_limit_is_raised_to_the_hard_limit() -> None:
    limits = raise_fd_limit()
    assert limits is not None
    soft, hard = limits
    assert soft == hard or hard == -1
