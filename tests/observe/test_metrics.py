"""``rdzv serve --metrics-port``: scrape /metrics of a real server after known operations and
parse it with prometheus_client's parser; the listener's security and its bad requests."""

from __future__ import annotations

import contextlib
import datetime
import json
import resource
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch.distributed as dist

from rdzv.errors import AuthError, NetworkError
from rdzv.store.tcp import TCPStore
from tests.conftest import subprocess_env
from tests.observe.helpers import scrape, serve_with_metrics, value
from tests.server.helpers import eventually

TOKEN = "metrics-test-token-0123456789abcdef"
READ_ONLY = "read-only-token-0123456789abcdef"


def status_code(url: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def torch_client(port: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10))


@pytest.mark.parametrize("fastpath", ["1", "0"], ids=["c-fast-path", "python-path"])
def test_counters_match_the_operations_done(fastpath: str) -> None:
    with serve_with_metrics(env={"RDZV_FASTPATH": fastpath}) as (_, port, url):
        torch_store = torch_client(port)
        rdzv_store = TCPStore("127.0.0.1", port, timeout=10)
        # Figures are published every 100 ms: "before" must be a snapshot taken after both
        # connections' handshakes, which a CHECK sent after them marks.
        assert not torch_store.check(["marker"])
        before = {}

        def fresh_before() -> bool:
            nonlocal before
            before = scrape(url)
            return value(before, "rdzv_store_requests_total", op="CHECK") == 1

        eventually(fresh_before, what="a snapshot after the connections")
        for i in range(10):
            torch_store.set(f"k{i}", b"x" * 100)
        for i in range(10):
            assert torch_store.get(f"k{i}") == b"x" * 100
        for _ in range(5):
            torch_store.add("counter", 2)
        assert torch_store.check(["k0", "counter"])
        after = before

        def delta(op: str) -> float:
            name = "rdzv_store_requests_total"
            return value(after, name, op=op) - value(before, name, op=op)

        def scraped_all() -> bool:  # a scrape's figures may be up to 100 ms old
            nonlocal after
            after = scrape(url)
            return delta("CHECK") >= 1  # the last operation done

        eventually(scraped_all, what="a scrape after the operations")
        # torch's client: set = SET; get = WAIT + GET; add = ADD; check = CHECK.
        assert (delta("SET"), delta("GET"), delta("WAIT"), delta("ADD"), delta("CHECK")) == (
            10,
            10,
            10,
            5,
            1,
        )
        reads = value(after, "rdzv_store_request_duration_seconds_count") - value(
            before, "rdzv_store_request_duration_seconds_count"
        )
        assert 26 <= reads <= 36  # each get's WAIT and GET are separate round trips
        assert value(after, "rdzv_store_request_duration_seconds_bucket", le="+Inf") == value(
            after, "rdzv_store_request_duration_seconds_count"
        )
        assert value(after, "rdzv_store_connections_open", client="torch") == 1
        assert value(after, "rdzv_store_connections_open", client="rdzv") == 1
        assert value(after, "rdzv_store_keys") == 11
        assert after[("rdzv_store_read_only", ())] == 0
        # Sizes are refreshed at most every second: wait for the figure (bounded).
        eventually(
            lambda: value(scrape(url), "rdzv_store_value_bytes") == 10 * 100 + len(b"10"),
            timeout=5,
            what="value_bytes reaches the stored bytes",
        )
        rdzv_store.close()
        eventually(
            lambda: value(scrape(url), "rdzv_store_connections_open", client="rdzv") == 0,
            what="the closed connection is no longer open",
        )
        final = scrape(url)
        assert value(final, "rdzv_store_connections_accepted_total", client="rdzv") == 1
        assert value(final, "rdzv_store_connections_accepted_total", client="torch") == 1


def test_waiters_and_limits_are_counted() -> None:
    with serve_with_metrics("--max-connections", "2") as (_, port, url):
        waiter = torch_client(port)
        other = torch_client(port)
        # A third connection is refused by the limit.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert sock.recv(1) == b""  # closed by the server at once
        eventually(
            lambda: value(scrape(url), "rdzv_store_limit_hits_total", limit="max_connections") == 1,
            what="the refused connection is counted",
        )
        parked = threading.Thread(target=waiter.wait, args=(["later"],))
        parked.start()
        eventually(lambda: value(scrape(url), "rdzv_store_waiters") == 1, what="one wait is parked")
        other.set("later", "now")
        parked.join(10)
        assert not parked.is_alive()
        eventually(lambda: value(scrape(url), "rdzv_store_waiters") == 0, what="no wait parked")


def test_durable_store_counts_commits_and_fsyncs(tmp_path: Path) -> None:
    with serve_with_metrics("--data-dir", str(tmp_path / "data")) as (_, port, url):
        store = TCPStore("127.0.0.1", port, timeout=10)
        before = scrape(url)
        for i in range(5):
            store.set(f"k{i}", "v")
            store.get(f"k{i}")  # waits for the set's commit
        eventually(lambda: value(scrape(url), "rdzv_store_keys") == 5, what="a fresh scrape")
        after = scrape(url)
        commits = value(after, "rdzv_store_journal_commits_total") - value(
            before, "rdzv_store_journal_commits_total"
        )
        assert commits >= 5
        fsyncs = value(after, "rdzv_store_journal_fsync_duration_seconds_count")
        assert fsyncs >= commits  # fsync=always: one per commit
        assert value(after, "rdzv_store_journal_fsync_duration_seconds_sum") > 0
        store.close()


