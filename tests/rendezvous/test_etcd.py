"""The ``etcd`` rendezvous backend: handler creation from launcher parameters, lease
liveness (a dead node's keys are deleted by etcd, no clocks compared), configuration errors.
The store-generic dynamic suite also runs on etcd (``etcd`` in tests/rendezvous/conftest.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from rdzv.errors import RendezvousConnectionError
from rdzv.rendezvous.api import RendezvousHandlerRegistry, RendezvousParameters
from rdzv.rendezvous.c10d import register_builtin_backends
from rdzv.rendezvous.dynamic import DynamicRendezvousHandler
from rdzv.rendezvous.etcd import EtcdLeaseLiveness, create_etcd_handler
from rdzv.rendezvous.liveness import Status
from rdzv.store.etcd import EtcdStore
from tests.etcd_fixtures import EtcdMember, free_ports, fresh_prefix
from tests.rendezvous.conftest import Join, _created, join_all


def params(member: EtcdMember, n: int, run_id: str, **config: Any) -> RendezvousParameters:
    config.setdefault("prefix", fresh_prefix())
    config.setdefault("last_call_timeout", 0.3)
    config.setdefault("keep_alive_interval", 0.5)
    config.setdefault("keep_alive_max_attempt", 2)
    return RendezvousParameters("etcd", member.endpoint, run_id, n, n, **config)


@pytest.fixture
def make(etcd_member: EtcdMember) -> Iterator[Any]:
    opened: list[DynamicRendezvousHandler] = []

    def create(p: RendezvousParameters) -> DynamicRendezvousHandler:
        h = create_etcd_handler(p)
        _created.append(h)  # keep-alives stopped after the test
        opened.append(h)
        return h

    yield create


def test_handler_from_parameters_completes_a_round(etcd_member: EtcdMember, make: Any) -> None:
    p = params(etcd_member, 3, "run-a")
    hs = [make(p) for _ in range(3)]
    assert hs[0].get_backend() == "etcd"
    assert hs[0].get_run_id() == "run-a"
    assert isinstance(hs[0].liveness, EtcdLeaseLiveness)
    infos = join_all(hs)
    assert sorted(i.rank for i in infos) == [0, 1, 2]
    assert {i.world_size for i in infos} == {3}
    # The run's keys live under <prefix><run_id>/ in etcd.
    store = EtcdStore(etcd_member.endpoint, p.get("prefix") + "run-a/", timeout=5)
    assert any(k.endswith("hb/1") for k in store.list_keys())
    store.close()


def test_registry_creates_the_etcd_backend(etcd_member: EtcdMember) -> None:
    registry = RendezvousHandlerRegistry()
    register_builtin_backends(registry)
    handler = registry.create_handler(params(etcd_member, 1, "run-r"))
    _created.append(handler)  # type: ignore[arg-type]
    assert handler.get_backend() == "etcd"
    info = handler.next_rendezvous()
    assert (info.rank, info.world_size) == (0, 1)


def test_a_dead_nodes_key_is_deleted_by_etcd(etcd_member: EtcdMember) -> None:
    store = EtcdStore(etcd_member.endpoint, fresh_prefix(), timeout=5)
    liveness = EtcdLeaseLiveness(store, 1.0, 4)  # lease TTL 4 s: margin for a loaded machine
    observer = EtcdLeaseLiveness(store.clone(), 1.0, 4).observer("peer")
    liveness.announce("hb/1")
    assert observer.observe(store, ["hb/1"]) == {"hb/1": Status.ALIVE}
    # The owner keeps beating: still alive after more than one TTL.
    until = time.monotonic() + liveness.expiry + 0.5
    while time.monotonic() < until:
        assert liveness.keep_alive(store, "hb/1")
        time.sleep(0.2)
    assert store.check(["hb/1"])
    # The owner stops: etcd deletes the key when the lease runs out (bounded wait).
    deadline = time.monotonic() + liveness.expiry + 5
    while store.check(["hb/1"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not store.check(["hb/1"])
    assert observer.observe(store, ["hb/1"]) == {"hb/1": Status.DECLARED}
    assert observer.observe(store, ["hb/1"]) == {"hb/1": Status.GONE}  # declared once
    assert not liveness.keep_alive(store, "hb/1")  # the owner learns it is gone
    store.close()


def test_retire_and_declare_are_exclusive(etcd_member: EtcdMember) -> None:
    store = EtcdStore(etcd_member.endpoint, fresh_prefix(), timeout=5)
    liveness = EtcdLeaseLiveness(store, 1, 1)
    liveness.announce("hb/1")
    assert liveness.retire(store, "hb/1") is True
    assert not liveness.keep_alive(store, "hb/1")
    assert liveness.snapshot(store, ["hb/1"], "x") == [Status.GONE]
    # A slot whose owner never wrote its key is declared by exactly one snapshot.
    assert liveness.snapshot(store, ["hb/2"], "x") == [Status.DECLARED]
    assert liveness.snapshot(store, ["hb/2"], "y") == [Status.GONE]
    store.close()


def test_dead_member_is_excluded_by_lease_expiry(etcd_member: EtcdMember, make: Any) -> None:
    p = params(etcd_member, 3, "run-d")
    p.min_nodes = 2
    hs = [make(p) for _ in range(3)]
    join_all(hs)
    dead = hs[1]
    assert dead._keep_alive is not None
    dead._keep_alive.stop(join=True)  # the node 'dies': nobody renews its lease
    died = time.monotonic()
    joins = [Join(hs[0]), Join(hs[2])]
    infos = [j.result(timeout=30) for j in joins]
    assert {i.world_size for i in infos} == {2}
    took = time.monotonic() - died
    expiry = hs[0].liveness.expiry
    assert took >= expiry - 0.5, took  # the key lived until its lease ran out on the server
    assert took < expiry + 10, took


def test_bad_protocol_and_read_timeout(etcd_member: EtcdMember) -> None:
    with pytest.raises(ValueError, match=r"The protocol must be HTTP or HTTPS\."):
        create_etcd_handler(params(etcd_member, 1, "x", protocol="ftp"))
    with pytest.raises(ValueError, match=r"The read timeout must be a positive integer\."):
        create_etcd_handler(params(etcd_member, 1, "x", read_timeout=0))
    with pytest.raises(TypeError, match="keep_alive_interval=None"):
        create_etcd_handler(params(etcd_member, 1, "x", keep_alive_interval=None))


def test_unreachable_etcd_raises_connection_error_naming_it() -> None:
    endpoint = f"127.0.0.1:{free_ports(1)[0]}"
    p = RendezvousParameters("etcd", endpoint, "x", 1, 1, read_timeout=1)
    with pytest.raises(RendezvousConnectionError, match="The connection to etcd has failed") as exc:
        create_etcd_handler(p)
    assert endpoint in str(exc.value.__cause__)
