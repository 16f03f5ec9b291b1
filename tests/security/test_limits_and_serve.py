"""Server limits (connections, parked waits, sizes) and ``rdzv serve``'s secure defaults."""

from __future__ import annotations

import logging
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rdzv import auth, wire
from rdzv.errors import AuthError, ConnectionLimitError, NetworkError
from rdzv.server import ServerThread
from rdzv.store.tcp import TCPStore
from rdzv.tls import TLSConfig
from tests.conftest import subprocess_env
from tests.security.certs import Certs
from tests.server.helpers import Raw, eventually, rdzv_serve

TOKEN = b"serve-token-for-the-cli-tests-0123"


@pytest.fixture(autouse=True)
def _setup(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    caplog.set_level(logging.INFO, logger="rdzv.server")


def test_connection_limit(caplog: pytest.LogCaptureFixture) -> None:
    thread = ServerThread(max_connections=2).start()
    try:
        first, second = Raw(thread.port), Raw(thread.port)
        first.ping()
        second.ping()
        third = Raw(thread.port, validate=False)
        third.assert_closed()
        eventually(lambda: "connection limit reached" in caplog.text, what="the log")
        assert "max_connections=2" in caplog.text
        first.ping()  # the others are unaffected
        first.close()
        eventually(lambda: thread.server.num_connections == 1, what="the close")
        fourth = Raw(thread.port)
        fourth.ping()  # a freed slot is reusable
    finally:
        thread.stop()


def test_parked_wait_limit(caplog: pytest.LogCaptureFixture) -> None:
    thread = ServerThread(max_waits_per_connection=2).start()
    try:
        c = Raw(thread.port)
        for i in range(2):
            c.send(wire.encode_keys(wire.Op.WAIT, [b"/missing%d" % i]))
        c.ping()  # two parked waits are fine
        c.send(wire.encode_keys(wire.Op.WAIT, [b"/missing2"]))
        c.assert_closed()
        eventually(lambda: "pending-wait limit exceeded" in caplog.text, what="the log")
        assert "closing connection from 127.0.0.1:" in caplog.text
        assert "max_waits_per_connection=2" in caplog.text
    finally:
        thread.stop()


def test_limit_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="max_connections must be >= 1"):
        ServerThread(max_connections=0).start()
    with pytest.raises(ValueError, match="max_value_bytes must be an integer >= 1, got -5"):
        wire.Limits(max_value_bytes=-5)
    with pytest.raises(ValueError, match="request_timeout must be > 0"):
        ServerThread(request_timeout=0).start()


def _serve_fails(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rdzv", "serve", "--port", "0", *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_serve_refuses_a_public_address_without_a_token() -> None:
    out = _serve_fails("--host", "0.0.0.0")
    assert out.returncode == 2
    assert "refusing to listen on '0.0.0.0' without authentication" in out.stderr
    assert "--token-file" in out.stderr and "--insecure" in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--tls-ca", "ca.pem"), "need --tls-cert"),
        (("--allow-unauthenticated", "127.0.0.0/8"), "only makes sense with a token"),
        (("--token-file", "/nonexistent/token"), "cannot read the token file"),
        (("--host", "256.1.1.1"), "--host '256.1.1.1' is not an IP address or a host name"),
        (("--host", "no-such-host.invalid"), "'no-such-host.invalid' is not an IP address"),
        (("--max-value-bytes", "-5"), "argument --max-value-bytes: must be an integer >= 1"),
        (("--max-key-bytes", "0"), "argument --max-key-bytes: must be an integer >= 1"),
        (("--request-timeout", "0"), "argument --request-timeout: must be a number > 0"),
        (("--max-partial-bytes", "x"), "argument --max-partial-bytes: must be an integer"),
        (("--port", "70000"), "argument --port: must be a TCP port"),
    ],
)
def test_serve_configuration_errors(args: tuple[str, ...], message: str) -> None:
    out = _serve_fails(*args)
    assert out.returncode == 2
    assert message in out.stderr


def test_serve_with_token_tls_and_limits(tmp_path: Path, certs: Certs) -> None:
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN)
    args = (
        "--token-file",
        str(token_file),
        "--tls-cert",
        str(certs.server.cert),
        "--tls-key",
        str(certs.server.key),
        "--max-value-bytes",
        "16",
    )
    tls = TLSConfig(ca=certs.ca)
    with rdzv_serve(*args) as (proc, port):
        with TCPStore("127.0.0.1", port, token=TOKEN, tls=tls, timeout=5) as store:
            store.set("k", b"x" * 16)
            with pytest.raises(NetworkError):  # set is fire-and-forget: the next call sees it
                store.set("big", b"x" * 17)
                store.get("k")
        with pytest.raises(AuthError, match="requires authentication"):
            TCPStore("127.0.0.1", port, tls=tls, timeout=5)
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        log = proc.stderr.read()
        assert proc.stdout is not None
        out = proc.stdout.read()
    assert "authentication: token; tls: on" in out
    assert "value of 17 bytes exceeds the limit of 16 bytes" in log
    assert "authenticated" in log