def test_token_protects_metrics_and_status(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    read_only = tmp_path / "read-only"
    read_only.write_text(READ_ONLY)
    with serve_with_metrics(
        "--token-file", str(token_file), "--metrics-token-file", str(read_only)
    ) as (_, port, url):
        for path in ("metrics", "api/status", "api/keys"):
            assert status_code(url + path) == 401
            assert status_code(url + path, headers={"Authorization": "Bearer wrong"}) == 401
            for good in (TOKEN, READ_ONLY):
                assert status_code(url + path, headers={"Authorization": f"Bearer {good}"}) == 200
        assert status_code(url) == 200  # the page itself holds no data; it asks for the token
        with pytest.raises(AuthError):
            TCPStore("127.0.0.1", port, timeout=5, token="wrong-token-0123456789abcdef")
        store = TCPStore("127.0.0.1", port, timeout=5, token=TOKEN)
        eventually(
            lambda: (
                value(scrape(url, READ_ONLY), "rdzv_store_connections_open", client="rdzv") == 1
            ),
            what="a scrape after the connections",
        )
        samples = scrape(url, READ_ONLY)
        assert value(samples, "rdzv_store_auth_failures_total", reason="wrong_token") == 1
        store.close()


def test_bad_requests_get_4xx_and_the_store_keeps_serving() -> None:
    with serve_with_metrics() as (proc, port, url):
        store = TCPStore("127.0.0.1", port, timeout=10)
        store.set("before", "1")
        assert status_code(url + "nowhere") == 404
        assert status_code(url + "metrics", method="POST") == 405
        assert status_code(url + "metrics", method="DELETE") == 405
        assert status_code(url + "api/status", headers={"Host": "attacker.example"}) == 403
        host, http_port = url[len("http://") :].rstrip("/").rsplit(":", 1)
        for garbage in (b"\x00\xff garbage\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
                        b"BREW /metrics HTTP/1.1\r\n\r\n"):  # fmt: skip
            with socket.create_connection((host, int(http_port)), timeout=10) as sock:
                sock.sendall(garbage)
                reply = sock.recv(200)
            assert reply.startswith(b"HTTP/1."), reply
            assert reply.split()[1].startswith(b"4"), reply
        # A client that connects and says nothing does not stop others.
        with socket.create_connection((host, int(http_port)), timeout=10):
            assert status_code(url + "metrics") == 200
        assert store.get("before") == b"1"
        assert proc.poll() is None


def test_metrics_need_a_token_off_loopback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rdzv", "serve", "--port", "0", "--metrics-port", "0",
         "--metrics-host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
    )  # fmt: skip
    assert result.returncode == 2
    assert "without a token" in result.stderr


def test_keys_are_listed_with_sizes_never_values() -> None:
    with serve_with_metrics() as (_, port, url):
        store = TCPStore("127.0.0.1", port, timeout=10)
        store.set("job/a", "secret-1")
        store.set("job/b", "secret-22")
        store.set("other", "secret-333")
        assert store.get("other") == b"secret-333"  # a round trip: the sets were served
        with urllib.request.urlopen(url + "api/keys?prefix=job/&limit=1", timeout=10) as r:
            body = r.read()
        assert b"secret" not in body
        assert json.loads(body) == {
            "prefix": "job/",
            "total": 2,
            "keys": [{"key": "job/a", "bytes": 8}],
        }
        with urllib.request.urlopen(url + "api/keys", timeout=10) as r:
            listed = json.loads(r.read())
        assert [k["key"] for k in listed["keys"]] == ["job/a", "job/b", "other"]
        for bad in ("0", "1001", "many"):
            assert status_code(url + f"api/keys?limit={bad}") == 400
        store.close()


@pytest.mark.timeout(60)
def test_read_only_gauge_follows_a_full_disk(tmp_path: Path) -> None:
    """The disk fills through RLIMIT_FSIZE on the server (as tests/durability/
    test_disk_full.py does); the gauge is 1 while writes are refused, 0 once space is back."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    proc = subprocess.Popen(
        [sys.executable, "-m", "rdzv", "serve", "--port", "0", "--data-dir", str(tmp_path),
         "--fsync", "never", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=subprocess_env(),
        preexec_fn=limit,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        url = proc.stdout.readline().split()[3]
        assert value(scrape(url), "rdzv_store_read_only") == 0
        writer = TCPStore("127.0.0.1", port, timeout=5, reconnect=False)
        # Sets have no reply: 200 KB, well past the 64 KiB limit; once the store is read-only
        # a torch-opcode write closes the connection (it has no error reply).
        with contextlib.suppress(NetworkError):
            for i in range(200):
                writer.set(f"k{i}", b"v" * 1000)
        eventually(lambda: value(scrape(url), "rdzv_store_read_only") == 1, what="read-only")
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        eventually(
            lambda: value(scrape(url), "rdzv_store_read_only") == 0,
            timeout=15,
            what="writable again once space is back",
        )
    finally:
        proc.kill()
        proc.wait(10)


def test_a_flood_of_idle_connections_gets_503_and_the_store_keeps_serving() -> None:
    from rdzv.observe.http import MAX_CONCURRENT

    with serve_with_metrics() as (proc, port, url):
        store = TCPStore("127.0.0.1", port, timeout=10)
        host, http_port = url[len("http://") :].rstrip("/").rsplit(":", 1)
        idle = [socket.create_connection((host, int(http_port)), timeout=10)]
        try:
            idle += [
                socket.create_connection((host, int(http_port)), timeout=10)
                for _ in range(MAX_CONCURRENT - 1)
            ]
            eventually(lambda: status_code(url + "metrics") == 503, what="503 when saturated")
            store.set("still", "served")
            assert store.get("still") == b"served"
        finally:
            for sock in idle:
                sock.close()
        eventually(lambda: status_code(url + "metrics") == 200, what="served again")
        assert proc.poll() is None
        store.close()
