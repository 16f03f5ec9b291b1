"""The metrics and status-page listener: a small HTTP/1.1 server on an event loop of its own.

Routes (GET and HEAD; other methods get 405, unknown paths 404):

* ``/metrics``: the Prometheus text format (OpenMetrics when the scraper asks for it);
* ``/api/status``: the status document (JSON, :mod:`rdzv.observe.status`);
* ``/api/keys?prefix=P&limit=N`` (a store's listener): key names and value sizes, never
  values;
* ``/`` and ``/static/...``: the status page (static files shipped in the package; they hold
  no data, so they are served without a token and ask for one when the data needs it).

It never runs on, and never waits for, the store's event loop or the agent's thread. One
thread runs an asyncio loop that parses requests (the request line and the few headers it
reads, split from the bytes received) and answers them; a ``/metrics`` or ``/api/status``
reply is sent from bytes rendered once per state of the data (``version``: a store
listener's published snapshots) or once per :data:`RENDER_MAX_AGE` seconds, so a scrape of
an unchanged state costs a few microseconds of CPU (``http.server`` spent ~60 us a request
parsing and formatting headers). Rendering, status documents and key listings, which may
wait (for the store process, or the agent's store), run in a pool of
:data:`MAX_CONCURRENT` threads, never on the loop. A store's listener runs in a process of
its own and reads the snapshots the store process publishes (:mod:`rdzv.observe.listener`);
an agent's runs in threads of the agent's process (copies taken under the GIL).

Connections are kept alive (HTTP/1.1, and HTTP/1.0 asking for it; requests on one connection
are answered in order). A client's mistake costs that client a 4xx (400 malformed, 405 other
methods, 413/414/431 too large; the connection is then closed); at most
:data:`MAX_CONCURRENT` connections are served at once (more get 503), and a connection that
sends nothing for :data:`REQUEST_TIMEOUT` seconds is closed.

Security (``docs/observability.md``): bind loopback unless told otherwise; with tokens,
``/metrics`` and ``/api/...`` require ``Authorization: Bearer <token>`` (any of the
tokens: the store's, or a read-only one); on a loopback address, requests naming another
host in ``Host`` are refused (a web page elsewhere cannot reach the listener through DNS
rebinding).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from email.utils import formatdate
from http import HTTPStatus
from importlib import resources
from typing import Any, cast
from urllib.parse import SplitResult, parse_qs, urlsplit

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from rdzv.endpoint import format_endpoint

__all__ = [
    "KEYS_INTERVAL",
    "MAX_BUFFERED",
    "MAX_CONCURRENT",
    "MAX_REQUEST_BYTES",
    "RENDER_MAX_AGE",
    "REQUEST_TIMEOUT",
    "ObserveServer",
    "Unavailable",
    "listener_url",
]

_log = logging.getLogger("rdzv.observe.http")

#: Connections served at once; more are answered 503 at once (a flood of scrapes or page
#: loads costs CPU the store needs; Prometheus scrapes one at a time). Also the threads
#: that render bodies and wait for status documents and key listings.
MAX_CONCURRENT = 16
#: Seconds a connection may stay without sending anything (idle, or in the middle of a
#: request); it is then closed.
REQUEST_TIMEOUT = 10.0
#: Bytes of a request's line and headers (more: 414 or 431), and of a body a GET may carry
#: (it is read and ignored; more: 413).
MAX_REQUEST_BYTES = 64 * 1024
#: Header lines a request may have (more: 431).
MAX_HEADERS = 100
#: Bytes of pipelined requests buffered for a connection while one of its requests is being
#: answered; beyond that its socket is not read (the client waits).
MAX_BUFFERED = 4 * MAX_REQUEST_BYTES
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
    return f"http://{format_endpoint(host, port)}/"


_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
_HEADERS = {
    "Server": "rdzv",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
}
_DATA_PATHS = ("/metrics", "/api/status", "/api/keys")
#: The characters of an HTTP method (a token, RFC 9110 5.6.2).
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n"
    b"Connection: close\r\n\r\n"
)


def _load_static() -> dict[str, tuple[bytes, str]]:
    root = resources.files("rdzv.observe") / "static"
    return {path: ((root / name).read_bytes(), ctype) for path, (name, ctype) in _STATIC.items()}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _head(code: int, ctype: str, length: int, extra: dict[str, str] | None = None) -> bytes:
    """A reply's status line and headers, without ``Date``, ``Connection`` and the blank
    line that ends them (added per reply)."""
    status = HTTPStatus(code)
    lines = [f"HTTP/1.1 {status.value} {status.phrase}"]
    lines += [f"{name}: {value}" for name, value in (_HEADERS | (extra or {})).items()]
    lines += [f"Content-Type: {ctype}", f"Content-Length: {length}", ""]
    return "\r\n".join(lines).encode("latin-1")


class _Malformed(Exception):
    """A request that cannot be served: reply ``code`` with ``message`` and close."""

    def __init__(self, code: int, message: str, extra: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra


def _parse(head: bytes) -> tuple[str, str, bool, dict[str, str]]:
    """(method, target, HTTP/1.1 or later, headers by lower-case name) of a request's line
    and headers; raises :class:`_Malformed`."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1]:
        raise _Malformed(HTTPStatus.BAD_REQUEST, f"bad request line {lines[0][:100]!r}")
    method, target, version = parts
    if method not in ("GET", "HEAD"):
        if not method or not _TOKEN.issuperset(method):
            raise _Malformed(HTTPStatus.BAD_REQUEST, f"bad request line {lines[0][:100]!r}")
        raise _Malformed(
            HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed", {"Allow": "GET, HEAD"}
        )
    if len(lines) > MAX_HEADERS + 1:
        raise _Malformed(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():  # no folding, no space before ':'
            raise _Malformed(HTTPStatus.BAD_REQUEST, f"bad header line {line[:100]!r}")
        headers[name.lower()] = value.strip()
    return method, target, version != "HTTP/1.0", headers


class _Connection(asyncio.Protocol):
    """One client connection: requests parsed from its bytes and answered in order."""

    def __init__(self, owner: ObserveServer) -> None:
        self._owner = owner
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._busy = False  # a reply is being prepared in a thread: later requests wait
        self._paused = False  # the client does not read its replies: read no more requests
        self._reading = True
        self.last_active = 0.0
        # The last data request's line and headers (bytes) and its cache key, head_only,
        # keep-alive and HTTP/1.1: a scraper sends the same request every time, so a repeat
        # whose body is still current is answered without parsing it again.
        self._repeat: tuple[bytes, tuple[str, str], bool, bool, bool] | None = None

    # ---------------------------------------------------------------- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        owner = self._owner
        if len(owner.connections) >= MAX_CONCURRENT:
            cast(asyncio.Transport, transport).write(_BUSY)
            transport.close()
            return
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.last_active = time.monotonic()
        owner.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._owner.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self.last_active = time.monotonic()
        self._process()

    def pause_writing(self) -> None:
        self._paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused = False
        self._process()

    def _update_reading(self) -> None:
        """Read the socket unless the client does not read its replies or too many of its
        requests wait (:data:`MAX_BUFFERED`)."""
        reading = not self._paused and len(self._buffer) <= MAX_BUFFERED
        if reading != self._reading and self._transport is not None:
            self._reading = reading
            if reading:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()

    def idle(self, now: float) -> bool:
        """Whether the client sent nothing for :data:`REQUEST_TIMEOUT` seconds (a reply
        being prepared does not count)."""
        return not self._busy and now - self.last_active > REQUEST_TIMEOUT

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # ---------------------------------------------------------------- requests
    def _process(self) -> None:
        self._serve_buffered()
        self._update_reading()

    def _serve_buffered(self) -> None:
        buffer = self._buffer
        while self._transport is not None and not self._busy and not self._paused:
            while buffer[:2] == b"\r\n":  # empty lines before a request are ignored
                del buffer[:2]
            end = buffer.find(b"\r\n\r\n", 0, MAX_REQUEST_BYTES + 4)
            try:
                if end < 0:
                    if len(buffer) > MAX_REQUEST_BYTES:
                        if buffer.find(b"\r\n", 0, MAX_REQUEST_BYTES) < 0:
                            raise _Malformed(
                                HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long"
                            )
                        raise _Malformed(
                            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "headers too long"
                        )
                    return
                head = bytes(buffer[:end])
                repeat = self._repeat
                if repeat is not None and repeat[0] == head:
                    cached = self._owner.cached(repeat[1])
                    if cached is not None:
                        del buffer[: end + 4]
                        self._send(cached[0], cached[1], repeat[3], repeat[4], repeat[2])
                        continue
                method, target, http11, headers = _parse(head)
                length = self._body_length(headers)
            except _Malformed as exc:
                self._reply_text(exc.code, str(exc), exc.extra, keep=False, head_only=False)
                return
            if len(buffer) < end + 4 + length:
                return  # the rest of an (ignored) body is still to come
            del buffer[: end + 4 + length]
            connection = headers.get("connection", "").lower()
            keep = "close" not in connection if http11 else "keep-alive" in connection
            try:
                key = self._serve(method == "HEAD", target, headers, keep, http11)
            except _Malformed as exc:
                self._reply_text(exc.code, str(exc), exc.extra, keep=False, head_only=False)
                return
            if key is not None and length == 0:
                self._repeat = (head, key, method == "HEAD", keep, http11)

    @staticmethod
    def _body_length(headers: dict[str, str]) -> int:
        if "transfer-encoding" in headers:
            raise _Malformed(HTTPStatus.BAD_REQUEST, "a GET or HEAD request takes no body")
        raw = headers.get("content-length", "0")
        if not raw.isdigit():
            raise _Malformed(HTTPStatus.BAD_REQUEST, f"bad Content-Length {raw[:20]!r}")
        length = int(raw)
        if length > MAX_REQUEST_BYTES:
            raise _Malformed(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
        return length

    def _serve(
        self, head_only: bool, target: str, headers: dict[str, str], keep: bool, http11: bool
    ) -> tuple[str, str] | None:
        """Answer one request; returns the cache key of an authorized ``/metrics`` or
        ``/api/status`` request (the same bytes get the same answer while it is current),
        else None."""
        owner = self._owner
        if _log.isEnabledFor(logging.DEBUG):  # every request logs: format only when shown
            _log.debug("%s %s", "HEAD" if head_only else "GET", target[:200])
        if owner.loopback and not _host_allowed(headers.get("host")):
            self._reply_text(
                HTTPStatus.FORBIDDEN,
                "forbidden: Host is not a loopback address",
                None,
                keep,
                head_only,
            )
            return None
        path, _, query = target.partition("?")
        if not path.startswith("/"):  # absolute-form (a proxy's request)
            url = _split(target)
            path, query = url.path or "/", url.query
        reply = owner.static_replies.get(path)
        if reply is not None:
            self._send(reply[0], reply[1], keep, http11, head_only)
            return None
        if path not in _DATA_PATHS or (path == "/api/keys" and owner.keys is None):
            self._reply_text(
                HTTPStatus.NOT_FOUND,
                f"not found: {path[:200]} (try /, /metrics, /api/status)",
                None,
                keep,
                head_only,
            )
            return None
        if not owner.authorized(headers.get("authorization", "")):
            owner.auth_failures += 1
            self._reply_text(
                HTTPStatus.UNAUTHORIZED,
                "unauthorized: send the store's token (or the read-only metrics token) as "
                "'Authorization: Bearer <token>'",
                {"WWW-Authenticate": 'Bearer realm="rdzv"'},
                keep,
                head_only,
            )
            return None
        if path == "/api/keys":
            self._in_thread(lambda: owner.list_keys(query), keep, http11, head_only)
            return None
        key = owner.body_key(path, headers.get("accept", ""))
        cached = owner.cached(key)
        if cached is not None:
            self._send(cached[0], cached[1], keep, http11, head_only)
        else:
            self._in_thread(lambda: owner.render(key), keep, http11, head_only)
        return key

    def _in_thread(
        self,
        make: Callable[[], tuple[bytes, bytes]],
        keep: bool,
        http11: bool,
        head_only: bool,
    ) -> None:
        """Reply with ``make()``'s (head, body), run in the pool; later requests of this
        connection wait for it."""
        owner = self._owner
        self._busy = True

        def done(future: Future[tuple[bytes, bytes]]) -> None:  # on the loop
            self._busy = False
            self.last_active = time.monotonic()
            try:
                head, body = future.result()
            except Exception:  # a bug in a collector must cost this request, not the store
                _log.exception("metrics listener: request failed")
                head, body = _text_reply(
                    HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the logs)"
                )
            self._send(head, body, keep, http11, head_only)
            self._process()

        def finished(future: Future[tuple[bytes, bytes]]) -> None:  # in the pool
            with contextlib.suppress(RuntimeError):  # the listener was closed meanwhile
                owner.loop.call_soon_threadsafe(done, future)

        try:
            owner.pool.submit(make).add_done_callback(finished)
        except RuntimeError:  # the pool is shut down: the listener is closing
            self.abort()

    def _reply_text(
        self, code: int, text: str, extra: dict[str, str] | None, keep: bool, head_only: bool
    ) -> None:
        head, body = _text_reply(code, text, extra)
        self._send(head, body, keep, True, head_only)

    def _send(self, head: bytes, body: bytes, keep: bool, http11: bool, head_only: bool) -> None:
        transport = self._transport
        if transport is None:
            return
        if not keep:
            connection = b"Connection: close\r\n"
        else:
            connection = b"" if http11 else b"Connection: keep-alive\r\n"
        parts = (head, self._owner.date_line(), connection, b"\r\n")
        transport.write(b"".join(parts if head_only else (*parts, body)))
        if not keep:
            self._buffer.clear()
            self._transport = None  # read no more requests; connection_lost follows
            transport.close()


def _text_reply(code: int, text: str, extra: dict[str, str] | None = None) -> tuple[bytes, bytes]:
    body = text.encode() + b"\n"
    return _head(code, _TEXT, len(body), extra), body


def _split(url: str) -> SplitResult:
    """``urlsplit(url)``; raises :class:`_Malformed` (400) for what it cannot parse."""
    try:
        return urlsplit(url)
    except ValueError:
        raise _Malformed(HTTPStatus.BAD_REQUEST, f"bad URL {url[:100]!r}") from None


def _host_allowed(host: str | None) -> bool:
    if host is None:
        return True  # HTTP/1.0 clients (curl -0, scrapers) send none
    return _is_loopback(_split("//" + host).hostname or "")


class ObserveServer:
    """Serves ``/metrics`` from ``registry`` and the status page with ``status()``'s
    document, on ``host:port`` (port 0: a free one), in a daemon thread (an event loop)
    and a pool of at most :data:`MAX_CONCURRENT` threads (rendering and waiting).

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
        self.static_replies = {
            path: (_head(HTTPStatus.OK, ctype, len(body)), body)
            for path, (body, ctype) in _load_static().items()
        }
        self.auth_failures = 0
        self.connections: set[_Connection] = set()
        self.loopback = False
        from rdzv.server.loop import new_event_loop  # uvloop's when installed: ~half the CPU

        self.loop = new_event_loop()
        self.pool = ThreadPoolExecutor(MAX_CONCURRENT, thread_name_prefix="rdzv-metrics")
        self._version = version
        self._accepted: dict[str, str] = {}  # Accept header -> content type
        self._encoders: dict[str, Callable[[CollectorRegistry], bytes]] = {}  # content type ->
        # (path, content type) -> (version, time rendered, head, body)
        self._rendered: dict[tuple[str, str], tuple[object, float, bytes, bytes]] = {}
        self._render_lock = threading.Lock()
        self._date = (0, b"")
        self._requested_port = port
        self._port: int | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- called by requests
    def authorized(self, header: str) -> bool:
        """Whether an ``Authorization`` header carries one of the tokens (any, without)."""
        if not self.tokens:
            return True
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer" or not credentials:
            return False
        given = credentials.strip().encode("utf-8", "replace")
        return any(hmac.compare_digest(given, token) for token in self.tokens)

    def body_key(self, path: str, accept: str) -> tuple[str, str]:
        """(path, content type) of a data request: the cache key of its body."""
        if path != "/metrics":
            return path, _JSON
        ctype = self._accepted.get(accept)
        if ctype is None:
            encoder, ctype = choose_encoder(accept)
            self._encoders[ctype] = encoder
            if len(self._accepted) < 64:  # scrapers send one or two distinct values
                self._accepted[accept] = ctype
        return path, ctype

    def cached(self, key: tuple[str, str]) -> tuple[bytes, bytes] | None:
        """The rendered (head, body) of ``key`` while it is current: while ``version()`` is
        unchanged when the listener has one, else for :data:`RENDER_MAX_AGE` seconds."""
        cached = self._rendered.get(key)
        if cached is None:
            return None
        if self._version is None:
            if time.monotonic() - cached[1] >= RENDER_MAX_AGE:
                return None
        elif cached[0] != self._version():
            return None
        return cached[2], cached[3]

    def render(self, key: tuple[str, str]) -> tuple[bytes, bytes]:
        """Render the body of ``key`` (``(path, content type)``) unless another thread just
        did (one render at a time: concurrent requests share it)."""
        with self._render_lock:
            cached = self.cached(key)
            if cached is not None:
                return cached
            version = None if self._version is None else self._version()
            now = time.monotonic()
            path, ctype = key
            if path == "/metrics":
                body = self._encoders[ctype](self.registry)
            else:
                body = json.dumps(self.status(), default=str).encode()
            head = _head(HTTPStatus.OK, ctype, len(body))
            self._rendered[key] = (version, now, head, body)
            return head, body

    def list_keys(self, query: str) -> tuple[bytes, bytes]:
        """``/api/keys?prefix=P&limit=N``: key names and sizes (never values)."""
        keys = self.keys
        assert keys is not None
        params = parse_qs(query, keep_blank_values=True)
        prefix = params.get("prefix", [""])[-1]
        raw = params.get("limit", [str(DEFAULT_KEYS)])[-1]
        try:
            limit = int(raw)
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_KEYS:
            return _text_reply(HTTPStatus.BAD_REQUEST, f"limit must be an integer in 1..{MAX_KEYS}")
        try:
            body = json.dumps(keys(prefix, limit)).encode()
        except Unavailable as exc:
            return _text_reply(
                HTTPStatus.SERVICE_UNAVAILABLE, f"unavailable: {exc}", {"Retry-After": "1"}
            )
        return _head(HTTPStatus.OK, _JSON, len(body)), body

    def date_line(self) -> bytes:
        """``Date: ...\\r\\n`` of this second."""
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, f"Date: {formatdate(now, usegmt=True)}\r\n".encode())
        return self._date[1]

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> ObserveServer:
        """Bind and serve in a daemon thread; raises OSError when the address cannot be
        resolved or bound (the listener is then closed)."""
        try:
            self._bind()
        except BaseException:
            self.close()
            raise
        self.loop.call_later(1.0, self._close_idle)
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="rdzv-metrics", daemon=True
        )
        self._thread.start()
        return self

    def _bind(self) -> None:
        infos = socket.getaddrinfo(self.host, self._requested_port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        self.loopback = all(_is_loopback(str(info[4][0])) for info in infos)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(64)
            sock.setblocking(False)
            self._server = self.loop.run_until_complete(
                self.loop.create_server(lambda: _Connection(self), sock=sock)
            )
        except BaseException:
            sock.close()
            raise
        self._port = int(sock.getsockname()[1])

    def _close_idle(self) -> None:
        now = time.monotonic()
        for connection in [c for c in self.connections if c.idle(now)]:
            connection.abort()
        self.loop.call_later(1.0, self._close_idle)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the metrics listener is not started")
        return self._port

    @property
    def url(self) -> str:
        """:func:`listener_url` of this listener."""
        return listener_url(self.host, self.port)

    def close(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is None:
            self.loop.close()
            self.pool.shutdown(wait=False)
            return

        def stop() -> None:
            if self._server is not None:
                self._server.close()
            for connection in list(self.connections):
                connection.abort()
            self.loop.call_soon(self.loop.stop)  # after the connections' connection_lost

        self.loop.call_soon_threadsafe(stop)
        thread.join(5.0)
        self.pool.shutdown(wait=False, cancel_futures=True)
        if not thread.is_alive():
            self.loop.close()