def test_serve_loopback_default_explains_how_to_open_it() -> None:
    with rdzv_serve() as (proc, _):
        proc.terminate()
        proc.wait(10)
        assert proc.stdout is not None
        out = proc.stdout.read()
    assert "authentication: none; tls: off; fast path: on; busy poll: 50 us" in out
    assert "only this machine can connect" in out


def test_a_client_over_the_connection_limit_gets_an_error_naming_it() -> None:
    thread = ServerThread(max_connections=2).start()
    try:
        held = [TCPStore("127.0.0.1", thread.port, timeout=5) for _ in range(2)]
        start = time.monotonic()
        with pytest.raises(ConnectionLimitError) as info:
            TCPStore("127.0.0.1", thread.port, timeout=30)
        assert time.monotonic() - start < 5  # refused at once, not retried for 30 s
        assert "max_connections=2" in str(info.value)
        assert "--max-connections" in str(info.value)
        held[0].set("k", b"v")  # the others are unaffected
        assert held[1].get("k") == b"v"
        held[0].close()
        eventually(lambda: thread.server.num_connections == 1, what="the close")
        again = TCPStore("127.0.0.1", thread.port, timeout=5)  # a freed slot is reusable
        assert again.get("k") == b"v"
        for store in (again, held[1]):
            store.close()
    finally:
        thread.stop()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs procfs")
def test_the_descriptor_limit_refuses_with_a_clear_error_and_costs_the_others_nothing(
    tmp_path: Path,
) -> None:
    """rdzv serve under RLIMIT_NOFILE = 160: the connections past what it allows are refused
    with an error naming the descriptor limit and ulimit; a storm of silent connections past
    it (which exhausts the reserve: accept() fails with EMFILE) neither spins the server nor
    stops it serving the connections it has."""
    nofile = 160

    def limit_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdzv", "serve", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=subprocess_env(),
        preexec_fn=limit_fds,
    )
    stores: list[TCPStore] = []
    storm: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        with pytest.raises(ConnectionLimitError) as info:
            for _ in range(nofile):  # bounded: the server holds fewer than nofile
                stores.append(TCPStore("127.0.0.1", port, timeout=10))
        message = str(info.value)
        assert 0 < len(stores) < nofile - 64
        assert f"{len(stores)} connections open" in message
        assert f"RLIMIT_NOFILE {nofile}" in message
        assert "ulimit -n" in message
        # A storm of connections that never send anything: refused ones hold a descriptor
        # for up to a second each, so the reserve runs out and accept() fails (EMFILE).
        for _ in range(120):
            storm.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        cpu_before, wall_before = _cpu_seconds(proc.pid), time.monotonic()
        for i in range(20):  # the connections it serves are served meanwhile
            stores[i % len(stores)].set(f"k{i}", b"v")
            assert stores[-1 - i % len(stores)].get(f"k{i}") == b"v"
            time.sleep(0.05)
        cpu = _cpu_seconds(proc.pid) - cpu_before
        wall = time.monotonic() - wall_before
        assert cpu < 0.5 * wall, f"server used {cpu:.2f} s of CPU in {wall:.2f} s: a busy loop?"
        for sock in storm:
            sock.close()
        storm.clear()
        stores.pop().close()
        # Once the storm is gone, the freed slot is served again (bounded retry: the
        # closes reach the server in their own time).
        deadline = time.monotonic() + 10
        while True:
            try:
                stores.append(TCPStore("127.0.0.1", port, timeout=5))
                break
            except ConnectionLimitError:
                assert time.monotonic() < deadline, "the freed slot was never reused"
                time.sleep(0.1)
        assert stores[-1].get("k0") == b"v"
    finally:
        for sock in storm:
            sock.close()
        for store in stores:
            store.close()
        proc.terminate()
        proc.wait(10)
        log.close()
    log_text = (tmp_path / "serve.log").read_text()
    assert "connection limit reached" in log_text
    # Dozens of refusals, logged one line a second at most (the test lasts a few seconds).
    assert log_text.count("refusing connection from") <= 10
