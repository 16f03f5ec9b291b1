"""The server's listening sockets: resolving the host to addresses, binding each address (one
socket, or an accept-queue group sharing the port through SO_REUSEPORT) and listening.

A group is bound under a per-port lock held until its sockets listen. Without it, two servers
started at the same moment on the same port (two agents of one host racing to host a
rendezvous endpoint, each falling back to a client when the port is taken) both pass the
check that the port is free, and the second one's SO_REUSEPORT sockets join the first one's
group: both believe they serve, and the kernel splits the clients between them."""

from __future__ import annotations

import contextlib
import errno
import socket
import sys
import time
from collections.abc import Iterator

from rdzv.endpoint import format_endpoint
from rdzv.errors import NetworkError

__all__ = [
    "DEFAULT_ACCEPT_QUEUES",
    "LISTEN_BACKLOG",
    "LISTEN_FAILED",
    "PORT_LOCK_TIMEOUT",
    "REUSEPORT_BALANCES",
    "listen",
    "port_lock",
]

#: Listen backlog requested; the kernel caps it at ``net.core.somaxconn`` (torch asks for the
#: system maximum too).
LISTEN_BACKLOG = 65535
#: Default of ``accept_queues``: listening sockets per address. A burst of simultaneous
#: connects beyond one accept queue (``net.core.somaxconn``, often 4096) has SYNs dropped,
#: and each costs its client a retransmit one second later (measured: a 15,000-rank init
#: storm lost a second in 4 of 9 trials with one queue, in none of 23 with four;
#: docs/performance.md).
DEFAULT_ACCEPT_QUEUES = 4
#: Whether several listening sockets can share a port with the kernel spreading the
#: connections over them (Linux's SO_REUSEPORT; other systems' option does not balance).
REUSEPORT_BALANCES = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")
#: torch's sentence for a server that cannot bind; rdzv's detail follows it.
LISTEN_FAILED = "The server socket has failed to listen on any local network address."
#: Seconds a server waits for another process's hold on a port's bind lock (a hold lasts
#: the few binds and listens of one server's start, well under a millisecond).
PORT_LOCK_TIMEOUT = 10.0
#: Attempts at an ephemeral port (port 0) for a group, when another server takes the port
#: the kernel proposed between the proposal and the lock.
_EPHEMERAL_ATTEMPTS = 8


