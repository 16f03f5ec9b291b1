"""The engine owns every waiting semantic (issue 14), seen through each store that carries it:
HashStore, a server thread and ``rdzv serve``, with the C fast path on and off.

* A pushed item goes to a parked ``queue_pop`` even when a ``get`` of the same key parked
  first, and the get keeps waiting (the lost wake-up: both used to time out with the item in
  the queue). Both waits are seen parked before the push, so the scenario is exercised, not
  hoped for.
* Connection-bound keys and leases expire through the engine: the owner closing, the
  deadline passing; a plain write (also one the fast path could take) makes the key ordinary.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import pytest

from rdzv import HashStore, Store
from rdzv.server import ServerThread
from rdzv.store.tcp import TCPStore
from tests.observe.helpers import scrape, serve_with_metrics, value
from tests.server.helpers import eventually
from tests.store.test_contract import Background

pytestmark = pytest.mark.timeout(60)

#: (store, waiters parked on its server or engine) for one test.
Target = tuple[Store, Callable[[], int]]


@contextlib.contextmanager
def hash_target() -> Iterator[Target]:
    store = HashStore(timeout=10)

    def waiters() -> int:
        with store._lock:
            return store._engine.num_waiters()

    yield store, waiters


@contextlib.contextmanager
def thread_target(fastpath: bool) -> Iterator[Target]:
    server = ServerThread("127.0.0.1", 0, fastpath=fastpath).start()
    try:
        with TCPStore("127.0.0.1", server.port, timeout=10) as store:
            yield store, lambda: server.call(lambda s: s.engine.num_waiters())
    finally:
        server.stop()


@contextlib.contextmanager
def serve_target(fastpath: bool) -> Iterator[Target]:
    env = {"RDZV_FASTPATH": "1" if fastpath else "0"}
    with (
        serve_with_metrics(env=env) as (_, port, url),
        TCPStore("127.0.0.1", port, timeout=10) as store,
    ):
        yield store, lambda: int(value(scrape(url), "rdzv_store_waiters"))


Clones = Callable[[Store, int], list[Store]]


@pytest.fixture
def clones() -> Iterator[Clones]:
    """``clones(store, n)``: ``n`` clones of ``store`` (own connections for a TCPStore),
    closed after the test."""
    with contextlib.ExitStack() as stack:

        def make(store: Store, n: int) -> list[Store]:
            made = [store.clone() for _ in range(n)]
            for clone in made:
                close = getattr(clone, "close", None)
                if clone is not store and close is not None:
                    stack.callback(close)
            return made

        yield make


TARGETS: dict[str, Callable[[], contextlib.AbstractContextManager[Target]]] = {
    "hash": hash_target,
    "thread_fastpath": lambda: thread_target(True),
    "thread_python": lambda: thread_target(False),
    "serve_fastpath": lambda: serve_target(True),
    "serve_python": lambda: serve_target(False),
}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_push_goes_to_the_parked_pop_and_the_parked_get_keeps_waiting(
    target: str, clones: Clones
) -> None:
    with TARGETS[target]() as (store, waiters):
        getter, popper = clones(store, 2)
        got = Background(lambda: getter.get("k"))
        eventually(lambda: waiters() == 1, what="the get is parked")
        popped = Background(lambda: popper.queue_pop("k"))
        eventually(lambda: waiters() == 2, what="the queue_pop is parked")
        store.queue_push("k", b"item")
        assert popped.result() == b"item"
        assert store.queue_len("k") == 0
        eventually(lambda: waiters() == 1, what="only the get is parked")
        assert not got.done()
        store.set("k", b"value")
        assert got.result() == b"value"
        eventually(lambda: waiters() == 0, what="no wait is parked")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_multi_get_gets_every_value_once_all_are_set(target: str, clones: Clones) -> None:
    with TARGETS[target]() as (store, waiters):
        (waiting,) = clones(store, 1)
        got = Background(lambda: waiting.multi_get(["m1", "m2"]))
        eventually(lambda: waiters() == 1, what="the multi_get is parked")
        store.set("m1", b"1")
        store.queue_push("m2", b"an item is not a value")
        store.set("m2", b"2")
        assert got.result() == [b"1", b"2"]


def test_hash_store_lease_expires_renews_and_ends_with_a_plain_write() -> None:
    store = HashStore(timeout=1)
    store.set_lease("short", b"1", 60)
    store.set_lease("short", b"2", 0.05)  # renewal replaces the TTL
    store.set_lease("kept", b"1", 0.05)
    store.set("kept", b"plain")  # ordinary now
    store.set_lease("long", b"1", 60)
    deadline = time.monotonic() + 0.05
    eventually(lambda: not store.check(["short"]), what="the lease expired")
    assert time.monotonic() >= deadline
    assert store.get("kept") == b"plain"
    assert store.get("long") == b"1"
    assert sorted(store.list_keys()) == ["kept", "long"]
    with pytest.raises(ValueError, match="ttl"):
        store.set_lease("bad", b"1", 0)


@pytest.mark.parametrize("fastpath", [True, False], ids=["fastpath", "python"])
def test_server_bound_keys_and_leases_go_through_the_engine(fastpath: bool) -> None:
    server = ServerThread("127.0.0.1", 0, fastpath=fastpath).start()
    try:
        with TCPStore("127.0.0.1", server.port, timeout=10) as store:
            owner = store.clone()
            owner.set_ephemeral("alive", b"1")
            owner.set_ephemeral("rewritten", b"1")
            store.set("rewritten", b"plain")  # a SET the fast path could take: unbinds
            store.set_lease("leased", b"1", 0.05)
            store.set_lease("renewed", b"1", 0.05)
            store.set("renewed", b"plain")
            assert sorted(server.call(lambda s: s.engine.bound_keys())) == [b"/alive", b"/leased"]
            owner.close()
            eventually(lambda: not store.check(["alive"]), what="the ephemeral key is gone")
            eventually(lambda: not store.check(["leased"]), what="the lease expired")
            assert store.get("rewritten") == b"plain"
            assert store.get("renewed") == b"plain"
            assert server.call(lambda s: s.engine.bound_keys()) == []
    finally:
        server.stop()
