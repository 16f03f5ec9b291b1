"""TCPStore beyond the contract suite: constructor, worker counting, connecting, failures."""

from __future__ import annotations

import gc
import math
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from rdzv import wire
from rdzv.errors import NetworkError, StoreError, StoreTimeoutError
from rdzv.server import ServerThread
from rdzv.store import tcp_ops
from rdzv.store.tcp import TCPStore
from tests.server.helpers import eventually, raw_get


@pytest.fixture
def master() -> Iterator[TCPStore]:
    with TCPStore("127.0.0.1", 0, is_master=True, timeout=5) as store:
        yield store


# --------------------------------------------------------------------------- constructor
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"world_size": 0}, ValueError, "world size cannot be 0"),
        ({"is_master": 1}, TypeError, "is_master must be a bool"),
        ({"port": -1}, ValueError, "0..65535"),
        ({"port": 65536}, ValueError, "0..65535"),
        ({"port": "29500"}, TypeError, "port must be an int"),
        ({"host_name": None}, TypeError, "host_name must be a str"),
        ({"world_size": 1.5}, TypeError, "world_size"),
        ({"timeout": -1}, ValueError, "timeout"),
    ],
)
def test_constructor_rejects_bad_arguments(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    args: dict[str, object] = {"host_name": "127.0.0.1", "port": 1, "timeout": 1}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        TCPStore(**args)  # type: ignore[arg-type]


def test_properties(master: TCPStore) -> None:
    assert master.host == "127.0.0.1"
    assert master.port > 0
    assert master.libuvBackend is True
    assert master.extensions is True
    assert master.timeout == timedelta(seconds=5)
    assert repr(master) == f"TCPStore(127.0.0.1:{master.port})"
    client = TCPStore("127.0.0.1", master.port, timeout=3, use_libuv=False)
    assert client.libuvBackend is False
    assert client.clone().libuvBackend is False


def test_clone_is_a_new_connection_with_the_same_timeout(master: TCPStore) -> None:
    master.set_timeout(2.5)
    twin = master.clone()
    assert twin.timeout == timedelta(seconds=2.5)
    assert twin.port == master.port
    assert twin._sock is not master._sock
    twin.set("k", b"v")
    assert master.get("k") == b"v"


# --------------------------------------------------------------------------- workers
def test_world_size_counting_and_wait_for_workers() -> None:
    box: dict[str, TCPStore] = {}
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()

    def run_master() -> None:
        box["master"] = TCPStore("127.0.0.1", port, world_size=3, is_master=True, timeout=10)

    thread = threading.Thread(target=run_master)
    thread.start()
    workers = [TCPStore("127.0.0.1", port, world_size=3, timeout=10) for _ in range(2)]
    thread.join(15)
    master = box["master"]
    assert raw_get(port, b"init/") == b"3"
    # init/ is internal: hidden by list_keys, counted by num_keys (as torch counts).
    assert master.num_keys() == 1
    assert master.list_keys() == []
    workers[0].set("a", b"1")
    assert workers[0].get("a") == b"1"  # round trip: the set has run
    assert workers[1].num_keys() == 2
    master.close()


def test_master_times_out_waiting_for_workers() -> None:
    start = time.monotonic()
    with pytest.raises(StoreTimeoutError, match=r"1/2 clients joined"):
        TCPStore("127.0.0.1", 0, world_size=2, is_master=True, timeout=0.5)
    assert 0.5 <= time.monotonic() - start < 5


def test_wait_for_workers_false_does_not_count(master: TCPStore) -> None:
    TCPStore("127.0.0.1", master.port, world_size=2, wait_for_workers=False, timeout=2)
    TCPStore("127.0.0.1", master.port, world_size=-1, timeout=2)
    assert raw_get(master.port, b"init/") is None


# --------------------------------------------------------------------------- servers
def test_multi_tenant_masters_share_one_server() -> None:
    first = TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, timeout=3)
    port = first.port
    second = TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, timeout=3)
    third = TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, timeout=3)
    second.set("shared", b"1")
    assert third.get("shared") == b"1"
    assert second._server is third._server