def listen(host: str, port: int, accept_queues: int) -> list[socket.socket]:
    """Listening TCP sockets (non-blocking, backlog :data:`LISTEN_BACKLOG`) for ``host`` and
    ``port``: for each address ``host`` resolves to (``""``: the IPv6 and IPv4 wildcards),
    ``accept_queues`` sockets sharing the port when :data:`REUSEPORT_BALANCES` (Linux),
    otherwise one. Port 0 picks one free port, shared by every address and socket.

    A group is formed only on a port that nothing holds: an ordinary bind checks the port
    first (any holder refuses it with EADDRINUSE, another server's group included), and the
    check, the group's binds and their listens happen under :func:`port_lock`, so two servers
    racing for one port never both pass the check.

    Raises:
        ValueError: ``port`` outside 0..65535 or ``accept_queues < 1``.
        NetworkError: the host does not resolve, a bind or listen fails (the message names
            the endpoint and the OS error, e.g. EADDRINUSE), or the port's lock stays held
            by another process for :data:`PORT_LOCK_TIMEOUT` seconds.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    if accept_queues < 1:
        raise ValueError(f"accept_queues must be >= 1, got {accept_queues}")
    group = accept_queues if REUSEPORT_BALANCES else 1
    socks: list[socket.socket] = []
    try:
        for fam, addr in _addresses(host, port):
            if group == 1:
                socks.append(_listening(fam, addr, port, host, reuse_port=False))
                port = socks[-1].getsockname()[1]  # with port 0, the next address shares it
            else:
                port = _listen_group(fam, addr, port, host, group, socks)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


@contextlib.contextmanager
def port_lock(port: int, timeout: float = PORT_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the machine-wide (network namespace-wide) lock on binding TCP ``port``: a
    Linux abstract Unix socket named after the port, which the kernel releases when its
    holder exits, however it exits. Waits for another holder up to ``timeout`` seconds.

    Raises:
        NetworkError: the lock is still held after ``timeout`` seconds (a stuck process of
            this machine holds it; stop it, or pick another port).
    """
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        name = f"\0rdzv.bind.tcp.{port}"
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            try:
                lock.bind(name)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                if time.monotonic() >= deadline:
                    raise NetworkError(
                        f"{LISTEN_FAILED} Cannot bind port {port}: another process of this "
                        f"machine has held rdzv's bind lock on it for {timeout:g} s (the "
                        "abstract Unix socket @" + name[1:] + "); stop that process or pick "
                        "another port"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        yield
    finally:
        lock.close()


def _listen_group(
    family: int, addr: str, port: int, host: str, group: int, socks: list[socket.socket]
) -> int:
    """Append ``group`` listening sockets sharing ``port`` (0: a free one) on ``addr`` to
    ``socks``; returns the port."""
    for attempt in range(_EPHEMERAL_ATTEMPTS if port == 0 else 1):
        candidate = port
        if port == 0:  # the kernel proposes a free port; the check below, locked, decides
            with _bound(family, addr, 0, host, reuse_port=False) as probe:
                candidate = probe.getsockname()[1]
        with port_lock(candidate):
            try:
                # An ordinary bind fails when anything holds the port, an SO_REUSEPORT group
                # of the same user (another rdzv server) included, which ours would join.
                _bound(family, addr, candidate, host, reuse_port=False).close()
            except NetworkError:
                if port == 0 and attempt + 1 < _EPHEMERAL_ATTEMPTS:
                    continue  # taken between the proposal and the lock: another proposal
                raise
            for _ in range(group):
                socks.append(_listening(family, addr, candidate, host, reuse_port=True))
        return candidate
    raise AssertionError("unreachable: the last attempt returns or raises")


def _addresses(host: str, port: int) -> list[tuple[int, str]]:
    """The (family, address) pairs to listen on for ``host``, without duplicates."""
    if host == "":
        wildcards = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
        return [(fam, addr) for fam, addr in wildcards if _has_family(fam)]
    try:
        infos = socket.getaddrinfo(
            host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise NetworkError(
            f"{LISTEN_FAILED} Cannot listen on {format_endpoint(host, port)}: the host name "
            f"does not resolve ({exc}); pass an IP address or a resolvable name"
        ) from exc
    addrs: list[tuple[int, str]] = []
    for info in infos:
        entry = (int(info[0]), str(info[4][0]))
        if entry not in addrs:
            addrs.append(entry)
    return addrs


def _listening(family: int, addr: str, port: int, host: str, reuse_port: bool) -> socket.socket:
    """:func:`_bound`, then listening (non-blocking)."""
    sock = _bound(family, addr, port, host, reuse_port)
    try:
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _bind_error(addr, port, exc) from exc
    return sock


def _bound(family: int, addr: str, port: int, host: str, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to ``(addr, port)`` (not listening yet), in an SO_REUSEPORT group
    with ``reuse_port``; NetworkError naming the endpoint and the OS error when the bind
    fails."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host == "":
            # "" binds both families explicitly: keep the IPv6 socket IPv6-only.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((addr, port))
        except OSError as exc:
            raise _bind_error(addr, port, exc) from exc
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_error(addr: str, port: int, exc: OSError) -> NetworkError:
    name = errno.errorcode.get(exc.errno or 0, "?")
    return NetworkError(
        f"{LISTEN_FAILED} Cannot listen on {format_endpoint(addr, port)}: {exc.strerror} "
        f"({name}); pick another port or stop the process using it"
    )


def _has_family(family: int) -> bool:
    try:
        socket.socket(family, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True
