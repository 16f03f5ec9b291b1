"""Interop with torch 2.13: torch's client against ``rdzv serve``, rdzv's client against
torch's server, and a real gloo process group rendezvousing on ``rdzv serve``.

torch's TCPStore constructor holds the GIL while it connects, so a torch client and an rdzv
server must not share a process: our server runs as a subprocess here.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import torch.distributed as dist

from rdzv import PrefixStore
from rdzv.errors import NetworkError, QueueEmptyError, StoreTimeoutError
from rdzv.store.tcp import TCPStore
from tests.conftest import subprocess_env
from tests.server.helpers import raw_get, rdzv_serve
from tests.store.test_contract import Background

pytestmark = pytest.mark.timeout(120)

T = timedelta


@pytest.fixture(scope="module")
def rdzv_port() -> Iterator[int]:
    with rdzv_serve() as (_, port):
        yield port


@pytest.fixture
def torch_client(rdzv_port: int, request: pytest.FixtureRequest) -> dist.TCPStore:
    """A torch client on the shared rdzv server, in a namespace of its own."""
    store = dist.TCPStore("127.0.0.1", rdzv_port, timeout=T(seconds=10))
    return dist.PrefixStore(request.node.name, store)


# --------------------------------------------------------------------------- torch -> rdzv
def exercise(s: Any, peer: Any) -> None:
    """Every non-blocking operation through ``s``; ``peer``, another client of the same
    server (the other implementation), reads what ``s`` wrote and writes what ``s`` reads."""
    s.set("k", b"v")
    s.set("s", "text")
    assert peer.get("k") == b"v"
    assert s.get("s") == b"text"
    peer.set("t", b"from peer")
    assert s.get("t") == b"from peer"
    assert s.add("c", 5) == 5
    assert s.add("c", -7) == -2
    assert peer.get("c") == b"-2"
    s.append("ap", b"ab")
    s.append("ap", b"cd")
    # Writes without a reply are ordered per connection only: a round trip on s's own
    # connection makes sure both appends ran before peer looks.
    assert s.get("ap") == b"abcd"
    assert peer.get("ap") == b"abcd"
    s.multi_set(["m1", "m2"], [b"x", b"yz"])
    assert s.multi_get(["m1", "m2"]) == [b"x", b"yz"]
    assert s.check(["k", "c"]) is True
    assert s.check(["k", "nope"]) is False
    assert s.delete_key("k") is True
    assert s.delete_key("k") is False
    s.wait(["c", "ap"])
    s.wait(["c"], T(seconds=1))
    s.set("", b"")
    s.set("unié", b"\x00\xff")
    assert peer.get("unié") == b"\x00\xff"
    # compare_set truth table
    assert s.compare_set("cs", "", "new") == b"new"
    assert s.compare_set("cs2", "x", "y") == b"x"
    assert s.check(["cs2"]) is False
    assert s.compare_set("cs", "new", "newer") == b"newer"
    assert s.compare_set("cs", "zzz", "q") == b"newer"
    assert peer.get("cs") == b"newer"
    assert sorted(s.list_keys()) == sorted(peer.list_keys())
    assert s.has_extended_api()


def test_torch_client_on_rdzv_server(rdzv_port: int, request: pytest.FixtureRequest) -> None:
    theirs = dist.TCPStore("127.0.0.1", rdzv_port, timeout=T(seconds=10))
    ours = TCPStore("127.0.0.1", rdzv_port, timeout=10)
    prefix = request.node.name
    exercise(dist.PrefixStore(prefix, theirs), PrefixStore(prefix, ours))


def test_torch_client_timeouts_and_cancel(torch_client: dist.Store) -> None:
    s = torch_client
    start = time.monotonic()
    with pytest.raises(dist.DistStoreError, match="wait timeout after 300ms"):
        s.wait(["never"], T(milliseconds=300))
    assert time.monotonic() - start < 3
    s.set_timeout(T(milliseconds=300))
    with pytest.raises(dist.DistStoreError, match="wait timeout"):
        s.get("missing")
    # The connection survives the CANCEL_WAIT dance.
    s.set("after", b"1")
    assert s.get("after") == b"1"


def test_torch_client_cancel_race_is_drained(rdzv_port: int) -> None:
    # A waiter released just as its timeout fires reads 00 then 01; many rounds make the
    # race happen; the connection must stay in sync throughout.
    s = dist.TCPStore("127.0.0.1", rdzv_port, timeout=T(seconds=10))
    writer = dist.TCPStore("127.0.0.1", rdzv_port, timeout=T(seconds=10))
    for i in range(30):
        t = threading.Timer(0.01, writer.set, args=(f"race{i}", b"1"))
        t.start()
        with contextlib.suppress(dist.DistStoreError):
            s.wait([f"race{i}"], T(milliseconds=10))
        t.join()
        assert s.get(f"race{i}") == b"1"


def test_torch_client_queues(rdzv_port: int, torch_client: dist.Store) -> None:
    s = torch_client
    s.queue_push("q", b"a")
    s.queue_push("q", "bc")
    assert s.queue_len("q") == 2
    assert s.queue_pop("q") == b"a"
    assert s.queue_pop("q", block=False) == b"bc"
    with pytest.raises(dist.QueueEmptyError):
        s.queue_pop("q", block=False)
    assert s.queue_len("never") == 0


def _pop_or_error(store: dist.TCPStore) -> object:
    try:
        return store.queue_pop("one")
    except dist.DistStoreError as exc:
        return exc


def test_torch_client_queue_wakes_exactly_one(rdzv_port: int) -> None:
    poppers = [dist.TCPStore("127.0.0.1", rdzv_port, timeout=T(seconds=1)) for _ in range(2)]
    pusher = dist.TCPStore("127.0.0.1", rdzv_port, timeout=T(seconds=10))
    tasks = [Background(lambda p=p: _pop_or_error(p)) for p in poppers]  # type: ignore[misc]
    time.sleep(0.2)  # let both block (if not, one pops at once and the other times out too)
    pusher.queue_push("one", b"item")
    results = [t.result() for t in tasks]
    assert results.count(b"item") == 1
    assert sum(isinstance(r, dist.DistStoreError) for r in results) == 1


def test_torch_client_barrier(rdzv_port: int) -> None:
    stores = [dist.TCPStore("127.0.0.1", rdzv_port, timeout=T(seconds=10)) for _ in range(3)]
    threads = [threading.Thread(target=s.barrier, args=("tb", 3)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert stores[0].get("tb") == b"3"
    with pytest.raises(dist.DistStoreError, match="barrier timeout"):
        stores[0].barrier("lonely", 2, T(milliseconds=200))


def test_torch_client_world_size_counting(rdzv_port: int) -> None:
    before = int(raw_get(rdzv_port, b"init/") or 0)
    a = dist.TCPStore("127.0.0.1", rdzv_port, world_size=2, timeout=T(seconds=5))
    dist.TCPStore("127.0.0.1", rdzv_port, world_size=2, wait_for_workers=False)
    assert raw_get(rdzv_port, b"init/") == str(before + 1).encode()
    assert "init/" not in a.list_keys()


def test_torch_client_clone_and_list_keys(rdzv_port: int) -> None:
    s = dist.TCPStore("127.0.0.1", rdzv_port, timeout=T(seconds=5))
    twin = s.clone()
    twin.set("from-clone", b"1")
    assert s.get("from-clone") == b"1"
    assert "from-clone" in s.list_keys()
    assert s.num_keys() >= 1


def test_torch_client_add_on_non_integer_drops_only_that_connection(rdzv_port: int) -> None:
    s = dist.TCPStore("127.0.0.1", rdzv_port, timeout=T(seconds=5))
    s.set("notint", b"abc")
    with pytest.raises(dist.DistNetworkError):
        s.add("notint", 1)
    other = dist.TCPStore("127.0.0.1", rdzv_port, timeout=T(seconds=5))
    assert other.get("notint") == b"abc"


def test_torch_and_rdzv_clients_share_data(rdzv_port: int) -> None:
    theirs = dist.TCPStore("127.0.0.1", rdzv_port, timeout=T(seconds=5))
    ours = TCPStore("127.0.0.1", rdzv_port, timeout=5)
    assert ours.extensions
    theirs.set("shared/t", b"from torch")
    ours.set("shared/r", b"from rdzv")
    assert ours.get("shared/t") == b"from torch"
    assert theirs.get("shared/r") == b"from rdzv"
    assert ours.add("shared/n", 2) == 2
    assert theirs.add("shared/n", 3) == 5
    ours.queue_push("shared/q", b"x")
    assert theirs.queue_pop("shared/q") == b"x"


# --------------------------------------------------------------------------- rdzv -> torch
@pytest.fixture(params=[True, False], ids=["libuv", "legacy"])
def torch_server(request: pytest.FixtureRequest) -> Iterator[tuple[dist.TCPStore, TCPStore]]:
    master = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, timeout=T(seconds=10), use_libuv=request.param
    )
    ours = TCPStore("127.0.0.1", master.port, timeout=5)
    try:
        yield master, ours
    finally:
        ours.close()


def test_rdzv_client_on_torch_server(torch_server: tuple[dist.TCPStore, TCPStore]) -> None:
    master, s = torch_server
    assert s.extensions is False
    exercise(s, master)
    assert s.num_keys() == master.num_keys()
    assert sorted(s.list_key_sizes("m")) == [("m1", 1), ("m2", 2)]


def test_rdzv_client_timeouts_on_torch_server(
    torch_server: tuple[dist.TCPStore, TCPStore],
) -> None:
    master, s = torch_server
    start = time.monotonic()
    with pytest.raises(StoreTimeoutError, match="never"):
        s.wait(["never"], 0.3)
    assert time.monotonic() - start < 3
    s.set_timeout(0.3)
    with pytest.raises(StoreTimeoutError, match="missing"):
        s.get("missing")
    master.set("here", b"1")
    for _ in range(20):  # exact, unlike torch's own zero-timeout wait
        s.wait(["here"], 0)
    with pytest.raises(StoreTimeoutError):
        s.wait(["here", "absent"], 0)
    assert s.get("here") == b"1"  # the connection stayed in sync


def test_rdzv_client_blocking_get_woken_by_torch(
    torch_server: tuple[dist.TCPStore, TCPStore],
) -> None:
    master, s = torch_server
    threading.Timer(0.1, master.set, args=("later", b"now")).start()
    assert s.get("later") == b"now"


def test_rdzv_client_barrier_on_torch_server(torch_server: tuple[dist.TCPStore, TCPStore]) -> None:
    master, s = torch_server
    twin = s.clone()
    t = threading.Thread(target=twin.barrier, args=("b", 2, 10))
    t.start()
    s.barrier("b", 2, 10)
    t.join(10)
    assert master.get("b") == b"2"
    with pytest.raises(StoreTimeoutError, match="barrier"):
        s.barrier("lonely", 2, 0.2)


def test_rdzv_client_queues_on_torch_libuv_server() -> None:
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=T(seconds=10))
    s = TCPStore("127.0.0.1", master.port, timeout=5)
    s.queue_push("q", b"a")
    assert s.queue_len("q") == 1  # a round trip: the push (no reply) has been applied
    master.queue_push("q", b"b")
    assert master.queue_len("q") == 2  # same for the torch client's push
    assert s.queue_len("q") == 2
    assert s.queue_pop("q") == b"a"
    assert master.queue_pop("q") == b"b"
    with pytest.raises(QueueEmptyError):
        s.queue_pop("q", block=False)
    threading.Timer(0.1, master.queue_push, args=("q", b"late")).start()
    assert s.queue_pop("q") == b"late"


def test_rdzv_client_world_size_with_torch_master() -> None:
    box: dict[str, dist.TCPStore] = {}
    probe = TCPStore("127.0.0.1", 0, is_master=True, timeout=3)
    port = probe.port
    probe.close()
    del probe

    def run_master() -> None:
        box["m"] = dist.TCPStore(
            "127.0.0.1", port, world_size=2, is_master=True, timeout=T(seconds=10)
        )

    thread = threading.Thread(target=run_master)
    thread.start()
    ours = TCPStore("127.0.0.1", port, world_size=2, timeout=10)
    thread.join(15)
    assert "m" in box
    assert raw_get(port, b"init/") == b"2"
    assert ours.num_keys() == 1  # init/ counted, as torch's num_keys counts it
    assert box["m"].num_keys() == 1


def test_rdzv_client_add_on_non_integer_on_torch_server(
    torch_server: tuple[dist.TCPStore, TCPStore],
) -> None:
    master, s = torch_server
    master.set("notint", b"abc")
    with pytest.raises(NetworkError, match=r"closed the connection.*may or may not"):
        s.add("notint", 1)
    assert s.get("notint") == b"abc"  # reconnected (reconnect=True, the default)


# --------------------------------------------------------------------------- process group
WORKER = """
import os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="env://")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
dist.barrier()
print("RESULT", dist.get_rank(), t.item(), flush=True)
dist.destroy_process_group()
"""


def test_gloo_process_group_rendezvous_on_rdzv_serve() -> None:
    with rdzv_serve() as (server, port):
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=subprocess_env(
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port),
                    RANK=str(rank),
                    WORLD_SIZE="2",
                    TORCHELASTIC_USE_AGENT_STORE="True",
                ),
            )
            for rank in range(2)
        ]
        outputs = [p.communicate(timeout=90) for p in procs]
        for p, (_, err) in zip(procs, outputs, strict=True):
            assert p.returncode == 0, err
        results = sorted(line for out, _ in outputs for line in out.splitlines())
        assert results == ["RESULT 0 3.0", "RESULT 1 3.0"]
        assert server.poll() is None  # the server outlives its clients
        keys = TCPStore("127.0.0.1", port, timeout=5).list_keys()
        assert any(k.startswith("default_pg/") for k in keys)
