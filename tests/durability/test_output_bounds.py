"""Clients that never read their replies (issue 16, item 2): every per-connection output
buffer is bounded (replies held for a commit included), reading pauses first, the connection
is dropped past ``--max-output-bytes`` (logged), and other clients keep being served."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rdzv import wire
from rdzv.store.tcp import TCPStore
from tests.conftest import subprocess_env
from tests.server.helpers import Raw, rdzv_serve

MIB = 1024 * 1024
BIG = 256 * 1024


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def non_reader(port: int) -> Raw:
    conn = Raw(port)
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return conn


def push(conn: Raw, data: bytes, seconds: float = 5.0) -> int:
    """Send as much of ``data`` as the server takes within ``seconds`` (it may stop reading);
    returns the bytes sent."""
    conn.sock.setblocking(False)
    sent, deadline = 0, time.monotonic() + seconds
    view = memoryview(data)
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += conn.sock.send(view[sent:])
        except BlockingIOError:
            time.sleep(0.01)
    conn.sock.setblocking(True)
    return sent


def stop(proc: subprocess.Popen[str], conns: list[Raw], store: TCPStore) -> str:
    """Close the clients, stop the server, return its log."""
    for conn in conns:
        conn.close()
    store.close()
    proc.terminate()
    proc.wait(10)
    assert proc.stderr is not None
    return proc.stderr.read()


def serve_writes(port: int, n: int) -> None:
    store = TCPStore("127.0.0.1", port, timeout=10)
    for i in range(n):
        store.set(f"w{i % 10}", b"x")
        assert store.get(f"w{i % 10}") == b"x"
    store.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("durable", [True, False])
def test_a_client_that_never_reads_stays_bounded_next_to_a_writer(
    tmp_path: Path, durable: bool
) -> None:
    extra = ("--data-dir", str(tmp_path), "--fsync", "never") if durable else ()
    with rdzv_serve(*extra) as (proc, port):
        store = TCPStore("127.0.0.1", port, timeout=10)
        store.set("big", b"b" * BIG)
        base = peak_rss(proc.pid)
        # Each burst: a write (the journal is dirty, so the replies after it are held for the
        # commit), then 400 GETs of 256 KiB: 100 MiB of replies per burst, never read.
        burst = wire.encode_set(b"/x", b"1") + wire.encode_key(wire.Op.GET, b"/big") * 400
        conn = non_reader(port)
        push(conn, burst * 4, seconds=2.0)
        serve_writes(port, 200)  # the writer keeps being served meanwhile
        assert store.get("big") == b"b" * BIG
        grown = peak_rss(proc.pid) - base
        assert grown < 100 * MIB, f"server grew {grown / MIB:.0f} MiB for a non-reading client"
        conn.close()
        store.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("durable", [True, False])
def test_waiter_replies_to_a_backed_up_connection_drop_it_past_the_limit(
    tmp_path: Path, durable: bool
) -> None:
    extra = ("--data-dir", str(tmp_path), "--fsync", "never") if durable else ()
    with rdzv_serve(*extra, "--max-output-bytes", str(16 * MIB)) as (proc, port):
        store = TCPStore("127.0.0.1", port, timeout=10)
        store.set("big", b"b" * BIG)
        conn = non_reader(port)
        conn.negotiate()
        # 200 blocking gets parked, a marker set after them (executed in order), then
        # enough GETs to back the connection up.
        parked = wire.encode_key(wire.Op.EXT_GET_WAIT, b"/w") * 200
        marker = wire.encode_set(b"/parked", b"1")
        push(conn, parked + marker + wire.encode_key(wire.Op.GET, b"/big") * 100, seconds=2.0)
        store.wait(["parked"])  # the 200 gets are parked
        base = peak_rss(proc.pid)
        store.set("w", b"v" * MIB)  # wakes 200 waiters: 200 MiB of replies for the connection
        serve_writes(port, 50)
        grown = peak_rss(proc.pid) - base
        assert grown < 100 * MIB, f"server grew {grown / MIB:.0f} MiB"
        log = stop(proc, [conn], store)
    assert "the client does not read its replies" in log and "max_output_bytes=16777216" in log


@pytest.mark.timeout(60)
def test_many_non_reading_connections_are_bounded_together(tmp_path: Path) -> None:
    """One client, many connections: each stays under the per-connection bound, but the
    server's total is bounded too (the connection that stopped reading first goes)."""
    limit = 16 * MIB
    with rdzv_serve(
        "--data-dir", str(tmp_path), "--fsync", "never", "--max-total-output-bytes", str(limit)
    ) as (proc, port):
        store = TCPStore("127.0.0.1", port, timeout=10)
        store.set("big", b"b" * BIG)
        base = peak_rss(proc.pid)
        burst = wire.encode_set(b"/x", b"1") + wire.encode_key(wire.Op.GET, b"/big") * 40
        conns = [non_reader(port) for _ in range(30)]  # 30 x 10 MiB of replies
        for conn in conns:
            push(conn, burst, seconds=0.5)
        serve_writes(port, 100)
        grown = peak_rss(proc.pid) - base
        assert grown < 80 * MIB, f"server grew {grown / MIB:.0f} MiB"
        log = stop(proc, conns, store)
    assert f"max_total_output_bytes={limit}); this connection stopped reading first" in log


@pytest.mark.parametrize("flag", ["--max-output-bytes", "--max-total-output-bytes"])
def test_output_bounds_must_be_positive(flag: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rdzv", "serve", "--port", "0", f"{flag}=0"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and f"{flag} must be a number of bytes >= 1" in out.stderr
