"""The c10d backend creator (torch's configuration keys) and register_builtin_backends."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from rdzv import events
from rdzv.errors import ConnectionLimitError, RendezvousConnectionError
from rdzv.events import NodeState, RdzvEvent
from rdzv.rendezvous.api import RendezvousHandlerRegistry, RendezvousParameters
from rdzv.rendezvous.c10d import (
    C10D_DEFAULT_PORT,
    create_c10d_handler,
    create_c10d_store,
    register_builtin_backends,
)
from rdzv.server import ServerThread
from rdzv.store.file import FileStore
from rdzv.store.tcp import TCPStore
from tests.ports import reserved_port
from tests.rendezvous.conftest import join_all


def params(
    endpoint: str, min_nodes: int = 1, max_nodes: int = 1, **config: object
) -> RendezvousParameters:
    return RendezvousParameters(
        "c10d", endpoint, "c10d-run", min_nodes, max_nodes, local_addr="127.0.0.1", **config
    )


def test_first_agent_hosts_the_store_the_others_connect() -> None:
    with reserved_port() as port:
        endpoint = f"127.0.0.1:{port}"
        first = create_c10d_handler(params(endpoint, 2, 2, read_timeout="10"))
        # same host, port served already: falls back to a client
        second = create_c10d_handler(params(endpoint, 2, 2, read_timeout="10"))
        assert first.get_backend() == second.get_backend() == "c10d"
        assert isinstance(first._store, TCPStore) and isinstance(second._store, TCPStore)
        assert first._store.timeout.total_seconds() == 10
        infos = join_all([first, second])
        assert sorted(i.rank for i in infos) == [0, 1]
        # the workers are pointed at the rendezvous server itself (use_agent_store)
        for info in infos:
            boot = info.bootstrap_store_info
            assert boot is not None and (boot.master_addr, boot.master_port) == ("127.0.0.1", port)
        assert first.use_agent_store
        for h in (first, second):
            assert h.shutdown()


def test_explicit_is_host_false_needs_a_server() -> None:
    with (
        reserved_port() as port,
        pytest.raises(RendezvousConnectionError, match="The connection to the C10d store"),
    ):
        create_c10d_store(params(f"127.0.0.1:{port}", is_host="false", read_timeout="1"))


def test_a_node_joining_a_full_server_is_told_the_limit_at_once() -> None:
    thread = ServerThread(max_connections=1).start()
    held = TCPStore("127.0.0.1", thread.port, timeout=5)
    try:
        start = time.monotonic()
        with pytest.raises(RendezvousConnectionError) as info:
            create_c10d_store(params(f"127.0.0.1:{thread.port}", is_host="0", read_timeout="30"))
        assert time.monotonic() - start < 10  # not retried until the read timeout
        cause = info.value.__cause__
        assert isinstance(cause, ConnectionLimitError)
        assert "max_connections=1" in str(cause) and "--max-connections" in str(cause)
        held.set("k", b"v")  # the node already connected is served as before
        assert held.get("k") == b"v"
    finally:
        held.close()
        thread.stop()


def test_explicit_is_host_true_fails_when_the_port_is_served() -> None:
    with reserved_port() as port:
        server = TCPStore("127.0.0.1", port, is_master=True)
        try:
            with pytest.raises(RendezvousConnectionError):
                create_c10d_store(params(f"127.0.0.1:{port}", is_host="1", read_timeout="2"))
            store, endpoint = create_c10d_store(params(f"127.0.0.1:{port}", is_host="0"))
            assert endpoint == ("127.0.0.1", port)
            store.set("k", b"v")
            assert server.get("k") == b"v"
        finally:
            server.close()


def test_default_port_and_read_timeout() -> None:
    p = params("127.0.0.1", is_host="false", read_timeout="1")
    with pytest.raises(RendezvousConnectionError):
        create_c10d_store(p)  # 127.0.0.1:29400, nobody there
    assert C10D_DEFAULT_PORT == 29400


@pytest.mark.parametrize("value", ["0", "-10"])
def test_read_timeout_must_be_positive(value: str) -> None:
    with pytest.raises(ValueError, match=r"^The read timeout must be a positive integer\.$"):
        create_c10d_handler(params("127.0.0.1:1", read_timeout=value))


def test_store_type_is_checked() -> None:
    with pytest.raises(
        ValueError, match=r"^Invalid store type given\. Currently only supports file and tcp\.$"
    ):
        create_c10d_handler(params("", store_type="etcd"))


def test_file_store(tmp_path: Path) -> None:
    path = tmp_path / "rdzv.file"
    handler = create_c10d_handler(params(str(path), store_type=" FiLe ", last_call_timeout="1"))
    assert isinstance(handler._store, FileStore)
    assert handler._master_endpoint is None
    # No server to point the workers at: rank 0 starts one (torch's behaviour) and keeps it
    # for the next rounds.
    info = handler.next_rendezvous()
    boot = info.bootstrap_store_info
    assert boot is not None and boot.master_addr == "127.0.0.1"
    probe = TCPStore(boot.master_addr, boot.master_port, timeout=5)
    probe.set("reachable", b"yes")
    probe.close()
    again = handler.next_rendezvous().bootstrap_store_info
    assert again is not None and again.master_port == boot.master_port
    assert handler.shutdown()
    store, endpoint = create_c10d_store(params("", store_type="file"))
    try:
        assert isinstance(store, FileStore) and endpoint is None
        assert Path(store.path).exists()  # a temporary file was created
    finally:
        store.close()
        os.unlink(store.path)


def test_creation_failures_are_recorded() -> None:
    seen: list[RdzvEvent] = []
    remove = events.add_callback(lambda e: seen.append(e) if isinstance(e, RdzvEvent) else None)
    try:
        with pytest.raises(ValueError):
            create_c10d_handler(params("", store_type="nope"))
    finally:
        remove()
    assert [e.node_state for e in seen] == [NodeState.FAILED]
    assert "Invalid store type" in seen[0].message


def test_register_builtin_backends() -> None:
    registry = RendezvousHandlerRegistry()
    register_builtin_backends(registry)
    register_builtin_backends(registry)  # idempotent
    assert registry.backends() == ["c10d", "etcd"]
    with reserved_port() as port:
        handler = registry.create_handler(params(f"127.0.0.1:{port}"))
        info = handler.next_rendezvous()
        assert (info.rank, info.world_size) == (0, 1)
        assert handler.shutdown()


def test_sharing_disabled_publishes_a_port_for_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    with reserved_port() as port:
        handler = create_c10d_handler(params(f"127.0.0.1:{port}"))
        assert not handler.use_agent_store
        info = handler.next_rendezvous()
        boot = info.bootstrap_store_info
        # not the rendezvous server: a port for the workers' own store
        assert boot is not None and boot.master_port not in (0, port)
        assert info.store.get("MASTER_PORT") == str(boot.master_port).encode()
        assert handler.shutdown()
