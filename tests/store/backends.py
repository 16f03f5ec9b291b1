"""The registry of Store backends the contract suite runs against.

Each entry is a context-manager factory ``(tmp_path) -> Iterator[Store]`` that yields a fresh,
empty store with a 5 s default timeout and cleans up after itself. A new backend adds one
entry here and gets the whole contract suite for free.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any

from rdzv import HashStore, PrefixStore, Store
from rdzv.server import ServerThread
from rdzv.store.async_tcp import AsyncTCPStore
from rdzv.store.file import FileStore
from rdzv.store.tcp import TCPStore
from tests.store.async_bridge import AsyncBridge, LoopThread

Factory = Callable[[Path], ContextManager[Store]]


@contextlib.contextmanager
def hash_store(tmp_path: Path) -> Iterator[Store]:
    yield HashStore(timeout=5)


@contextlib.contextmanager
def prefix_over_hash(tmp_path: Path) -> Iterator[Store]:
    yield PrefixStore("pre", HashStore(timeout=5))


@contextlib.contextmanager
def etcd_store(tmp_path: Path) -> Iterator[Store]:
    # A fresh random prefix per test on the session's shared etcd member, whose limits
    # (--max-txn-ops, --max-request-bytes) the client is told about.
    from rdzv.store.etcd import EtcdStore
    from tests.etcd_fixtures import MAX_REQUEST_BYTES, MAX_TXN_OPS, fresh_prefix, shared_member

    store = EtcdStore(
        shared_member().endpoint,
        fresh_prefix(),
        timeout=5,
        max_txn_ops=MAX_TXN_OPS,
        max_request_bytes=MAX_REQUEST_BYTES,
    )
    try:
        yield store
    finally:
        store.close()


@contextlib.contextmanager
def tcp_store(tmp_path: Path) -> Iterator[Store]:
    """A client of an ``is_master`` server on an ephemeral loopback port."""
    with (
        TCPStore("127.0.0.1", 0, is_master=True, timeout=5) as master,
        TCPStore("127.0.0.1", master.port, timeout=5) as client,
    ):
        yield client


@contextlib.contextmanager
def _client_of_server(**server_options: Any) -> Iterator[Store]:
    """A client of a server thread built with ``server_options`` (StoreServer's)."""
    server = ServerThread("127.0.0.1", 0, **server_options).start()
    try:
        with TCPStore("127.0.0.1", server.port, timeout=5) as client:
            yield client
    finally:
        server.stop()


def tcp_python_server(tmp_path: Path) -> ContextManager[Store]:
    """A client of a server with its C fast path off (the pure-Python request path)."""
    return _client_of_server(fastpath=False)


def tcp_busy_poll(tmp_path: Path) -> ContextManager[Store]:
    """A client of a server that busy-polls after reads (rdzv serve's default)."""
    return _client_of_server(busy_poll=50e-6)


@contextlib.contextmanager
def prefix_over_tcp(tmp_path: Path) -> Iterator[Store]:
    with tcp_store(tmp_path) as store:
        yield PrefixStore("pre", store)


@contextlib.contextmanager
def async_tcp_store(tmp_path: Path) -> Iterator[Store]:
    """AsyncTCPStore (through a blocking facade) as master and server on one event loop."""
    loop = LoopThread()
    try:
        master = loop.run(AsyncTCPStore("127.0.0.1", 0, is_master=True, timeout=5).connect())
        bridge = AsyncBridge(loop, loop.run(master.clone()))
        try:
            yield bridge
        finally:
            bridge.close()
            loop.run(master.close())
    finally:
        loop.stop()


@contextlib.contextmanager
def file_store(tmp_path: Path) -> Iterator[Store]:
    with FileStore(tmp_path / "store", timeout=5) as store:
        yield store


@contextlib.contextmanager
def prefix_over_file(tmp_path: Path) -> Iterator[Store]:
    with FileStore(tmp_path / "store", timeout=5) as store:
        yield PrefixStore("pre", store)


@contextlib.contextmanager
def torch_adapters(tmp_path: Path) -> Iterator[Store]:
    # Both torch adapters at once: rdzv API -> torch.distributed.Store API -> rdzv HashStore.
    from rdzv.interop.torch import StoreFromTorch, TorchStore

    yield StoreFromTorch(TorchStore(HashStore(timeout=5)))


BACKENDS: dict[str, Factory] = {
    "hash": hash_store,
    "prefix": prefix_over_hash,
    "etcd": etcd_store,
    "file": file_store,
    "prefix_file": prefix_over_file,
    "tcp": tcp_store,
    "tcp_python_server": tcp_python_server,
    "tcp_busy_poll": tcp_busy_poll,
    "prefix_tcp": prefix_over_tcp,
    "async_tcp": async_tcp_store,
    "torch-adapters": torch_adapters,
}
