"""Loopback ports for multi-process tests without bind-then-close races.

:func:`reserved_port` binds 127.0.0.1:0 with ``SO_REUSEADDR`` and keeps the socket open
(not listening) while the test runs: no other socket can take the port (an ephemeral bind
skips it, a plain bind gets EADDRINUSE), but a server that also sets ``SO_REUSEADDR`` -- as
rdzv's TCPStore server does -- can bind and listen on it.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def reserved_port(host: str = "127.0.0.1") -> Iterator[int]:
    """Yield a port of ``host`` that stays reserved until the block exits."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        yield int(sock.getsockname()[1])
