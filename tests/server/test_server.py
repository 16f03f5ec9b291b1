"""Server life cycle: exact binding, IPv4/IPv6, port 0, accept-queue groups, adopted
sockets, shutdown."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rdzv.errors import NetworkError
from rdzv.server import DEFAULT_ACCEPT_QUEUES, ServerThread, listeners, raise_fd_limit
from rdzv.server.listeners import port_lock
from tests.conftest import subprocess_env
from tests.ports import reserved_port
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


def _another_thread_in(function: str, timeout: float = 10.0) -> bool:
    """Whether a thread other than this one is (or gets, within ``timeout`` seconds) inside
    ``function``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ident, frame in sys._current_frames().items():
            if ident == threading.get_ident():
                continue
            walk = frame
            while walk is not None:
                if walk.f_code.co_name == function:
                    return True
                walk = walk.f_back
        time.sleep(0.001)
    return False


@pytest.mark.skipif(not _LINUX, reason="SO_REUSEPORT balances connections on Linux only")
def test_a_server_binding_at_the_same_moment_cannot_join_the_group() -> None:
    # Agents of one host race to host a rendezvous endpoint, each falling back to a client
    # when the port is taken (torchrun --nnodes 1:2). Server A is caught between its port
    # check and its listen: its SO_REUSEPORT socket bound, not listening yet. Server B's
    # ordinary bind would pass then (nothing listens) and its group would join A's: both
    # would serve, splitting the clients. The bind lock, held by A until it listens, makes
    # B check after A listens: EADDRINUSE.
    with reserved_port() as port:
        outcome: list[BaseException | ServerThread] = []

        def server_b() -> None:
            try:
                outcome.append(ServerThread("127.0.0.1", port).start())
            except BaseException as exc:
                outcome.append(exc)

        with port_lock(port):  # server A's binds
            group_a = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            group_a.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            group_a.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            group_a.bind(("127.0.0.1", port))
            b = threading.Thread(target=server_b)
            b.start()
            waited = _another_thread_in("port_lock")  # B, waiting for A
            group_a.listen(16)
        b.join(timeout=30)
        try:
            assert waited, f"server B did not wait for the bind lock: {outcome}"
            assert len(outcome) == 1 and isinstance(outcome[0], NetworkError), outcome
            assert "EADDRINUSE" in str(outcome[0])
            assert _listening_sockets(port) == 1  # A's alone
        finally:
            group_a.close()
            for started in outcome:
                if isinstance(started, ServerThread):
                    started.stop()


@pytest.mark.skipif(not _LINUX, reason="SO_REUSEPORT balances connections on Linux only")
def test_port_0_takes_another_port_when_the_proposed_one_is_taken_before_the_lock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With port 0 the kernel proposes a free port, which another server may take before
    # the lock is ours: the locked check refuses it and the group is formed on another.
    taken: list[socket.socket] = []
    real_lock = listeners.port_lock

    def lock_after_another_server_took_it(port: int) -> contextlib.AbstractContextManager[None]:
        if not taken:
            other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            other.bind(("127.0.0.1", port))
            other.listen(1)
            taken.append(other)
        return real_lock(port)

    monkeypatch.setattr(listeners, "port_lock", lock_after_another_server_took_it)
    socks = listeners.listen("127.0.0.1", 0, 3)
    try:
        ports = {sock.getsockname()[1] for sock in socks}
        assert len(socks) == 3 and len(ports) == 1
        assert ports != {taken[0].getsockname()[1]}
        assert _listening_sockets(taken[0].getsockname()[1]) == 1  # the other server's alone
    finally:
        for sock in [*socks, *taken]:
            sock.close()


def test_port_lock_held_elsewhere_times_out_with_a_clear_error() -> None:
    with reserved_port() as port:
        pattern = rf"port {port}: another process .*bind lock"
        with (
            port_lock(port),
            pytest.raises(NetworkError, match=pattern),
            port_lock(port, timeout=0.05),
        ):
            pass
        with port_lock(port, timeout=0.05):  # released when its holder leaves the block
            pass


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
