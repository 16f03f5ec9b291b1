"""The listener's HTTP server (:mod:`rdzv.observe.http`) in-process, on real sockets: keep-alive
and pipelined requests, bodies rendered once per version of the data, HTTP/1.0, request
limits, idle connections and failing collectors."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Iterator

import pytest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

import rdzv.observe.http as observe_http
from rdzv.observe.http import MAX_HEADERS, MAX_REQUEST_BYTES, ObserveServer
from rdzv.observe.metrics import registry_for
from tests.server.helpers import eventually


class Counting(Collector):
    """One counter whose value is the number of times it was collected (rendered)."""

    def __init__(self, fail: bool = False) -> None:
        self.renders = 0
        self.fail = fail

    def collect(self) -> Iterator[Metric]:
        if self.fail:
            raise RuntimeError("a broken collector")
        self.renders += 1
        yield CounterMetricFamily("test_renders", "Renders so far.", self.renders)


@pytest.fixture
def version() -> list[int]:
    return [1]


@pytest.fixture
def collector() -> Counting:
    return Counting()


@pytest.fixture
def server(collector: Counting, version: list[int]) -> Iterator[ObserveServer]:
    server = ObserveServer(
        "127.0.0.1",
        0,
        registry=registry_for(collector),
        status=lambda: {"version": version[0]},
        version=lambda: version[0],
    ).start()
    try:
        yield server
    finally:
        server.close()


def read_reply(sock: socket.socket, buffer: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One reply from ``sock`` (bytes beyond it stay in ``buffer``): status, headers, body."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a reply"
        buffer += chunk
    end = buffer.index(b"\r\n\r\n")
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    while len(buffer) < end + 4 + length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in a body"
        buffer += chunk
    body = bytes(buffer[end + 4 : end + 4 + length])
    del buffer[: end + 4 + length]
    return int(lines[0].split()[1]), headers, body


def connect(server: ObserveServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def renders(body: bytes) -> float:
    [family] = text_string_to_metric_families(body.decode())
    return float(family.samples[0].value)


def test_keep_alive_pipelined_requests_answered_in_order(server: ObserveServer) -> None:
    with connect(server) as sock:
        sock.sendall(
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        buffer = bytearray()
        codes = [read_reply(sock, buffer)[0] for _ in range(3)]
        assert codes == [200, 404, 200]
        sock.sendall(b"HEAD /metrics HTTP/1.1\r\n\r\n")
        code, headers, body = read_reply_head(sock, buffer)
        assert code == 200 and int(headers["content-length"]) > 0 and body == b""
        sock.sendall(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert read_reply(sock, buffer)[0] == 200
        assert closed_by_server(sock)


def read_reply_head(sock: socket.socket, buffer: bytearray) -> tuple[int, dict[str, str], bytes]:
    """A reply to HEAD: headers only (Content-Length says what a GET would carry)."""
    while b"\r\n\r\n" not in buffer:
        buffer += sock.recv(65536)
    end = buffer.index(b"\r\n\r\n")
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    del buffer[: end + 4]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, bytes(buffer)


def test_metrics_are_rendered_once_per_version(
    server: ObserveServer, collector: Counting, version: list[int]
) -> None:
    with connect(server) as sock:
        buffer = bytearray()
        bodies = []
        for _ in range(50):
            sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            code, headers, body = read_reply(sock, buffer)
            assert code == 200 and headers["content-type"].startswith("text/plain")
            bodies.append(body)
        assert collector.renders == 1 and set(bodies) == {bodies[0]}
        version[0] += 1
        sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert renders(read_reply(sock, buffer)[2]) == 2
        sock.sendall(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n")
        code, headers, body = read_reply(sock, buffer)
        assert headers["content-type"].startswith("application/openmetrics-text")
        assert body.endswith(b"# EOF\n") and collector.renders == 3


def test_http_1_0_closes_unless_kept_alive(server: ObserveServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        code, headers, _ = read_reply(sock, bytearray())
        assert code == 200 and headers["connection"] == "close"
        assert closed_by_server(sock)
    with connect(server) as sock:
        buffer = bytearray()
        for _ in range(2):
            sock.sendall(b"GET /metrics HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            code, headers, _ = read_reply(sock, buffer)
            assert code == 200 and headers["connection"] == "keep-alive"


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"GET /metrics\r\n\r\n", 400),  # HTTP/0.9
        (b"GET /metrics HTTP/1.1\r\n folded: header\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_REQUEST_BYTES + 1), 413),
        (b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * (MAX_HEADERS + 1) + b"\r\n", 431),
        (b"GET /metrics HTTP/1.1\r\nX-A: " + b"b" * MAX_REQUEST_BYTES + b"\r\n\r\n", 431),
        (b"PUT /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 405),
        (b"M-SEARCH * HTTP/1.1\r\n\r\n", 405),
        (b"G(T /metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: [::1\r\n\r\n", 400),
        (b"GET http://[x/metrics HTTP/1.1\r\n\r\n", 400),
    ],
)
def test_bad_requests_get_4xx_and_close(
    server: ObserveServer, request_bytes: bytes, code: int
) -> None:
    with connect(server) as sock:
        sock.sendall(request_bytes)
        assert read_reply(sock, bytearray())[0] == code
        assert closed_by_server(sock)
    with connect(server) as sock:  # others are served
        sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert read_reply(sock, bytearray())[0] == 200


def test_a_get_body_is_read_and_ignored(server: ObserveServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
        sock.sendall(b"GET /api/status HTTP/1.1\r\n\r\n")
        buffer = bytearray()
        assert read_reply(sock, buffer)[0] == 200
        assert read_reply(sock, buffer)[2] == b'{"version": 1}'


def test_idle_connections_are_closed(
    server: ObserveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(observe_http, "REQUEST_TIMEOUT", 0.5)
    with connect(server) as idle, connect(server) as partial:
        partial.sendall(b"GET /metrics HTT")
        assert closed_by_server(idle) and closed_by_server(partial)
    eventually(lambda: not server.connections, what="connections forgotten")


def test_a_failing_collector_costs_a_500_not_the_listener() -> None:
    server = ObserveServer(
        "127.0.0.1", 0, registry=registry_for(Counting(fail=True)), status=dict
    ).start()
    try:
        with connect(server) as sock:
            buffer = bytearray()
            sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            assert read_reply(sock, buffer)[0] == 500
            sock.sendall(b"GET /api/status HTTP/1.1\r\n\r\n")
            assert read_reply(sock, buffer)[:3:2] == (200, b"{}")
    finally:
        server.close()


def test_a_client_flooding_requests_while_one_is_pending_is_not_read() -> None:
    """While a request waits (here a status document that blocks), the connection's further
    requests are buffered up to MAX_BUFFERED bytes, then its socket is no longer read: the
    client's sends block instead of the listener's memory growing."""
    release = threading.Event()

    def status() -> dict[str, int]:
        release.wait(30)
        return {}

    server = ObserveServer("127.0.0.1", 0, registry=registry_for(Counting()), status=status).start()
    try:
        with connect(server) as sock:
            sock.sendall(b"GET /api/status HTTP/1.1\r\n\r\n")
            sock.setblocking(False)
            request = b"GET /metrics HTTP/1.1\r\n\r\n" * 4096  # 100 KB
            sent = 0
            # Send until the socket stays unwritable for a second (the listener stopped
            # reading), or 64 MB went through (it did not).
            while sent < 64 << 20 and select.select([], [sock], [], 1.0)[1]:
                with contextlib.suppress(BlockingIOError):
                    sent += sock.send(request)
            assert sent < 32 << 20, "the listener kept reading"
            release.set()
            sock.setblocking(True)
            assert read_reply(sock, bytearray())[0] == 200
    finally:
        release.set()
        server.close()


def test_a_taken_port_raises_oserror(server: ObserveServer) -> None:
    other = ObserveServer("127.0.0.1", server.port, registry=registry_for(), status=dict)
    with pytest.raises(OSError):
        other.start()
    with connect(server) as sock:  # the first one still serves
        sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert read_reply(sock, bytearray())[0] == 200


def test_a_repeated_request_gets_the_answer_its_headers_ask_for() -> None:
    """A scraper sends the same bytes every time: a repeat is answered from the memo of the
    previous identical request, which must still check what the bytes asked for."""
    collector, version = Counting(), [1]
    server = ObserveServer(
        "127.0.0.1",
        0,
        registry=registry_for(collector),
        status=lambda: {"version": version[0]},
        tokens=[b"secret"],
        version=lambda: version[0],
    ).start()
    try:
        with connect(server) as sock:
            buffer = bytearray()
            for _ in range(3):  # never authorized by repetition
                sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
                assert read_reply(sock, buffer)[0] == 401
            assert server.auth_failures == 3
            good = b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer secret\r\n\r\n"
            for state in (1, 1, 2, 2):  # a new state after the second request
                version[0] = state
                sock.sendall(good)
                code, _, body = read_reply(sock, buffer)
                assert code == 200 and renders(body) == state
            head = b"HEAD /api/status HTTP/1.1\r\nAuthorization: Bearer secret\r\n\r\n"
            for _ in range(2):
                sock.sendall(head)
                code, headers, rest = read_reply_head(sock, buffer)
                assert code == 200 and int(headers["content-length"]) > 0 and rest == b""
            sock.sendall(good.replace(b"\r\n\r\n", b"\r\nHost: example.com\r\n\r\n"))
            assert read_reply(sock, buffer)[0] == 403
        with connect(server) as sock:
            buffer = bytearray()
            closing = good.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
            sock.sendall(closing + closing)  # the second is never read
            code, headers, _ = read_reply(sock, buffer)
            assert code == 200 and headers["connection"] == "close"
            assert closed_by_server(sock) and buffer == b""
    finally:
        server.close()
