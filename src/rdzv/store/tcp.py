"""TCPStore: a client of a TCPStore server, byte-compatible with torch 2.13 both ways.

It talks to torch's servers (libuv and legacy) and to rdzv's (:mod:`rdzv.server`); torch's
``torch.distributed.TCPStore`` clients talk to rdzv's server. With ``is_master=True`` it
starts an rdzv server in a background thread of this process, like torch.

Differences from ``torch.distributed.TCPStore`` (each on purpose):

* the master's server listens on ``host_name`` exactly, not on every interface
  (``"0.0.0.0"``, ``"::"`` or ``""`` ask for all interfaces explicitly);
* every reply has a deadline (the store timeout, at least
  :data:`~rdzv.store.tcp_ops.MIN_IO_TIMEOUT`): a silent server raises
  :class:`~rdzv.errors.NetworkError` naming the endpoint and the awaited reply instead of
  hanging forever;
* ``timeout=0`` means "do not block" and is exact (torch's zero-timeout wait is racy);
* ``num_keys()`` counts like torch's, the ``init/`` worker counter included;
  ``list_keys()`` hides that key (``len(list_keys())`` counts user keys only);
* against an rdzv server, rdzv's negotiated protocol extensions are used: ``add`` on a
  non-integer raises :class:`~rdzv.errors.CounterError` and the connection stays usable
  (torch's server drops it), ``get`` is one round trip and waits for a *value* (a queue of
  the same name does not count), a blocking ``queue_pop`` is atomic;
* barriers are reusable (see :meth:`~rdzv.store.base.Store.barrier`) on an rdzv server;
* it reconnects (``reconnect=True``, the default) when the server closes or resets the
  connection (a restart of a durable ``rdzv serve --data-dir``): with back-off, within the
  store timeout; idempotent operations in flight (set, get, check, wait, multi_get,
  multi_set, delete_key, num_keys, list_keys, queue_len, set_ephemeral, set_lease, and
  ``add(key, 0)``, a read) are
  re-sent, so a blocked ``get``/``wait`` keeps waiting on the new connection; the others
  (add, append, compare_set, queue_push, queue_pop, barrier) raise
  :class:`~rdzv.errors.NetworkError` saying their outcome is unknown. torch's client never
  reconnects. See ``docs/durability.md``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Generator
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from rdzv import auth, wire
from rdzv.endpoint import check_endpoint, connect_host, format_endpoint
from rdzv.errors import NetworkError, RdzvError
from rdzv.store import tcp_ops as ops
from rdzv.store.base import (
    DEFAULT_TIMEOUT,
    Deadline,
    Store,
    TimeoutLike,
    key_to_str,
    timeout_to_seconds,
    value_to_bytes,
)
from rdzv.store.tcp_ops import Connect, Done, Recv, Sleep, resume
from rdzv.tls import TLSConfig, client_context

if TYPE_CHECKING:  # the server is imported only by a master (is_master=True)
    from rdzv.server import ServerThread

__all__ = ["TCPStore"]

logger = logging.getLogger("rdzv.store.tcp")

_T = TypeVar("_T")


def check_arguments(
    host_name: object,
    port: object,
    world_size: object,
    is_master: object,
    timeout: object,
    tls: object,
) -> tuple[str, int, float]:
    """Validate the arguments TCPStore and AsyncTCPStore share; return ``(host_name, port,
    timeout in seconds)`` (a ``timeout`` of None: :data:`~rdzv.store.base.DEFAULT_TIMEOUT`).

    Raises:
        TypeError: a ``host_name`` that is not a str, a ``port`` that is not an int, an
            ``is_master`` that is not a bool, a ``world_size`` that is neither an int nor
            None, a ``timeout`` that is neither a timedelta nor a number of seconds.
        ValueError: a port outside 0..65535, a world size of 0 (torch's message), a
            negative or NaN timeout, ``tls`` with ``is_master`` (a master starts a plain
            server).
    """
    host, number = check_endpoint(host_name, port)
    if not isinstance(is_master, bool):
        raise TypeError(f"is_master must be a bool, got {type(is_master).__name__}")
    if world_size is not None:
        if not isinstance(world_size, int) or isinstance(world_size, bool):
            raise TypeError(f"world_size must be an int or None, got {world_size!r}")
        if world_size == 0:
            raise ValueError("TCPStore world size cannot be 0")
    seconds = DEFAULT_TIMEOUT if timeout is None else timeout_to_seconds(timeout)
    if tls is not None and is_master:
        raise ValueError(
            "tls= is for clients; start a TLS server with `rdzv serve --tls-cert` or "
            "StoreServer(ssl=...) and connect to it with is_master=False"
        )
    return host, number, seconds


def client_core(
    store: object,
    host_name: str,
    port: int,
    timeout: float,
    token: bytes | None,
    tls: object,
    reconnect: bool,
) -> ops.ClientCore:
    """The connection core of a TCPStore or AsyncTCPStore ``store`` (named by its repr)
    reaching ``host_name``:``port`` (wildcards: loopback)."""
    host = connect_host(host_name)
    endpoint = format_endpoint(host, port)
    return ops.ClientCore(
        host, port, endpoint, repr(store), timeout, token, tls is not None, reconnect
    )


def _agent_store_fallback(port: int) -> bool:
    # torch: a master that cannot bind becomes a client when TORCHELASTIC_USE_AGENT_STORE is
    # truthy and MASTER_PORT names this port (the torchelastic agent already hosts the store).
    flag = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").strip().lower()
    return flag in ("1", "true") and os.environ.get("MASTER_PORT", "").strip() == str(port)


class _ServerRef:
    """A master's share of a running server; the server stops when the last share is gone."""

    def __init__(self, thread: ServerThread) -> None:
        self.thread = thread
        self.port = thread.port
        weakref.finalize(self, thread.stop)


# port -> running shared server (multi_tenant=True), as torch's per-process cache.
_TENANTS: weakref.WeakValueDictionary[int, _ServerRef] = weakref.WeakValueDictionary()
_TENANTS_LOCK = threading.Lock()


def start_master_server(
    host_name: str,
    port: int,
    multi_tenant: bool,
    master_listen_fd: int | None,
    token: bytes | None = None,
) -> _ServerRef:
    """Start (or, with ``multi_tenant``, share) the server of a master TCPStore.

    Raises :class:`~rdzv.errors.NetworkError` when the port cannot be bound.
    """
    with _TENANTS_LOCK:
        if multi_tenant and port != 0:
            shared = _TENANTS.get(port)
            if shared is not None:
                return shared
        sock = None
        if master_listen_fd is not None:
            sock = socket.socket(fileno=os.dup(master_listen_fd))
            bound = sock.getsockname()[1]
            if port not in (0, bound):
                sock.close()
                raise ValueError(
                    f"master_listen_fd {master_listen_fd} is bound to port {bound}, "
                    f"but port={port} was requested"
                )
        from rdzv.server import ServerThread

        ref = _ServerRef(ServerThread(host_name, port, sock=sock, token=token).start())
        if multi_tenant:
            _TENANTS[ref.port] = ref
        return ref


class TCPStore(Store):
    """A store served over TCP; same constructor and semantics as
    ``torch.distributed.TCPStore`` (see the module docstring for the differences).

    Args:
        host_name: server address to connect to; for the master also the address the
            server listens on.
        port: server port; with ``is_master``, 0 picks a free one (see :attr:`port`).
        world_size: number of participants including the master; ``None`` (or negative)
            disables worker counting; 0 raises ValueError.
        is_master: start a server in a background thread of this process, then connect.
        timeout: default timeout of blocking calls, the connect deadline and the master's
            wait for workers (timedelta or seconds; default 300 s).
        wait_for_workers: with ``world_size``: every store adds 1 to the ``init/`` counter
            and the master waits until it reaches ``world_size``.
        multi_tenant: masters of the same port in this process share one server.
        master_listen_fd: an already bound socket for the master's server to adopt.
        use_libuv: accepted for compatibility and ignored (reported by :attr:`libuvBackend`).
        token: shared secret (str or bytes, >= 16 bytes) to authenticate with (rdzv only;
            ``docs/security.md``); default ``$RDZV_TOKEN`` if set. A master's server then
            requires it too. The client also checks the server's proof: it refuses a server
            that does not know the token, or that has no authentication.
        token_file: file holding the secret instead of ``token``.
        tls: connect with TLS: an :class:`ssl.SSLContext` or a :class:`~rdzv.tls.TLSConfig`
            (ca, cert, key, server_hostname). Not with ``is_master`` (start a TLS server
            with ``rdzv serve --tls-cert`` or ``StoreServer(ssl=...)``).
        reconnect: reconnect after the server closed or reset the connection (see the
            module docstring); False: the store is unusable after that, like torch's.

    Raises:
        TypeError / ValueError: bad arguments (as torch).
        AuthError: authentication or TLS failed (wrong or missing token, a server without
            authentication while we have a token, an untrusted/expired/wrong-host
            certificate); not retried.
        NetworkError: the server could not be reached before ``timeout`` (connect retries
            with exponential back-off and jitter until then), or the master could not bind.
        StoreTimeoutError: the master's wait for workers timed out.

    Thread-safe: one lock serialises the calls on a connection; :meth:`clone` gives another
    thread its own connection.
    """

    def __init__(
        self,
        host_name: str,
        port: int,
        world_size: int | None = None,
        is_master: bool = False,
        timeout: TimeoutLike = timedelta(seconds=300),
        wait_for_workers: bool = True,
        multi_tenant: bool = False,
        master_listen_fd: int | None = None,
        use_libuv: bool = True,
        *,
        token: str | bytes | None = None,
        token_file: str | os.PathLike[str] | None = None,
        tls: ssl.SSLContext | TLSConfig | None = None,
        reconnect: bool = True,
    ) -> None:
        host_name, port, seconds = check_arguments(
            host_name, port, world_size, is_master, timeout, tls
        )
        super().__init__(seconds)
        self._host = host_name
        self._port = port
        self._use_libuv = bool(use_libuv)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._reconnect = bool(reconnect)
        self._server: _ServerRef | None = None
        self._token = auth.load_token(token, token_file)
        self._tls = tls
        self._tls_context = None if tls is None else client_context(tls)
        if is_master:
            try:
                self._server = start_master_server(
                    host_name, port, multi_tenant, master_listen_fd, self._token
                )
                self._port = self._server.port
            except NetworkError as exc:
                if not _agent_store_fallback(port):
                    raise
                logger.warning("%s; continuing as a client (TORCHELASTIC_USE_AGENT_STORE)", exc)
        self._core = client_core(
            self, host_name, self._port, self._timeout, self._token, tls, self._reconnect
        )
        self._session = self._core.session  # the operations' protocol state
        workers = world_size if wait_for_workers else None
        self._drive(self._core.start(workers, is_master and self._server is not None))

    # ------------------------------------------------------------------ properties
    def __repr__(self) -> str:
        return f"TCPStore({format_endpoint(connect_host(self._host), self._port)})"

    @property
    def host(self) -> str:
        """The ``host_name`` given to the constructor."""
        return self._host

    @property
    def port(self) -> int:
        """The server port (the bound one for a master started with port 0)."""
        return self._port

    @property
    def reconnect(self) -> bool:
        """Whether a lost connection (the server closed or reset it) is reconnected within
        the store timeout (the ``reconnect`` argument; see the module docstring). Settable,
        from any thread: while False, a call that finds the connection lost raises
        :class:`~rdzv.errors.NetworkError` at once, as torch's client does (a connection
        lost while it was True stays reconnectable once it is True again); a best-effort
        last call (``DynamicRendezvousHandler.shutdown``) uses it not to wait out a server
        that is gone."""
        return self._reconnect

    @reconnect.setter
    def reconnect(self, value: bool) -> None:
        self._reconnect = bool(value)
        self._core.reconnect = self._reconnect

    @property
    def libuvBackend(self) -> bool:
        """The ``use_libuv`` flag given (torch's property; rdzv has one server)."""
        return self._use_libuv

    @property
    def extensions(self) -> bool:
        """True when the server is an rdzv server offering protocol extensions."""
        return self._session.extended

    def set_timeout(self, timeout: TimeoutLike) -> None:
        super().set_timeout(timeout)
        self._core.set_timeout(self._timeout)

    def has_extended_api(self) -> bool:
        return True

    def clone(self) -> TCPStore:
        """A new connection to the same server (no worker counting), with this timeout."""
        return TCPStore(
            self._host,
            self._port,
            timeout=self._timeout,
            wait_for_workers=False,
            use_libuv=self._use_libuv,
            token=self._token,
            tls=self._tls,
            reconnect=self._reconnect,
        )

    def close(self) -> None:
        """Close the connection (and release this master's share of its server)."""
        with self._lock:
            self._close()
            self._core.closed()
            self._server = None

    def interrupt(self, error: RdzvError) -> None:
        """From any thread: make the call blocked on this connection, and every later call,
        raise (a copy of) ``error`` at once; the connection is shut down and never reopened.
        Used to abort a worker's blocked ``wait`` with
        :class:`~rdzv.errors.PeerFailedError` when a peer failed (:func:`rdzv.connect`)."""
        self._core.interrupted = error
        sock = self._sock
        if sock is not None:
            # Already closed: the blocked call fails anyway.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> TCPStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()

    # ------------------------------------------------------------------ driver
    def _run(
        self,
        make: Callable[[], Generator[Any, Any, _T]] | None,
        unsafe: str | None = None,
        sent: bytes | None = None,
    ) -> _T:
        """Perform the operation ``make()`` builds under the connection lock, with the
        reconnect rules of :meth:`~rdzv.store.tcp_ops.ClientCore.run`."""
        with self._lock:
            return self._drive(self._core.run(make, unsafe, sent))

    def _drive(self, core: Generator[Any, Any, _T]) -> _T:
        """Perform the I/O actions of ``core`` on a blocking socket."""
        sock: Any = self._sock  # None until a Connect, after a Close
        value: Any = None
        error: Exception | None = None
        while True:
            action = resume(core, value, error)
            kind, value, error = action.__class__, None, None
            try:
                if kind is bytes:
                    sock.sendall(action)
                elif kind is Recv:
                    remaining = action.deadline - time.monotonic()
                    if remaining > 0:
                        sock.settimeout(None if math.isinf(remaining) else remaining)
                        try:
                            value = sock.recv(action.size)
                        except TimeoutError:
                            value = None  # the deadline passed
                elif kind is Done:
                    result: _T = action.value
                    return result
                elif kind is Sleep:
                    time.sleep(action.seconds)
                elif kind is Connect:
                    self._close()
                    sock = self._sock = self._open(action)
                else:
                    self._close()
                    sock = None
            except Exception as exc:
                error = exc

    def _open(self, connect: Connect) -> socket.socket:
        sock = socket.create_connection((connect.host, connect.port), timeout=connect.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls_context is not None:
                ctx, hostname = self._tls_context
                sock = ctx.wrap_socket(sock, server_hostname=hostname or connect.host)
        except BaseException:
            sock.close()
            raise
        return sock

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # ------------------------------------------------------------------ store core
    def _set(self, key: str, value: bytes) -> None:
        self._send(wire.encode_set(ops.wire_key(key), value))

    def _send(self, data: bytes, unsafe: str | None = None) -> None:
        self._run(None, unsafe, data)

    def _get(self, key: str, timeout: float) -> bytes:
        deadline = Deadline(timeout)
        return self._run(lambda: ops.get(self._session, key, deadline.remaining()))

    def _add(self, key: str, amount: int) -> int:
        # add(key, 0) reads the counter: safe to perform again after a reconnect.
        unsafe = "add" if amount else None
        return self._run(lambda: ops.add(self._session, ops.wire_key(key), amount), unsafe)

    def _append(self, key: str, value: bytes) -> None:
        self._send(wire.encode_set(ops.wire_key(key), value, wire.Op.APPEND), "append")

    def _compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        op = ops.compare_set
        return self._run(lambda: op(self._session, key, expected, desired), "compare_set")

    def _check(self, keys: list[str]) -> bool:
        return self._run(lambda: ops.check(self._session, keys))

    def _wait(self, keys: list[str], timeout: float) -> None:
        deadline = Deadline(timeout)
        self._run(lambda: ops.wait(self._session, keys, deadline.remaining()))

    def _delete_key(self, key: str) -> bool:
        return self._run(lambda: ops.delete_key(self._session, key))

    def _num_keys(self) -> int:
        return self._run(lambda: ops.num_keys(self._session))

    def _list_keys(self) -> list[str]:
        return self._run(lambda: ops.list_keys(self._session))

    def _multi_get(self, keys: list[str], timeout: float) -> list[bytes]:
        deadline = Deadline(timeout)
        return self._run(lambda: ops.multi_get(self._session, keys, deadline.remaining()))

    def _multi_set(self, keys: list[str], values: list[bytes]) -> None:
        self._send(wire.encode_multi_set([ops.wire_key(k) for k in keys], values))

    def _barrier(self, key: str, world_size: int, timeout: float) -> None:
        op = ops.barrier
        self._run(lambda: op(self._session, key, world_size, timeout), "barrier")

    def _queue_push(self, key: str, value: bytes) -> None:
        self._send(wire.encode_set(ops.wire_key(key), value, wire.Op.QUEUE_PUSH), "queue_push")

    def _queue_pop(self, key: str, timeout: float | None) -> bytes:
        return self._run(lambda: ops.queue_pop(self._session, key, timeout), "queue_pop")

    def _queue_len(self, key: str) -> int:
        return self._run(lambda: ops.queue_len(self._session, key))

    # ------------------------------------------------------------------ rdzv extras
    def list_key_sizes(self, prefix: str = "") -> list[tuple[str, int]]:
        """``(key, size of its value in bytes)`` for every key starting with ``prefix``."""
        return self._run(lambda: ops.list_key_sizes(self._session, prefix))

    def set_ephemeral(self, key: str, value: bytes | str) -> None:
        """Set ``key`` bound to this connection: the server deletes it when the connection
        closes (a crashed process's liveness key disappears). rdzv servers only: raises
        StoreError on a torch server. A later plain write makes the key ordinary again.
        Keys that expire after a time: :meth:`~rdzv.store.base.Store.set_lease`."""
        k, v = key_to_str(key), value_to_bytes(value)
        self._run(lambda: ops.set_ephemeral(self._session, k, v))

    def _set_lease(self, key: str, value: bytes, ttl: float) -> None:
        # Store.set_lease: semantics, units, errors. rdzv servers only (EXT_SET_LEASE).
        ttl_ms = ops.lease_ms(ttl)
        self._run(lambda: ops.set_lease(self._session, key, value, ttl_ms))
