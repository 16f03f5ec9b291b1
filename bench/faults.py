"""Misbehaving clients against ``rdzv serve`` (defaults): how long do they delay another
client's requests, and how much memory do they make the server take? (issue 16, items 5,
7 and 9; the goals: p99 delay <= 50 ms, server RSS <= 500 MB.)

For each scenario, a fresh ``rdzv serve`` (its defaults, a token for ``preauth``) runs in a
process of its own; one attacker process misbehaves while this process, the victim, does
GET round trips on its own connection (one every millisecond) for ``--seconds``. Reported:
the victim's round-trip p50/p99/max in ms and the server's peak RSS (VmHWM) in MB.

Scenarios:

* ``ping-flood``: PINGs pipelined as fast as the socket takes them, replies never read;
* ``slowloris``: 4 connections each send 200 MB of a MULTI_SET at full speed, then stall;
* ``huge-waits``: 41 WAITs of 100,000 missing keys on one connection, then close (with
  the defaults the connection is closed at the second WAIT; ``--max-wait-keys`` raises the
  limit to show the release of 4.1 million parked keys);
* ``preauth``: like ``slowloris`` against a server with a token, without authenticating.

Usage (from the repository root)::

    python bench/faults.py [--seconds 4] [--scenarios ping-flood slowloris huge-waits preauth]
                           [--max-wait-keys N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from procstat import memory_bytes

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from rdzv import wire  # noqa: E402
from rdzv.wire import Op  # noqa: E402

U64 = struct.Struct("<Q").pack
TOKEN = "bench-faults-token-0123456789abcdef"
SCENARIOS = ("ping-flood", "slowloris", "huge-waits", "preauth")


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(wire.encode_validate())
    return sock


def _send_for(sock: socket.socket, data: bytes, until: float, repeat: bool = False) -> int:
    """Send ``data`` (over and over with ``repeat``) until ``until``; returns bytes sent."""
    sock.setblocking(False)
    view, sent, total = memoryview(data), 0, 0
    while time.monotonic() < until:
        try:
            n = sock.send(view[sent:])
        except BlockingIOError:
            time.sleep(0.001)
            continue
        except OSError:
            break  # closed by the server
        sent += n
        total += n
        if sent == len(data):
            if not repeat:
                break
            sent = 0
    return total


def _ping_flood(port: int, until: float) -> None:
    _send_for(_connect(port), wire.encode_ping(7) * 10_000, until, repeat=True)


def _half_multi_set(port: int, until: float) -> None:
    item = U64(1) + b"k" + U64(2**20) + b"v" * 2**20
    socks = [_connect(port) for _ in range(4)]
    for sock in socks:  # 200 MB each of a 201-value MULTI_SET: never complete
        head = bytes((Op.MULTI_SET,)) + U64(201)
        _send_for(sock, head + item * 200, min(until, time.monotonic() + 0.5))
    while time.monotonic() < until:
        time.sleep(0.05)


def _huge_waits(port: int, until: float) -> None:
    sock = _connect(port)
    for w in range(41):
        keys = [b"/w%d-%d" % (w, i) for i in range(100_000)]
        try:
            sock.sendall(wire.encode_keys(Op.WAIT, keys))
        except OSError:
            break  # closed at the limit
    time.sleep(max(0.0, (until - time.monotonic()) / 2))
    sock.close()
    while time.monotonic() < until:
        time.sleep(0.05)


ATTACKS: dict[str, Callable[[int, float], None]] = {
    "ping-flood": _ping_flood,
    "slowloris": _half_multi_set,
    "huge-waits": _huge_waits,
}


def _preauth_attack(port: int, until: float) -> None:
    item = U64(1) + b"k" + U64(2**20) + b"v" * 2**20
    for _ in range(4):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.2", 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(wire.encode_validate())
        head = bytes((Op.MULTI_SET,)) + U64(201)
        _send_for(sock, head + item * 200, min(until, time.monotonic() + 0.5))
    while time.monotonic() < until:
        time.sleep(0.05)


def _peak_rss_mb(pid: int) -> float:
    return memory_bytes(pid, "VmHWM") / (1 << 20)


def _serve(extra: list[str]) -> tuple[subprocess.Popen[str], int]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    env.pop("RDZV_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdzv", "serve", "--port", "0", "--quiet", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return proc, int(line.rsplit(":", 1)[1])


def _victim(port: int, seconds: float) -> list[float]:
    sock = _connect(port)
    sock.sendall(wire.encode_set(b"/victim", b"x" * 64))
    request = wire.encode_key(Op.GET, b"/victim")
    lat: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        sock.sendall(request)
        got = 0
        while got < 72:
            got += len(sock.recv(72 - got))
        lat.append((time.perf_counter() - start) * 1000)
        time.sleep(0.001)
    sock.close()
    return sorted(lat)


def run(scenario: str, seconds: float, max_wait_keys: int | None, tmp: Path) -> dict[str, Any]:
    extra: list[str] = []
    if scenario == "preauth":
        token_file = tmp / "token"
        token_file.write_text(TOKEN)
        extra += ["--token-file", str(token_file), "--allow-unauthenticated", "127.0.0.1/32"]
    if scenario == "huge-waits" and max_wait_keys:
        extra += ["--max-wait-keys-per-connection", str(max_wait_keys)]
    proc, port = _serve(extra)
    try:
        base = _peak_rss_mb(proc.pid)
        until = time.monotonic() + seconds + 1.0
        # preauth: the attacker comes from 127.0.0.2 (must authenticate), the victim from
        # 127.0.0.1 (allowed without a token).
        attack = _preauth_attack if scenario == "preauth" else ATTACKS[scenario]
        attacker = multiprocessing.Process(target=attack, args=(port, until))
        attacker.start()
        time.sleep(0.3)
        lat = _victim(port, seconds)
        attacker.join(seconds + 30)
        peak = _peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
    return {
        "scenario": scenario,
        "victim_requests": len(lat),
        "victim_p50_ms": round(lat[len(lat) // 2], 3),
        "victim_p99_ms": round(lat[int(len(lat) * 0.99)], 3),
        "victim_max_ms": round(lat[-1], 3),
        "server_rss_start_mb": round(base, 1),
        "server_rss_peak_mb": round(peak, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--max-wait-keys", type=int, default=None)
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = [run(s, args.seconds, args.max_wait_keys, Path(tmp)) for s in args.scenarios]
    print(
        json.dumps(
            {
                "benchmark": "faults",
                "workload": f"victim GET round trips, 1 per ms, for {args.seconds:g} s, next to "
                "one misbehaving client; rdzv serve defaults",
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
