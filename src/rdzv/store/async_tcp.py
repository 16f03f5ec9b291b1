"""AsyncTCPStore: the TCPStore client for asyncio programs.

The same operations, rules and wire traffic as :class:`~rdzv.store.tcp.TCPStore` (both run
the generators of :mod:`rdzv.store.tcp_ops`), with coroutine methods so that waiting for a
key never blocks the event loop::

    async with AsyncTCPStore("127.0.0.1", 29500, timeout=30) as store:
        await store.set("addr", b"10.0.0.1:1234")
        value = await store.get("addr")

``is_master=True`` starts a :class:`~rdzv.server.StoreServer` on the running event loop
(no thread), closed with the store. Calls on one store are serialised by an
:class:`asyncio.Lock` (torch keeps one request in flight per connection too); use
:meth:`clone` for concurrent calls. Reconnects after a server restart exactly as
:class:`~rdzv.store.tcp.TCPStore` (``reconnect=True``; see ``docs/durability.md``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from rdzv import auth, wire
from rdzv.endpoint import connect_host, format_endpoint
from rdzv.errors import StoreTimeoutError
from rdzv.store import tcp_ops as ops
from rdzv.store.base import (
    Deadline,
    KeyLike,
    TimeoutLike,
    ValueLike,
    _seconds_to_timedelta,
    barrier_arrivals_key,
    check_amount,
    check_barrier_rank,
    check_block,
    check_ttl,
    check_world_size,
    key_to_str,
    keys_to_list,
    missing_ranks,
    missing_ranks_error,
    timeout_to_seconds,
    value_to_bytes,
    values_to_list,
)
from rdzv.store.tcp import check_arguments, client_core
from rdzv.store.tcp_ops import Connect, Done, Recv, Sleep, resume
from rdzv.tls import TLSConfig, client_context

if TYPE_CHECKING:  # the server is imported only by a master (is_master=True)
    from rdzv.server import StoreServer

__all__ = ["AsyncTCPStore"]

logger = logging.getLogger("rdzv.store.async_tcp")

_T = TypeVar("_T")


if sys.version_info >= (3, 11):

    async def _within(awaitable: Awaitable[_T], timeout: float | None) -> _T:
        """``await awaitable`` for at most ``timeout`` seconds (asyncio.TimeoutError after).
        A timer on the running task: ``wait_for`` (before 3.12) wraps the awaitable in a new
        task, which cost a reply more client CPU than the rest of its handling."""
        if timeout is None:
            return await awaitable
        async with asyncio.timeout(timeout):
            return await awaitable

else:  # pragma: no cover - Python 3.10

    async def _within(awaitable: Awaitable[_T], timeout: float | None) -> _T:
        return await asyncio.wait_for(awaitable, timeout)


class AsyncTCPStore:
    """An asyncio client of a TCPStore server (torch's or rdzv's).

    Args: as :class:`~rdzv.store.tcp.TCPStore` (``token``, ``token_file``, ``tls`` and
    ``reconnect`` included), minus ``multi_tenant``, ``master_listen_fd`` and ``use_libuv``. Nothing
    happens until :meth:`connect` (or ``async with``, or the first call, which connects on
    demand).

    Every method has the semantics, arguments and errors of the same-named
    :class:`~rdzv.store.base.Store` method.
    """

    def __init__(
        self,
        host_name: str,
        port: int,
        world_size: int | None = None,
        is_master: bool = False,
        timeout: TimeoutLike = timedelta(seconds=300),
        wait_for_workers: bool = True,
        *,
        token: str | bytes | None = None,
        token_file: str | os.PathLike[str] | None = None,
        tls: ssl.SSLContext | TLSConfig | None = None,
        reconnect: bool = True,
    ) -> None:
        self._host, self._port, self._timeout = check_arguments(
            host_name, port, world_size, is_master, timeout, tls
        )
        self._token = auth.load_token(token, token_file)
        self._tls = tls
        self._tls_context = None if tls is None else client_context(tls)
        self._workers = world_size if wait_for_workers else None
        self._is_master = is_master
        self._reconnect = bool(reconnect)
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._server: StoreServer | None = None
        self._started = False
        self._locate()

    def _locate(self) -> None:
        """A new connection core for this store's host and port."""
        self._core = client_core(
            self, self._host, self._port, self._timeout, self._token, self._tls, self._reconnect
        )
        self._session = self._core.session  # the operations' protocol state

    def __repr__(self) -> str:
        return f"AsyncTCPStore({format_endpoint(connect_host(self._host), self._port)})"

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def timeout(self) -> timedelta:
        return _seconds_to_timedelta(self._timeout)

    @property
    def extensions(self) -> bool:
        """True when the server offers rdzv's protocol extensions."""
        return self._session.extended

    def set_timeout(self, timeout: TimeoutLike) -> None:
        self._timeout = timeout_to_seconds(timeout)
        self._core.set_timeout(self._timeout)

    def _resolve(self, timeout: TimeoutLike | None) -> float:
        return self._timeout if timeout is None else timeout_to_seconds(timeout)

    # ------------------------------------------------------------------ connection
    async def connect(self) -> AsyncTCPStore:
        """Start the server (``is_master``), connect, register as a worker and (master) wait
        for the others, exactly as the TCPStore constructor. Idempotent."""
        async with self._lock:
            await self._open()
        return self

    async def _open(self) -> None:
        if self._started or self._core.lost:  # lost: the core reconnects
            return
        if self._is_master and self._server is None and self._core.broken is None:
            from rdzv.server import StoreServer

            self._server = StoreServer(self._host, self._port, token=self._token)
            await self._server.start()
            self._port = self._server.port
            self._locate()  # the bound port
        await self._drive(self._core.start(self._workers, self._server is not None))
        self._started = True

    def _drop(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()

    async def close(self) -> None:
        """Close the connection, and the server when this store started it."""
        self._drop()
        self._core.closed()
        if self._server is not None:
            server, self._server = self._server, None
            await server.close()

    async def __aenter__(self) -> AsyncTCPStore:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def clone(self) -> AsyncTCPStore:
        """A new, connected store on the same server (no worker counting)."""
        twin = AsyncTCPStore(
            self._host,
            self._port,
            timeout=self._timeout,
            wait_for_workers=False,
            token=self._token,
            tls=self._tls,
            reconnect=self._reconnect,
        )
        return await twin.connect()

    # ------------------------------------------------------------------ driver
    async def _run(
        self,
        make: Callable[[], Generator[Any, Any, _T]] | None,
        unsafe: str | None = None,
        sent: bytes | None = None,
    ) -> _T:
        """Perform the operation ``make()`` builds under the store's lock (connecting on
        demand), with the reconnect rules of :meth:`~rdzv.store.tcp_ops.ClientCore.run`."""
        async with self._lock:
            await self._open()
            return await self._drive(self._core.run(make, unsafe, sent))

    async def _drive(self, core: Generator[Any, Any, _T]) -> _T:
        """Perform the I/O actions of ``core`` on asyncio streams."""
        value: Any = None
        error: Exception | None = None
        while True:
            action = resume(core, value, error)
            kind, value, error = action.__class__, None, None
            try:
                if kind is bytes:
                    writer: Any = self._writer
                    writer.write(action)
                    await writer.drain()
                elif kind is Recv:
                    remaining = action.deadline - time.monotonic()
                    if remaining > 0:
                        reader: Any = self._reader
                        limit = None if math.isinf(remaining) else remaining
                        try:
                            value = await _within(reader.read(action.size), limit)
                        except asyncio.TimeoutError:
                            value = None  # the deadline passed
                elif kind is Done:
                    result: _T = action.value
                    return result
                elif kind is Sleep:
                    await asyncio.sleep(action.seconds)
                elif kind is Connect:
                    self._drop()
                    await self._connect(action)
                else:
                    self._drop()
            except Exception as exc:
                error = exc

    async def _connect(self, connect: Connect) -> None:
        tls: dict[str, Any] = {}
        if self._tls_context is not None:
            ctx, hostname = self._tls_context
            tls = {"ssl": ctx, "server_hostname": hostname or connect.host}
        try:
            reader, writer = await _within(
                asyncio.open_connection(connect.host, connect.port, **tls), connect.timeout
            )
        except asyncio.TimeoutError:  # not an OSError before Python 3.11
            raise TimeoutError(f"no connection within {connect.timeout:g} s") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader, self._writer = reader, writer

    async def _send(self, data: bytes, unsafe: str | None = None) -> None:
        await self._run(None, unsafe, data)

    # ------------------------------------------------------------------ Store API
    async def set(self, key: KeyLike, value: ValueLike) -> None:
        await self._send(wire.encode_set(ops.wire_key(key_to_str(key)), value_to_bytes(value)))

    async def get(self, key: KeyLike, timeout: TimeoutLike | None = None) -> bytes:
        """The value of ``key``, waiting for it at most ``timeout`` (default: the store's
        timeout; one request on an rdzv server). Raises StoreTimeoutError on expiry."""
        k, deadline = key_to_str(key), Deadline(self._resolve(timeout))
        return await self._run(lambda: ops.get(self._session, k, deadline.remaining()))

    async def add(self, key: KeyLike, amount: int) -> int:
        wkey = ops.wire_key(key_to_str(key))
        n = check_amount(key, amount)
        return await self._run(lambda: ops.add(self._session, wkey, n), "add" if n else None)

    async def append(self, key: KeyLike, value: ValueLike) -> None:
        wkey = ops.wire_key(key_to_str(key))
        await self._send(wire.encode_set(wkey, value_to_bytes(value), wire.Op.APPEND), "append")

    async def compare_set(self, key: KeyLike, expected: ValueLike, desired: ValueLike) -> bytes:
        exp = value_to_bytes(expected, "expected value")
        des = value_to_bytes(desired, "desired value")
        k = key_to_str(key)
        return await self._run(lambda: ops.compare_set(self._session, k, exp, des), "compare_set")

    async def check(self, keys: Sequence[KeyLike]) -> bool:
        key_list = keys_to_list(keys)
        return await self._run(lambda: ops.check(self._session, key_list))

    async def wait(self, keys: Sequence[KeyLike], timeout: TimeoutLike | None = None) -> None:
        key_list = keys_to_list(keys)
        deadline = Deadline(self._resolve(timeout))
        if key_list:
            await self._run(lambda: ops.wait(self._session, key_list, deadline.remaining()))

    async def delete_key(self, key: KeyLike) -> bool:
        k = key_to_str(key)
        return await self._run(lambda: ops.delete_key(self._session, k))

    async def num_keys(self) -> int:
        return await self._run(lambda: ops.num_keys(self._session))

    async def list_keys(self) -> list[str]:
        return await self._run(lambda: ops.list_keys(self._session))

    async def list_key_sizes(self, prefix: str = "") -> list[tuple[str, int]]:
        return await self._run(lambda: ops.list_key_sizes(self._session, prefix))

    async def multi_get(
        self, keys: Sequence[KeyLike], timeout: TimeoutLike | None = None
    ) -> list[bytes]:
        """The values of ``keys``, waiting for missing ones at most ``timeout`` (default: the
        store's timeout; 0: do not wait). Raises StoreTimeoutError on expiry (as
        :meth:`TCPStore.multi_get <rdzv.store.base.Store.multi_get>`)."""
        key_list = keys_to_list(keys)
        if not key_list:
            return []
        deadline = Deadline(self._resolve(timeout))
        return await self._run(lambda: ops.multi_get(self._session, key_list, deadline.remaining()))

    async def multi_set(self, keys: Sequence[KeyLike], values: Sequence[ValueLike]) -> None:
        key_list = keys_to_list(keys)
        value_list = values_to_list(key_list, values)
        if key_list:
            wkeys = [ops.wire_key(k) for k in key_list]
            await self._send(wire.encode_multi_set(wkeys, value_list))

    async def queue_push(self, key: KeyLike, value: ValueLike) -> None:
        wkey = ops.wire_key(key_to_str(key))
        request = wire.encode_set(wkey, value_to_bytes(value), wire.Op.QUEUE_PUSH)
        await self._send(request, "queue_push")

    async def queue_pop(self, key: KeyLike, block: bool = True) -> bytes:
        timeout = self._timeout if check_block(block) else None
        k = key_to_str(key)
        return await self._run(lambda: ops.queue_pop(self._session, k, timeout), "queue_pop")

    async def queue_len(self, key: KeyLike) -> int:
        k = key_to_str(key)
        return await self._run(lambda: ops.queue_len(self._session, k))

    async def barrier(
        self,
        key: KeyLike,
        world_size: int,
        timeout: TimeoutLike | None = None,
        rank: int | None = None,
    ) -> None:
        """See :meth:`rdzv.store.base.Store.barrier` (``rank``: list the missing on a
        timeout)."""
        size = check_world_size(world_size)
        k, seconds = key_to_str(key), self._resolve(timeout)
        if rank is None:
            await self._run(lambda: ops.barrier(self._session, k, size, seconds), "barrier")
            return
        me = check_barrier_rank(rank, size)
        log = barrier_arrivals_key(k)
        await self.append(log, f"{me}\n")
        try:
            await self._run(lambda: ops.barrier(self._session, k, size, seconds), "barrier")
        except StoreTimeoutError as exc:
            missing = missing_ranks(await self.get(log), size, me)
            raise StoreTimeoutError(missing_ranks_error(exc, missing, size)) from None

    async def set_ephemeral(self, key: KeyLike, value: ValueLike) -> None:
        """See :meth:`rdzv.store.tcp.TCPStore.set_ephemeral`."""
        k, v = key_to_str(key), value_to_bytes(value)
        await self._run(lambda: ops.set_ephemeral(self._session, k, v))

    async def set_lease(self, key: KeyLike, value: ValueLike, ttl: TimeoutLike) -> None:
        """See :meth:`rdzv.store.base.Store.set_lease` (rdzv servers only)."""
        ttl_ms = ops.lease_ms(check_ttl(ttl))
        k, v = key_to_str(key), value_to_bytes(value)
        await self._run(lambda: ops.set_lease(self._session, k, v, ttl_ms))

    def has_extended_api(self) -> bool:
        return True