def test_second_master_on_a_used_port_fails_clearly(master: TCPStore) -> None:
    with pytest.raises(NetworkError, match=rf"{master.port}.*EADDRINUSE"):
        TCPStore("127.0.0.1", master.port, is_master=True, timeout=1)


def test_agent_store_fallback(master: TCPStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch: a master that cannot bind becomes a client of the agent's store.
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_PORT", str(master.port))
    store = TCPStore("127.0.0.1", master.port, is_master=True, timeout=3)
    store.set("via-agent", b"1")
    assert master.get("via-agent") == b"1"
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(NetworkError, match="EADDRINUSE"):
        TCPStore("127.0.0.1", master.port, is_master=True, timeout=1)


def test_master_listen_fd() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    with TCPStore("127.0.0.1", port, is_master=True, master_listen_fd=sock.fileno()) as store:
        assert store.port == port
        store.set("k", b"v")
        assert TCPStore("127.0.0.1", port, timeout=2).get("k") == b"v"
    sock.close()
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    with pytest.raises(ValueError, match="bound to port"):
        TCPStore("127.0.0.1", port, is_master=True, master_listen_fd=other.fileno())
    other.close()


def test_server_stops_when_the_last_master_is_gone() -> None:
    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=3)
    port = store.port
    store.close()
    del store
    gc.collect()

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return True
        return False

    eventually(refused, what="server stopped")


# --------------------------------------------------------------------------- connecting
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_client_started_before_the_server_connects() -> None:
    port = _free_port()
    servers: list[ServerThread] = []
    timer = threading.Timer(0.3, lambda: servers.append(ServerThread("127.0.0.1", port).start()))
    timer.start()
    try:
        store = TCPStore("127.0.0.1", port, timeout=10)
        store.set("k", b"v")
        assert store.get("k") == b"v"
    finally:
        timer.join()
        for s in servers:
            s.stop()


def test_connect_gives_up_at_the_deadline() -> None:
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(NetworkError, match=rf"127\.0\.0\.1:{port} within 0\.5 s") as info:
        TCPStore("127.0.0.1", port, timeout=0.5)
    assert 0.5 <= time.monotonic() - start < 3
    assert isinstance(info.value, ConnectionError)


class SilentServer:
    """Accepts connections; answers the handshake (``handshake=True``) and nothing else."""

    def __init__(self, handshake: bool) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.handshake = handshake
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.handshake:
                data = b""
                while len(data) < 10:
                    data += conn.recv(10 - len(data))
                conn.sendall(wire.reply_ping(wire.RDZV_PING_NONCE, False))

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_silent_server_during_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp_ops, "MIN_IO_TIMEOUT", 0.2)
    silent = SilentServer(handshake=False)
    try:
        with pytest.raises(NetworkError, match=rf"{silent.port}.*PING"):
            TCPStore("127.0.0.1", silent.port, timeout=0.5)
    finally:
        silent.close()


def test_silent_server_after_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp_ops, "MIN_IO_TIMEOUT", 0.2)
    silent = SilentServer(handshake=True)
    try:
        store = TCPStore("127.0.0.1", silent.port, timeout=0.3)
        assert store.extensions is False  # it echoed the nonce, like a torch server
        start = time.monotonic()
        with pytest.raises(NetworkError, match=r"no reply within .* GETNUMKEYS"):
            store.num_keys()
        assert time.monotonic() - start < 3
        with pytest.raises(NetworkError, match=r"no longer usable|cannot be used"):
            store.set("k", b"v")
    finally:
        silent.close()


