"""EtcdClient: the etcd v3 connection layer under :class:`~rdzv.store.etcd.EtcdStore`.

etcd-sdk-python (imported as ``pyetcd``) supplies the generated etcd v3 protobuf messages and
gRPC stubs; this module adds what a store needs from a production client and that the SDK's
own client does not do:

* **several endpoints with failover**: requests go to one endpoint; when it cannot be reached
  (or has no raft leader) the request moves on to the next one, round robin, with a short
  bounded back-off once every endpoint has failed, until the caller's deadline. The error at
  the deadline names every endpoint and the last thing that went wrong with it.
* **safe retries**: a request that provably never executed (connection refused, no leader,
  expired auth token) is retried anywhere. A request whose connection broke *while* it was in
  flight is retried only when repeating it cannot change the outcome (reads, plain puts,
  watches, lease grants and keep-alives); for the others (compare-and-swap transactions,
  deletes) the client raises :class:`~rdzv.errors.NetworkError` saying the outcome is
  unknown, like etcd's Go client, rather than risk applying an ``add`` twice.
* every request carries etcd's ``hasleader`` metadata, so a member cut off from its
  cluster answers "no leader" at once instead of stalling, and watches on such a member are
  cancelled (then resumed elsewhere by the caller);
* **TLS** (CA, client certificate and key files) and **user/password** authentication, with
  transparent re-authentication when the server forgets a token (e.g. after a restart);
* configurable gRPC message limits (etcd's default request limit is 1.5 MiB; gRPC's default
  receive limit is 4 MiB) and keep-alive pings that detect dead connections.

Watches are one gRPC stream per blocking call, consumed by the calling thread with the
call's deadline; no background thread polls anything.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from rdzv.endpoint import EndpointError, format_endpoint, parse_endpoint
from rdzv.errors import AuthError, NetworkError, StoreError
from rdzv.store.base import Deadline

try:
    import grpc
    from pyetcd import etcdrpc
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "rdzv's etcd support needs the etcd v3 client packages (etcd-sdk-python, grpcio, "
        f'protobuf), which are not installed ({_exc}); install them with: pip install "rdzv[etcd]"'
    ) from _exc

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_PORT",
    "DEFAULT_REQUEST_TIMEOUT",
    "EtcdClient",
    "EtcdEndpoint",
    "WatchLostError",
    "parse_endpoints",
    "prefix_range_end",
]

log = logging.getLogger("rdzv.store.etcd")

#: etcd's IANA client port.
DEFAULT_PORT = 2379
#: gRPC message limit of both directions: large enough for any request etcd accepts
#: (``--max-request-bytes`` is capped by etcd at a few hundred MiB in practice).
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
#: Upper bound of one request attempt in seconds (a hung server costs at most this much
#: before the request moves to the next endpoint).
DEFAULT_REQUEST_TIMEOUT = 30.0
#: Every endpoint gets at least one attempt this long, even for a call with timeout 0.
_MIN_ATTEMPT = 1.0
#: A watch that ends this close to its deadline ended because of it (clocks of the client's
#: and the server's view of the gRPC deadline differ slightly).
_DEADLINE_SLACK = 0.05
#: Back-off after every endpoint failed once, doubling up to the maximum (seconds).
_BACKOFF_START, _BACKOFF_MAX = 0.05, 1.0

# Errors that prove the server did not execute the request (gRPC could not connect, or the
# member rejected it before proposing it). Any request may be retried after these.
_UNSENT = re.compile(
    r"failed to connect|connection refused|dns resolution failed|name resolution|"
    r"etcdserver: no leader|etcdserver: not capable|etcdserver: too many requests|"
    r"no connection available|unreachable",
    re.IGNORECASE,
)
_NO_ROOM = re.compile(r"request is too large|message larger than max", re.IGNORECASE)


def prefix_range_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes an etcd range (or watch) cover every key starting with
    ``prefix``: the prefix with its last byte below 0xff incremented (etcd's convention)."""
    raw = bytearray(prefix)
    for i in reversed(range(len(raw))):
        if raw[i] < 0xFF:
            raw[i] += 1
            return bytes(raw[: i + 1])
    return b"\0"  # all-0xff prefix: to the end of the keyspace


