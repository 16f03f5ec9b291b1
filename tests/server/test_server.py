"""Server life cycle: exact binding, IPv4/IPv6, port 0, accept-queue groups, adopted
sockets, shutdown."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rdzv.errors import NetworkError
from rdzv.server import DEFAULT_ACCEPT_QUEUES, ServerThread, raise_fd_limit
from tests.conftest import subprocess_env
from tests.server.helpers import Raw, rdzv_serve

_LINUX = sys.platform.startswith("linux")


def _listening_sockets(port: int) -> int:
    """How many TCP sockets of this machine listen on ``port`` (Linux /proc/net/tcp{,6})."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                count += 1
    return count


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


@pytest.mark.skipif(not _LINUX, reason="SO_REUSEPORT balances connections on Linux only")
def test_accept_queues_are_sockets_sharing_the_port() -> None:
    thread = ServerThread("127.0.0.1", 0, accept_queues=3).start()
    try:
        assert _listening_sockets(thread.port) == 3
        assert thread.server.endpoints == [f"127.0.0.1:{thread.port}"]  # one endpoint
        clients = [Raw(thread.port) for _ in range(24)]  # the kernel spreads them
        for client in clients:
            client.ping()
            client.close()
    finally:
        thread.stop()
    assert _listening_sockets(thread.port) == 0  # every socket of the group closed


@pytest.mark.skipif(not _LINUX, reason="SO_REUSEPORT balances connections on Linux only")
def test_default_accept_queues_and_one_socket_when_asked() -> None:
    default = ServerThread("127.0.0.1", 0).start()
    single = ServerThread("127.0.0.1", 0, accept_queues=1).start()
    try:
        assert _listening_sockets(default.port) == DEFAULT_ACCEPT_QUEUES > 1
        assert _listening_sockets(single.port) == 1
    finally:
        default.stop()
        single.stop()


def test_a_second_server_cannot_join_an_accept_queue_group() -> None:
    # The group's sockets share the port through SO_REUSEPORT; a second server of the same
    # user asking for the same port would join it and take half the connections, unless
    # the port is checked first: it gets EADDRINUSE like any bind to a port in use.
    thread = ServerThread("127.0.0.1", 0, accept_queues=4).start()
    try:
        with pytest.raises(NetworkError, match=rf"127\.0\.0\.1:{thread.port}.*EADDRINUSE"):
            ServerThread("127.0.0.1", thread.port, accept_queues=4).start()
        with pytest.raises(NetworkError, match="EADDRINUSE"):
            ServerThread("127.0.0.1", thread.port, accept_queues=1).start()
        if _LINUX:
            assert _listening_sockets(thread.port) == 4  # nothing joined
        Raw(thread.port).ping()
    finally:
        thread.stop()


def test_accept_queues_must_be_positive() -> None:
    with pytest.raises(ValueError, match="accept_queues must be >= 1, got 0"):
        ServerThread("127.0.0.1", 0, accept_queues=0).start()
    out = subprocess.run(
        [sys.executable, "-m", "rdzv", "serve", "--port", "0", "--accept-queues", "0"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "--accept-queues" in out.stderr and ">= 1" in out.stderr


@pytest.mark.skipif(not _LINUX, reason="SO_REUSEPORT balances connections on Linux only")
def test_rdzv_serve_accept_queues_flag() -> None:
    with rdzv_serve("--accept-queues", "2") as (_, port):
        assert _listening_sockets(port) == 2
        Raw(port).ping()


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
