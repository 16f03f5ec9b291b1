"""Helpers for server tests: raw protocol sockets and ``rdzv serve`` subprocesses."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from rdzv import wire
from tests.conftest import subprocess_env

VALIDATE = bytes.fromhex("00cef7853c")


class Raw:
    """A raw TCP connection speaking bytes, for protocol-level tests."""

    def __init__(self, port: int, host: str = "127.0.0.1", validate: bool = True) -> None:
        self.sock = socket.create_connection((host, port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if validate:
            self.send(VALIDATE)

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(bytes.fromhex(data) if isinstance(data, str) else data)

    def recv_exact(self, n: int, timeout: float = 5.0) -> bytes:
        self.sock.settimeout(timeout)
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} of {n} bytes: {out.hex()}")
            out += chunk
        return out

    def call(self, request: bytes | str, reply_len: int) -> bytes:
        self.send(request)
        return self.recv_exact(reply_len)

    def ping(self, nonce: int = 0x55) -> None:
        """Round trip a PING: proves every reply the server queued before it has arrived and
        no deferred reply is pending in between."""
        echo = self.call(wire.encode_ping(nonce), 4)
        assert echo == wire.reply_ping(nonce, False), f"expected the ping echo, got {echo.hex()}"

    def negotiate(self) -> None:
        reply = self.call(wire.encode_ping(wire.RDZV_PING_NONCE), 4)
        assert reply == wire.reply_ping(wire.RDZV_PING_NONCE, True)

    def assert_closed(self, timeout: float = 5.0) -> None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1)
        except ConnectionResetError:
            return
        assert data == b"", f"expected the server to close, got {data.hex()}"

    def close(self) -> None:
        self.sock.close()


def raw_get(port: int, key: bytes) -> bytes | None:
    """The value of wire key ``key`` (no prefix added), None when absent."""
    c = Raw(port)
    try:
        if c.call(wire.encode_keys(wire.Op.CHECK, [key]), 1) != b"\x00":
            return None
        n = int.from_bytes(c.call(wire.encode_key(wire.Op.GET, key), 8), "little")
        return c.recv_exact(n)
    finally:
        c.close()


def eventually(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` (bounded) until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def rdzv_serve(
    *extra: str, host: str = "127.0.0.1", env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Run ``rdzv serve --port 0`` in a subprocess (``env``: extra environment variables);
    yields (process, port)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdzv", "serve", "--host", host, "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(**(env or {})),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"rdzv serve did not start: {line!r} {err}")
        port = int(line.rsplit(":", 1)[1])
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
