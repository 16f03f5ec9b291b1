"""The metrics and status-page listener: an HTTP server in threads of its own.

Routes (GET and HEAD; other methods get 405, unknown paths 404):

* ``/metrics``: the Prometheus text format (OpenMetrics when the scraper asks for it),
  rendered from the collectors at scrape time;
* ``/api/status``: the status document (JSON, :mod:`rdzv.observe.status`);
* ``/api/keys?prefix=P&limit=N`` (a store's listener): key names and value sizes, never
  values;
* ``/`` and ``/static/...``: the status page (static files shipped in the package; they hold
  no data, so they are served without a token and ask for one when the data needs it).

It never runs on, and never waits for, the store's event loop or the agent's thread: each
request is served in a thread of :class:`http.server.ThreadingHTTPServer` that reads plain
counters and snapshots. A store's listener runs in a process of its own and reads the
snapshots the store process publishes (:mod:`rdzv.observe.listener`); an agent's runs in
threads of the agent's process (copies taken under the GIL). A client's mistake costs that client a
4xx; at most :data:`MAX_CONCURRENT` requests are served at once (more get 503), each socket
times out after :data:`REQUEST_TIMEOUT` seconds.

Security (``docs/observability.md``): bind loopback unless told otherwise; with tokens,
``/metrics`` and ``/api/...`` require ``Authorization: Bearer <token>`` (any of the
tokens: the store's, or a read-only one); on a loopback address, requests naming another
host in ``Host`` are refused (a web page elsewhere cannot reach the listener through DNS
rebinding).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

__all__ = [
    "KEYS_INTERVAL",
    "MAX_CONCURRENT",
    "RENDER_MAX_AGE",
    "REQUEST_TIMEOUT",
    "ObserveServer",
    "Unavailable",
    "listener_url",
]

_log = logging.getLogger("rdzv.observe.http")

#: Requests served at once; more are answered 503 at once (a flood of scrapes or page
#: loads costs threads and the GIL the store needs; Prometheus scrapes one at a time).
MAX_CONCURRENT = 16
#: Seconds a connection may take to send its request (a slow client holds a thread).
REQUEST_TIMEOUT = 10.0
#: Seconds a rendered /metrics or /api/status body is reused when the listener has no
#: ``version`` of its data (an agent's): rendering costs ~0.3 ms of CPU (and the GIL the
#: agent needs), so a flood of scrapes renders at most 100 times a
#: second; figures are at most this old.
RENDER_MAX_AGE = 0.01
#: Keys ``/api/keys`` lists by default, and at most.
DEFAULT_KEYS = 100
MAX_KEYS = 1000
#: Seconds between two key listings a store's listener asks of the store process (at most
#: 10 a second; see :mod:`rdzv.observe.listener`).
KEYS_INTERVAL = 0.1


class Unavailable(Exception):
    """Raised by a ``keys`` source that cannot answer now: the request gets 503 with
    ``Retry-After`` and this message."""


def listener_url(host: str, port: int) -> str:
    """``http://host:port/`` (IPv6 literals bracketed; this host's name for a wildcard
    address)."""
    host = socket.getfqdn() if host in ("", "0.0.0.0", "::") else host
    host = host if ":" not in host else f"[{host}]"
    return f"http://{host}:{port}/"


_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
}


def _load_static() -> dict[str, tuple[bytes, str]]:
    root = resources.files("rdzv.observe") / "static"
    return {path: ((root / name).read_bytes(), ctype) for path, (name, ctype) in _STATIC.items()}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], family: int, owner: ObserveServer) -> None:
        self.address_family = family
        self.owner = owner
        self.slots = threading.BoundedSemaphore(MAX_CONCURRENT)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Retry-After: 1\r\nConnection: close\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        _log.warning("metrics listener: error serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.1"
    # Errors before the request's version is parsed still get a status line (HTTP/0.9,
    # http.server's default, has none and is not served).
    default_request_version = "HTTP/1.0"
    server_version = "rdzv"

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without NODELAY, Nagle's algorithm holds
        # the body until the client's delayed ACK (40 ms per keep-alive request on Linux).
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        if _log.isEnabledFor(logging.DEBUG):  # every request logs: format only when shown
            _log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        if code == HTTPStatus.NOT_IMPLEMENTED:  # an unknown method: the client's mistake
            code = HTTPStatus.METHOD_NOT_ALLOWED
        super().send_error(code, message, explain)

    def _reply(
        self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(code)
        for name, value in (_HEADERS | (extra or {})).items():
            self.send_header(name, value)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, code: int, text: str, extra: dict[str, str] | None = None) -> None:
        self._reply(code, text.encode() + b"\n", "text/plain; charset=utf-8", extra)

    def _host_allowed(self) -> bool:
        owner = self.server.owner
        if not owner.loopback:
            return True
        host = self.headers.get("Host")
        if host is None:
            return True  # HTTP/1.0 clients (curl -0, scrapers) send none
        name = urlsplit("//" + host).hostname or ""
        return _is_loopback(name)

    def _authorized(self) -> bool:
        tokens = self.server.owner.tokens
        if not tokens:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer" or not credentials:
            return False
        given = credentials.strip().encode("utf-8", "replace")
        return any(hmac.compare_digest(given, token) for token in tokens)

    def do_GET(self) -> None:
        owner = self.server.owner
        if not self._host_allowed():
            self._text(HTTPStatus.FORBIDDEN, "forbidden: Host is not a loopback address")
            return
        url = urlsplit(self.path)
        path = url.path
        static = owner.static.get(path)
        if static is not None:
            self._reply(HTTPStatus.OK, static[0], static[1])
            return
        if path not in ("/metrics", "/api/status", "/api/keys") or (
            path == "/api/keys" and owner.keys is None
        ):
            self._text(HTTPStatus.NOT_FOUND, f"not found: {path} (try /, /metrics, /api/status)")
            return
        if not self._authorized():
            owner.auth_failures += 1
            self._text(
                HTTPStatus.UNAUTHORIZED,
                "unauthorized: send the store's token (or the read-only metrics token) as "
                "'Authorization: Bearer <token>'",
                {"WWW-Authenticate": 'Bearer realm="rdzv"'},
            )
            return
        if path == "/api/keys":
            self._list_keys(url.query)
            return
        try:
            if path == "/metrics":
                encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
                body = owner.render((path, ctype), lambda: encoder(owner.registry))
            else:
                ctype = "application/json"
                body = owner.render(
                    (path, ctype), lambda: json.dumps(owner.status(), default=str).encode()
                )
        except Exception:  # a bug in a collector must cost this request, not the store
            _log.exception("metrics listener: %s failed", path)
            self._text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the logs)")
            return
        self._reply(HTTPStatus.OK, body, ctype)

    do_HEAD = do_GET

    def _list_keys(self, query: str) -> None:
        """``/api/keys?prefix=P&limit=N``: key names and sizes (never values)."""
        keys = self.server.owner.keys
        assert keys is not None
        params = parse_qs(query, keep_blank_values=True)
        prefix = params.get("prefix", [""])[-1]
        raw = params.get("limit", [str(DEFAULT_KEYS)])[-1]
        try:
            limit = int(raw)
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_KEYS:
            self._text(HTTPStatus.BAD_REQUEST, f"limit must be an integer in 1..{MAX_KEYS}")
            return
        try:
            body = json.dumps(keys(prefix, limit)).encode()
        except Unavailable as exc:
            self._text(HTTPStatus.SERVICE_UNAVAILABLE, f"unavailable: {exc}", {"Retry-After": "1"})
            return
        self._reply(HTTPStatus.OK, body, "application/json")

    def _not_allowed(self) -> None:
        self._text(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed", {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed


class ObserveServer:
    """Serves ``/metrics`` from ``registry`` and the status page with ``status()``'s
    document, on ``host:port`` (port 0: a free one), in daemon threads.

    Args:
        host: address to bind (loopback by default; callers refuse other addresses without
            a token unless told otherwise, see ``rdzv serve --metrics-host``).
        port: TCP port, 0 for a free one (read :attr:`port`).
        registry: the collectors (:func:`rdzv.observe.metrics.registry_for`).
        status: returns the status document (JSON-able).
        tokens: accepted bearer tokens (bytes); empty: no authentication.
        keys: ``keys(prefix, limit)`` for ``/api/keys`` (a store's key names and sizes);
            None: no such route (404). It may raise :class:`Unavailable` (503).
        version: returns a value that changes whenever ``registry`` and ``status`` may
            answer differently (a store listener's published snapshots): bodies are
            rendered once per version; None: at most every :data:`RENDER_MAX_AGE` seconds.

    Raises OSError from :meth:`start` when the address cannot be bound.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        registry: CollectorRegistry,
        status: Callable[[], dict[str, Any]],
        tokens: Sequence[bytes] = (),
        keys: Callable[[str, int], dict[str, Any]] | None = None,
        version: Callable[[], object] | None = None,
    ) -> None:
        self.host = host
        self.keys = keys
        self.registry = registry
        self.status = status
        self.tokens = tuple(tokens)
        self.static = _load_static()
        self.auth_failures = 0
        self._version = version
        self._rendered: dict[tuple[str, str], tuple[object, float, bytes]] = {}
        self._render_lock = threading.Lock()
        self._requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.loopback = False

    def render(self, key: tuple[str, str], make: Callable[[], bytes]) -> bytes:
        """``make()``, or its earlier result for the same ``key``: while ``version()`` is
        unchanged when the listener has one, else for :data:`RENDER_MAX_AGE` seconds (one
        render at a time: concurrent requests share it)."""
        with self._render_lock:
            now = time.monotonic()
            version = None if self._version is None else self._version()
            cached = self._rendered.get(key)
            if (
                cached is not None
                and cached[0] == version
                and (version is not None or now - cached[1] < RENDER_MAX_AGE)
            ):
                return cached[2]
            body = make()
            self._rendered[key] = (version, now, body)
            return body

    def start(self) -> ObserveServer:
        infos = socket.getaddrinfo(self.host, self._requested_port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        self.loopback = all(_is_loopback(str(info[4][0])) for info in infos)
        self._server = _Server((str(address[0]), int(address[1])), family, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="rdzv-metrics",
            daemon=True,
        )
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the metrics listener is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """:func:`listener_url` of this listener."""
        return listener_url(self.host, self.port)

    def close(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