@dataclass(frozen=True)
class EtcdEndpoint:
    """One etcd client URL: ``host`` (name or IP literal), ``port`` and whether its scheme
    asked for TLS (``https://``: True, ``http://``: False, none given: None)."""

    host: str
    port: int
    tls: bool | None = None

    @property
    def target(self) -> str:
        """``host:port`` as gRPC wants it (IPv6 literals in brackets)."""
        return format_endpoint(self.host, self.port)

    def __str__(self) -> str:
        return self.target


def parse_endpoints(spec: str | Sequence[str]) -> list[EtcdEndpoint]:
    """Parse etcd endpoints: a list of strings or one comma-separated string, each
    ``host``, ``host:port``, ``[v6]:port`` or a URL ``http://host:port`` /
    ``https://host:port`` (default port 2379; the rest of :mod:`rdzv.endpoint`'s rule).
    Raises ValueError naming the bad entry and what is wrong with it."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    result: list[EtcdEndpoint] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"etcd endpoints must be strings, got {type(item).__name__}: {item!r}")
        text = item.strip()
        tls: bool | None = None
        for scheme, secure in (("http://", False), ("https://", True)):
            if text.lower().startswith(scheme):
                text, tls = text[len(scheme) :], secure
        text = text.rstrip("/")
        if "://" in text or "/" in text:
            raise ValueError(
                f"bad etcd endpoint {item!r}: use host:port, http://host:port or https://host:port"
            )
        try:
            host, port = parse_endpoint(text, DEFAULT_PORT)
        except EndpointError as exc:
            raise ValueError(f"bad etcd endpoint {item!r}: {exc.reason}") from None
        result.append(EtcdEndpoint(host, port, tls))
    if not result:
        raise ValueError(f"no etcd endpoint given in {spec!r}")
    return result


def _read_file(path: str | os.PathLike[str], option: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"etcd TLS option {option}: the file {os.fspath(path)!r} does not exist"
        ) from None
    except OSError as exc:
        raise OSError(
            f"etcd TLS option {option}: cannot read {os.fspath(path)!r}: {exc.strerror}"
        ) from exc


class WatchLostError(Exception):
    """A watch stream ended before its deadline (endpoint lost, watch cancelled by the server,
    history compacted). The caller re-reads the state and watches again; the client has
    already moved to another endpoint when that helps."""


def _describe(exc: Any) -> str:
    try:
        return f"{exc.code().name}: {exc.details()}"
    except Exception:
        return repr(exc)


class EtcdClient:
    """A connection to an etcd v3 cluster (several endpoints, failover, TLS, auth).

    Args:
        endpoints: see :func:`parse_endpoints`.
        ca_cert: PEM file of the CA that signed the servers' certificates (enables TLS).
        cert, key: PEM files of this client's certificate and private key (TLS client
            authentication); both or neither.
        user, password: etcd user and password (both or neither).
        max_message_bytes: gRPC message limit of both directions, bytes.
        request_timeout: upper bound of one request attempt, seconds.

    Raises FileNotFoundError/OSError naming a missing or unreadable TLS file, ValueError for
    inconsistent options. Nothing is sent before the first request.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        ca_cert: str | os.PathLike[str] | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        user: str | None = None,
        password: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        self.endpoints = parse_endpoints(endpoints)
        if (cert is None) != (key is None):
            raise ValueError(
                "etcd TLS client authentication needs both cert and key "
                f"(got cert={cert!r}, key={key!r})"
            )
        if (user is None) != (password is None):
            raise ValueError("etcd authentication needs both user and password")
        if user is not None and not user:
            raise ValueError("etcd user name must not be empty")
        schemes = {e.tls for e in self.endpoints if e.tls is not None}
        if len(schemes) > 1:
            raise ValueError("etcd endpoints mix http:// and https://; use one scheme")
        if schemes == {False} and (ca_cert is not None or cert is not None):
            raise ValueError("TLS files were given but the endpoints say http://; use https://")
        self.tls = ca_cert is not None or cert is not None or schemes == {True}
        self._credentials: Any = None
        if self.tls:
            root = None if ca_cert is None else _read_file(ca_cert, "ca_cert")
            chain = None if cert is None else _read_file(cert, "cert")
            private = None if key is None else _read_file(key, "key")
            self._credentials = grpc.ssl_channel_credentials(root, private, chain)
        self.user = user
        self._password = password
        self.max_message_bytes = max_message_bytes
        self.request_timeout = request_timeout
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # etcd refuses pings closer than 5 s apart (--grpc-keepalive-min-time).
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1_000),
        ]
        self._lock = threading.Lock()
        self._channels: dict[int, Any] = {}
        self._current = 0
        self._token: str | None = None
        self._closed = False

    # ----------------------------------------------------------------- plumbing
    def __repr__(self) -> str:
        return f"EtcdClient({','.join(map(str, self.endpoints))})"

    @property
    def endpoint(self) -> EtcdEndpoint:
        """The endpoint requests currently go to."""
        return self.endpoints[self._current]

    def close(self) -> None:
        """Close every gRPC channel; later requests raise NetworkError."""
        with self._lock:
            self._closed = True
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()

    def _channel(self, index: int) -> Any:
        with self._lock:
            if self._closed:
                raise NetworkError(f"{self!r} is closed")
            channel = self._channels.get(index)
            if channel is None:
                target = self.endpoints[index].target
                if self.tls:
                    channel = grpc.secure_channel(target, self._credentials, self._options)
                else:
                    channel = grpc.insecure_channel(target, self._options)
                self._channels[index] = channel
            return channel

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token = self._token
        base = (("hasleader", "true"),)
        return base if token is None else (*base, ("token", token))

    def _authenticate(self, index: int, timeout: float) -> None:
        stub = etcdrpc.AuthStub(self._channel(index))
        request = etcdrpc.AuthenticateRequest(name=self.user, password=self._password)
        try:
            response = stub.Authenticate(request, timeout=timeout)
        except grpc.RpcError as exc:
            details = exc.details() or ""
            endpoint = self.endpoints[index]
            if "authentication failed" in details:
                raise AuthError(
                    f"etcd at {endpoint} rejected user {self.user!r}: wrong user name or password"
                ) from None
            if "authentication is not enabled" in details:
                raise AuthError(
                    f"etcd at {endpoint} has authentication disabled but user {self.user!r} "
                    "was given; drop user/password or run 'etcdctl auth enable'"
                ) from None
            raise
        self._token = response.token

    def _switch(self, failed: int) -> None:
        """Move to the endpoint after ``failed`` (unless another thread already moved)."""
        with self._lock:
            if self._current == failed:
                self._current = (failed + 1) % len(self.endpoints)

    # ----------------------------------------------------------------- requests
    def unary(
        self,
        service: str,
        method: str,
        request: Any,
        deadline: Deadline,
        *,
        idempotent: bool,
        what: str = "",
    ) -> Any:
        """Send the unary request ``service.method(request)`` (``service`` one of KV, Lease,
        Maintenance, Cluster) with failover until ``deadline``; see :meth:`call`."""

        def send(channel: Any, timeout: float, metadata: Any) -> Any:
            stub = getattr(etcdrpc, f"{service}Stub")(channel)
            return getattr(stub, method)(request, timeout=timeout, metadata=metadata)

        return self.call(send, deadline, idempotent=idempotent, what=what or method)

    def call(
        self,
        send: Callable[[Any, float, Any], Any],
        deadline: Deadline,
        *,
        idempotent: bool,
        what: str,
    ) -> Any:
        """Run ``send(channel, attempt_timeout, metadata)`` against the current endpoint,
        failing over to the next one until ``deadline``.

        ``idempotent``: whether repeating the request after a connection broke mid-request is
        harmless. ``what`` describes the operation for error messages.
        Raises NetworkError when no endpoint answers by the deadline (naming each endpoint
        and its last error) or when a non-idempotent request's outcome is unknown,
        AuthError for authentication and permission failures, StoreError for other errors
        reported by etcd (too large, too many operations, ...).
        """
        failures: dict[str, str] = {}
        backoff = _BACKOFF_START
        tried_in_cycle = 0
        reauth = 0
        n = len(self.endpoints)
        while True:
            index = self._current
            endpoint = self.endpoints[index]
            attempt = min(max(deadline.remaining(), _MIN_ATTEMPT), self.request_timeout)
            try:
                if self.user is not None and self._token is None:
                    self._authenticate(index, attempt)
                return send(self._channel(index), attempt, self._metadata())
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if code == grpc.StatusCode.UNAUTHENTICATED and self.user is not None and reauth < 2:
                    # The member does not know our token (restarted, or token TTL over):
                    # the request was refused, so authenticate again and resend it.
                    self._token = None
                    reauth += 1
                    continue
                self._raise_fatal(exc, endpoint, what)
                unsent = code == grpc.StatusCode.UNAVAILABLE and bool(_UNSENT.search(details))
                unsent = unsent or code == grpc.StatusCode.RESOURCE_EXHAUSTED
                failures[str(endpoint)] = _describe(exc)
                if not unsent and not idempotent:
                    raise NetworkError(
                        f"etcd {what} via {endpoint} failed mid-flight ({_describe(exc)}); it "
                        "may or may not have been applied: check the state before retrying"
                    ) from None
                log.debug("etcd %s via %s failed (%s); failing over", what, endpoint, details)
            self._switch(index)
            tried_in_cycle += 1
            if tried_in_cycle >= n:
                if deadline.remaining() <= 0:
                    raise self._unreachable(failures, deadline, what)
                time.sleep(min(backoff, deadline.remaining()))
                backoff = min(backoff * 2, _BACKOFF_MAX)
                tried_in_cycle = 0

    def _unreachable(self, failures: dict[str, str], deadline: Deadline, what: str) -> NetworkError:
        listing = "; ".join(f"{ep}: {err}" for ep, err in failures.items())
        limit = "" if math.isinf(deadline.timeout) else f" within {deadline.timeout:g} s"
        return NetworkError(
            f"etcd {what}: no etcd endpoint answered{limit} "
            f"(endpoints {', '.join(map(str, self.endpoints))}; {listing}); "
            "check that etcd runs at these addresses and that they are reachable"
        )

    def _raise_fatal(self, exc: Any, endpoint: EtcdEndpoint, what: str) -> None:
        """Raise the right error for failures that no other endpoint would fix."""
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.PERMISSION_DENIED or (
            code == grpc.StatusCode.UNAUTHENTICATED and self.user is None
        ):
            who = "anonymous clients" if self.user is None else f"user {self.user!r}"
            raise AuthError(
                f"etcd at {endpoint} refused {what}: permission denied for {who} ({details}); "
                "grant the user's role read/write access to the key prefix"
            ) from None
        if "user name is empty" in details or "invalid auth token" in details:
            raise AuthError(
                f"etcd at {endpoint} refused {what}: authentication is enabled on the cluster "
                "and no valid credentials were given; pass user and password"
            ) from None
        if _NO_ROOM.search(details):
            raise StoreError(
                f"etcd at {endpoint} refused {what}: {details}. etcd limits one request to "
                "--max-request-bytes (1.5 MiB by default); start etcd with a larger "
                "--max-request-bytes (and raise this client's max_message_bytes) or store "
                "smaller values"
            ) from None
        if "too many operations in txn" in details:
            raise StoreError(
                f"etcd at {endpoint} refused {what}: {details}; the client's max_txn_ops is "
                "larger than the server's --max-txn-ops (128 by default): lower one or raise "
                "the other"
            ) from None
        if code in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.OUT_OF_RANGE,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.UNIMPLEMENTED,
            grpc.StatusCode.DATA_LOSS,
            grpc.StatusCode.ALREADY_EXISTS,
        ):
            raise StoreError(f"etcd at {endpoint} refused {what}: {_describe(exc)}") from None

    # ----------------------------------------------------------------- watches
    def watch(
        self,
        ranges: Sequence[tuple[bytes, bytes]],
        start_revision: int,
        deadline: Deadline,
    ) -> Generator[Sequence[Any], None, None]:
        """Watch the key ranges ``[key, range_end)`` (``range_end`` empty: the single key)
        from ``start_revision`` on, on one gRPC stream; yield each non-empty batch of etcd
        events (``mvccpb.Event``: ``type`` 0 = PUT, 1 = DELETE, ``kv``).

        Returns when the deadline passes (or the caller stops iterating); callers check
        their deadline again rather than assume it has passed. Raises
        :class:`WatchLostError` when the stream breaks or the server cancels the watch;
        the caller re-reads and watches again from its new revision.
        """
        index = self._current
        endpoint = self.endpoints[index]
        stop = threading.Event()
        creates = [
            etcdrpc.WatchRequest(
                create_request=etcdrpc.WatchCreateRequest(
                    key=key, range_end=end, start_revision=start_revision
                )
            )
            for key, end in ranges
        ]

        def requests() -> Iterator[Any]:
            yield from creates
            stop.wait()  # keep the stream open until we are done

        remaining = deadline.remaining()
        try:
            if self.user is not None and self._token is None:
                self._authenticate(index, min(max(remaining, _MIN_ATTEMPT), self.request_timeout))
            call = etcdrpc.WatchStub(self._channel(index)).Watch(
                requests(),
                timeout=None if math.isinf(remaining) else remaining,
                metadata=self._metadata(),
            )
        except grpc.RpcError as exc:
            stop.set()
            self._switch(index)
            raise WatchLostError(f"watch on {endpoint} failed: {_describe(exc)}") from None
        try:
            for response in call:
                if response.canceled or response.compact_revision:
                    reason = response.cancel_reason or f"compacted at {response.compact_revision}"
                    if "permission denied" in reason:
                        raise AuthError(f"etcd at {endpoint} refused a watch: {reason}")
                    raise WatchLostError(f"watch cancelled by {endpoint}: {reason}")
                if response.events:
                    yield response.events
        except grpc.RpcError as exc:
            details = exc.details() or ""
            if (
                deadline.remaining() <= _DEADLINE_SLACK
                or exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                or "deadline exceeded" in details
            ):
                return  # our deadline (as seen by the client or by the server)
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED and self.user is not None:
                self._token = None
            elif exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                self._raise_fatal(exc, endpoint, "watch")
            else:
                self._switch(index)
            raise WatchLostError(f"watch on {endpoint} broke: {_describe(exc)}") from None
        finally:
            call.cancel()
            stop.set()
        if deadline.remaining() > _DEADLINE_SLACK:
            self._switch(index)
            raise WatchLostError(f"watch stream on {endpoint} ended early")

    def lease_keepalive(self, lease_id: int, deadline: Deadline) -> int:
        """Send one keep-alive for lease ``lease_id``; return its new TTL in seconds (0 when
        the lease no longer exists). Fails over like :meth:`call` (repeating a keep-alive
        is harmless)."""

        def send(channel: Any, timeout: float, metadata: Any) -> int:
            responses = etcdrpc.LeaseStub(channel).LeaseKeepAlive(
                iter([etcdrpc.LeaseKeepAliveRequest(ID=lease_id)]),
                timeout=timeout,
                metadata=metadata,
            )
            for response in responses:
                return int(response.TTL)
            return 0

        result: int = self.call(send, deadline, idempotent=True, what="lease keep-alive")
        return result
