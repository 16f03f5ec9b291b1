"""``rdzv serve``: a standalone server process."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from rdzv.store.tcp import TCPStore
from tests.conftest import subprocess_env
from tests.server.helpers import rdzv_serve


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_prints_endpoint_logs_and_exits_cleanly(sig: signal.Signals) -> None:
    with rdzv_serve() as (proc, port):
        store = TCPStore("127.0.0.1", port, timeout=5)
        store.set("k", b"v")
        assert store.get("k") == b"v"
        store.close()
        proc.send_signal(sig)
        assert proc.wait(10) == 0
        assert proc.stderr is not None
        log = proc.stderr.read()
    assert f"listening on 127.0.0.1:{port}" in log
    assert "connection from 127.0.0.1:" in log
    assert "shutting down" in log


def test_serve_logs_protocol_violations() -> None:
    import socket

    with rdzv_serve() as (proc, port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"hello")
            assert sock.recv(1) == b""
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        log = proc.stderr.read()
    assert "first request must be VALIDATE" in log


def test_serve_reports_a_busy_port() -> None:
    with rdzv_serve() as (_, port):
        out = subprocess.run(
            [sys.executable, "-m", "rdzv", "serve", "--port", str(port)],
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert out.returncode == 1
    assert f"127.0.0.1:{port}" in out.stderr
    assert "EADDRINUSE" in out.stderr


def test_serve_without_extensions_behaves_like_torch() -> None:
    with rdzv_serve("--no-extensions", "--quiet") as (_, port):
        assert TCPStore("127.0.0.1", port, timeout=5).extensions is False