def test_server_death_fails_pending_and_later_calls() -> None:
    thread = ServerThread("127.0.0.1", 0).start()
    store = TCPStore("127.0.0.1", thread.port, timeout=30, reconnect=False)
    store.set("k", b"v")
    waiter = store.clone()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            waiter.wait(["never"])
        except BaseException as exc:
            errors.append(exc)

    bg = threading.Thread(target=wait)
    bg.start()
    eventually(lambda: thread.call(lambda s: s.engine.num_waiters()) == 1, what="parked")
    start = time.monotonic()
    thread.stop()
    bg.join(10)
    assert time.monotonic() - start < 5
    assert len(errors) == 1
    assert isinstance(errors[0], NetworkError)
    assert "closed the connection" in str(errors[0])
    with pytest.raises(NetworkError):
        store.get("k")


# --------------------------------------------------------------------------- semantics
def test_timeout_zero_is_exact(master: TCPStore) -> None:
    # torch's zero-timeout wait on a present key fails 2 times out of 3 (racy poll).
    master.set("here", b"1")
    for _ in range(50):
        master.wait(["here"], 0)
        assert master.multi_get(["here"]) == [b"1"]
    master.set_timeout(0)
    for _ in range(50):
        assert master.get("here") == b"1"


def test_add_on_non_integer_keeps_connection(master: TCPStore) -> None:
    from rdzv.errors import CounterError

    master.set("t", b"abc")
    for _ in range(3):
        with pytest.raises(CounterError, match="not a base-10 integer"):
            master.add("t", 1)
    assert master.add("n", 2) == 2


def test_one_store_shared_by_threads(master: TCPStore) -> None:
    def hammer() -> None:
        for _ in range(200):
            master.add("shared", 1)
            master.get("shared")

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert master.add("shared", 0) == 800


def test_ephemeral_keys_vanish_with_their_connection(master: TCPStore) -> None:
    owner = master.clone()
    owner.set_ephemeral("alive/1", b"pid 1")
    assert master.get("alive/1") == b"pid 1"
    owner.close()
    eventually(lambda: not master.check(["alive/1"]), what="ephemeral key deleted")


def test_lease_expires(master: TCPStore) -> None:
    master.set_lease("lease", b"1", 0.05)
    eventually(lambda: not master.check(["lease"]), what="lease expired")
    master.set_lease("kept", b"1", timedelta(seconds=60))
    assert master.get("kept") == b"1"


@pytest.mark.parametrize("ttl", [1e300, math.inf, 366 * 86400, 0, -1.0])
def test_lease_ttl_out_of_range_is_a_value_error(master: TCPStore, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl must be"):
        master.set_lease("lease", b"1", ttl)
    master.set("after", b"ok")  # the connection is still usable
    assert master.get("after") == b"ok"


def test_list_key_sizes(master: TCPStore) -> None:
    master.multi_set(["a/x", "a/y", "b"], [b"1", b"22", b""])
    assert sorted(master.list_key_sizes()) == [("a/x", 1), ("a/y", 2), ("b", 0)]
    assert sorted(master.list_key_sizes("a/")) == [("a/x", 1), ("a/y", 2)]


def test_extension_only_calls_refuse_plain_servers() -> None:
    thread = ServerThread("127.0.0.1", 0, allow_extensions=False).start()
    try:
        store = TCPStore("127.0.0.1", thread.port, timeout=3)
        assert store.extensions is False
        with pytest.raises(StoreError, match="needs rdzv's protocol extensions"):
            store.set_ephemeral("k", b"v")
        store.set("x", b"1")
        assert store.list_key_sizes() == [("x", 1)]
        assert store.num_keys() == 1
    finally:
        thread.stop()


def test_connect_backoff_leaves_the_global_random_state_alone() -> None:
    # Training code seeds `random` for reproducibility; the store's jitter must not draw
    # from it (reconnects happen in the background at unpredictable times).
    import random

    random.seed(1234)
    state = random.getstate()
    delays = tcp_ops.backoff_delays()
    values = [next(delays) for _ in range(20)]
    assert random.getstate() == state
    assert len(set(values)) > 1  # still jittered
    assert all(0 < v <= tcp_ops.BACKOFF_CAP * 1.5 for v in values)
