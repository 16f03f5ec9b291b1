"""One lease capability (Store.set_lease) on every backend: keys that expire on HashStore,
TCPStore (rdzv server, both clients), EtcdStore and a PrefixStore over them,
NotImplementedError elsewhere; the same ttl validation everywhere."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from rdzv import Store, StoreError
from rdzv.server import ServerThread
from rdzv.store.base import MAX_LEASE_TTL
from rdzv.store.etcd import EtcdStore
from rdzv.store.tcp import TCPStore
from tests.server.helpers import eventually
from tests.store.backends import BACKENDS

#: Backends with leases, and the shortest TTL worth asking each for (seconds): etcd raises
#: TTLs below its minimum (about 2 s with its defaults); the engine keeps milliseconds.
LEASING = {
    "hash": 0.2,
    "prefix": 0.2,
    "tcp": 0.2,
    "tcp_python_server": 0.2,
    "tcp_busy_poll": 0.2,
    "prefix_tcp": 0.2,
    "async_tcp": 0.2,
    "etcd": 1.0,
}
WITHOUT = sorted(set(BACKENDS) - set(LEASING))


@pytest.fixture(params=sorted(LEASING))
def leasing(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, float]]:
    with BACKENDS[request.param](tmp_path) as store:
        yield store, LEASING[request.param]


def expire(store: Store, key: str, ttl: float) -> float:
    """Set ``key`` with a lease of ``ttl``; return how long it lived (bounded wait)."""
    start = time.monotonic()
    store.set_lease(key, b"short", ttl)
    eventually(lambda: not store.check([key]), timeout=ttl + 15, what=f"{key} expired")
    return time.monotonic() - start


def test_a_leased_key_expires_after_its_ttl_never_before(leasing: tuple[Store, float]) -> None:
    store, ttl = leasing
    store.set_lease("kept", b"long", timedelta(seconds=300))
    assert store.get("kept") == b"long"
    assert expire(store, "short", ttl) >= ttl
    assert store.get("kept") == b"long"


def test_set_lease_again_renews_and_a_plain_write_makes_the_key_permanent(
    leasing: tuple[Store, float],
) -> None:
    store, ttl = leasing
    store.set_lease("renewed", b"1", ttl)
    store.set_lease("renewed", b"2", 300)
    store.set_lease("plain", b"1", ttl)
    store.set("plain", b"2")
    store.set_lease("counter", b"1", ttl)
    assert store.add("counter", 1) == 2
    expire(store, "witness", ttl)  # set after the others: they are past their first ttl
    assert store.multi_get(["renewed", "plain", "counter"]) == [b"2", b"2", b"2"]


def test_set_lease_wakes_waiters_like_set(leasing: tuple[Store, float]) -> None:
    store, _ = leasing
    waiter = store.clone()
    got: list[bytes] = []
    thread = threading.Thread(target=lambda: got.append(waiter.get("late", timeout=10)))
    thread.start()
    store.set_lease("late", b"v", 300)
    thread.join(15)
    assert got == [b"v"]
    close = getattr(waiter, "close", None)
    if close is not None:
        close()


@pytest.mark.parametrize(
    "ttl, error",
    [
        (0, ValueError),
        (-1.0, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (MAX_LEASE_TTL * 2, ValueError),
        ("5", TypeError),
        (True, TypeError),
    ],
)
def test_a_bad_ttl_is_refused_before_anything_is_written(
    leasing: tuple[Store, float], ttl: object, error: type[Exception]
) -> None:
    store, _ = leasing
    with pytest.raises(error, match="ttl"):
        store.set_lease("k", b"v", ttl)  # type: ignore[arg-type]
    assert not store.check(["k"])
    store.set_lease("k", b"v", MAX_LEASE_TTL)  # the limit itself is accepted
    assert store.get("k") == b"v"


@pytest.mark.parametrize("backend", WITHOUT)
def test_backends_without_leases_say_so(backend: str, tmp_path: Path) -> None:
    with BACKENDS[backend](tmp_path) as store:
        with pytest.raises(NotImplementedError, match="has no leases"):
            store.set_lease("k", b"v", 5)
        with pytest.raises(ValueError, match="ttl"):  # validated first, as everywhere
            store.set_lease("k", b"v", 0)
        assert not store.check(["k"])


def test_a_torch_server_refuses_leases_clearly() -> None:
    thread = ServerThread("127.0.0.1", 0, allow_extensions=False).start()
    try:
        with TCPStore("127.0.0.1", thread.port, timeout=3) as store:
            with pytest.raises(StoreError, match="set_lease needs rdzv's protocol extensions"):
                store.set_lease("k", b"v", 5)
            store.set("after", b"ok")  # the connection is still usable
            assert store.get("after") == b"ok"
    finally:
        thread.stop()


def test_etcd_set_ttl_is_an_alias_of_set_lease(tmp_path: Path) -> None:
    ttl = LEASING["etcd"]
    with BACKENDS["etcd"](tmp_path) as store:
        assert isinstance(store, EtcdStore)
        start = time.monotonic()
        store.set("alias", b"v", ttl=timedelta(seconds=ttl))
        eventually(lambda: not store.check(["alias"]), timeout=ttl + 15, what="alias expired")
        assert time.monotonic() - start >= ttl
