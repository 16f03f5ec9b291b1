"""The dynamic rendezvous with real handlers on a shared store (threads as nodes)."""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from bench.counting import CountingStore, OpCounter

from rdzv import HashStore, events
from rdzv.errors import (
    NetworkError,
    RendezvousClosedError,
    RendezvousGracefulExitError,
    RendezvousTimeoutError,
)
from rdzv.events import NodeState, RdzvEvent
from rdzv.rendezvous.api import RendezvousInfo, RendezvousParameters
from rdzv.rendezvous.dynamic import (
    DynamicRendezvousHandler,
    RendezvousTimeout,
    create_handler,
)
from rdzv.server import ServerThread
from rdzv.store.tcp import TCPStore
from tests.rendezvous.conftest import (
    EXPIRY,
    INTERVAL,
    Backend,
    Join,
    eventually,
    join_all,
    make_handler,
)


def handlers(
    backend: Backend, n: int, min_nodes: int, max_nodes: int, start: int = 0, **kw: Any
) -> list[DynamicRendezvousHandler]:
    return [
        make_handler(backend.connect(), min_nodes, max_nodes, index=start + i, **kw)
        for i in range(n)
    ]


def endpoints(infos: list[RendezvousInfo]) -> set[tuple[str, int]]:
    """The distinct bootstrap endpoints in ``infos``."""
    out = set()
    for info in infos:
        boot = info.bootstrap_store_info
        assert boot is not None
        out.add((boot.master_addr, boot.master_port))
    return out


def rank0_of(
    hs: list[DynamicRendezvousHandler], infos: list[RendezvousInfo]
) -> DynamicRendezvousHandler:
    return next(h for h, i in zip(hs, infos, strict=True) if i.rank == 0)


def stop(*hs: DynamicRendezvousHandler) -> None:
    """Stop the heartbeats of ``hs`` without telling anyone (the node 'dies')."""
    for h in hs:
        assert h._keep_alive is not None
        h._keep_alive.stop(join=True)


# ---------------------------------------------------------------------------- configuration
def test_timeout_defaults() -> None:
    t = RendezvousTimeout()
    assert (t.join, t.last_call, t.close, t.heartbeat) == (
        timedelta(seconds=600),
        timedelta(seconds=30),
        timedelta(seconds=30),
        timedelta(seconds=5),
    )
    t = RendezvousTimeout(join=1, last_call=timedelta(seconds=2), close=3.5, heartbeat=4)
    assert (t.join, t.last_call, t.close, t.heartbeat) == (
        timedelta(seconds=1),
        timedelta(seconds=2),
        timedelta(seconds=3.5),
        timedelta(seconds=4),
    )


@pytest.mark.parametrize("value", [0, -1, timedelta(0), timedelta(seconds=-1)])
@pytest.mark.parametrize("name", ["join", "last_call", "close", "heartbeat"])
def test_timeout_must_be_positive(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^The {name} timeout \(.*\) must be positive\.$"):
        RendezvousTimeout(**{name: value})  # type: ignore[arg-type]


def test_handler_validation() -> None:
    s = HashStore()
    with pytest.raises(ValueError, match=r"^The run id must be a non-empty string\.$"):
        DynamicRendezvousHandler("", s, 1, 1)
    with pytest.raises(ValueError, match=r"minimum number of nodes \(0\) must be greater than"):
        DynamicRendezvousHandler("r", s, 0, 1)
    with pytest.raises(ValueError, match=r"maximum number of nodes \(1\) must be greater than"):
        DynamicRendezvousHandler("r", s, 2, 1)
    with pytest.raises(ValueError, match="keep-alive interval"):
        DynamicRendezvousHandler("r", s, 1, 1, keep_alive_interval=0)
    with pytest.raises(TypeError, match="rdzv Store"):
        DynamicRendezvousHandler("r", object(), 1, 1)  # type: ignore[arg-type]


def test_create_handler_reads_torch_config_keys() -> None:
    params = RendezvousParameters(
        "c10d",
        "",
        "run",
        1,
        3,
        local_addr="10.0.0.7",
        join_timeout="50",
        last_call_timeout="60",
        close_timeout="70",
        heartbeat_timeout="8",
        keep_alive_interval="2",
        keep_alive_max_attempt="4",
    )
    h = create_handler(HashStore(), params, backend_name="c10d")
    s = h.settings
    assert (s.run_id, s.min_nodes, s.max_nodes) == ("run", 1, 3)
    assert s.timeout.join == timedelta(seconds=50)
    assert s.timeout.last_call == timedelta(seconds=60)
    assert s.timeout.close == timedelta(seconds=70)
    assert s.timeout.heartbeat == timedelta(seconds=8)
    assert s.keep_alive_interval == timedelta(seconds=2)
    assert s.keep_alive_max_attempt == 4
    assert h.get_backend() == "c10d" and h.get_run_id() == "run"
    assert h.node.startswith("10.0.0.7_")
    with pytest.raises(TypeError, match="keep_alive_interval=None"):
        create_handler(
            HashStore(),
            RendezvousParameters("c10d", "", "run", 1, 1, keep_alive_interval=None),
            backend_name="c10d",
        )
    with pytest.raises(ValueError, match="join_timeout"):
        create_handler(
            HashStore(),
            RendezvousParameters("c10d", "", "run", 1, 1, join_timeout="soon"),
            backend_name="c10d",
        )


# ---------------------------------------------------------------------------- rounds
@pytest.mark.parametrize("n", [1, 2, 5])
def test_min_equals_max_all_join(backend: Backend, n: int) -> None:
    hs = handlers(backend, n, n, n, last_call=60)
    started = time.monotonic()
    infos = join_all(hs)
    assert time.monotonic() - started < 5  # a full round does not wait for the last call
    assert sorted(i.rank for i in infos) == list(range(n))
    assert {i.world_size for i in infos} == {n}
    # Rank 0 publishes its own endpoint, the others read it.
    rank0 = rank0_of(hs, infos)
    assert endpoints(infos) == {rank0._master_endpoint}
    # The returned stores are one shared namespace for the round.
    infos[0].store.set("hello", b"world")
    assert all(i.store.get("hello") == b"world" for i in infos)
    assert infos[0].store.get("MASTER_ADDR") == rank0._master_endpoint[0].encode()  # type: ignore[index]


def test_ranks_follow_torch_order_in_the_first_round(backend: Backend) -> None:
    hs = handlers(backend, 4, 4, 4)
    infos = join_all(hs)
    # addresses 127.0.0.1..4: sorted descriptors, torch's rule
    assert [i.rank for i in infos] == [0, 1, 2, 3]


def test_last_call_window(backend: Backend) -> None:
    last_call = 1.5
    hs = handlers(backend, 3, 2, 4, last_call=last_call)
    joins = [Join(h) for h in hs[:2]]
    # The third arrives during the last call of the first two (its doorbell is rung when
    # the window opens), and the round waits out the window for it.
    eventually(lambda: backend.admin.check(["rdzv/job/r0/quorum"]), what="the last call")
    opened = time.monotonic()
    joins.append(Join(hs[2]))
    infos = [j.result() for j in joins]
    assert {i.world_size for i in infos} == {3}
    assert sorted(i.rank for i in infos) == [0, 1, 2]
    finished = max(j.finished for j in joins if j.finished)
    assert finished - joins[0].started >= last_call - 0.05
    assert finished - opened < last_call + 5.0


def test_round_waits_for_min_nodes(backend: Backend) -> None:
    hs = handlers(backend, 3, 3, 3, last_call=0.1)
    joins = [Join(h) for h in hs[:2]]
    time.sleep(0.5)
    assert not any(j.done() for j in joins)
    joins.append(Join(hs[2]))
    assert {j.result().world_size for j in joins} == {3}


def test_repeated_rounds_keep_ranks(backend: Backend) -> None:
    hs = handlers(backend, 4, 4, 4)
    first = [i.rank for i in join_all(hs)]
    for _ in range(3):
        assert [i.rank for i in join_all(hs)] == first
    assert hs[0]._membership is not None and hs[0]._membership.keys.number == 3


def test_survivors_keep_their_ranks_newcomers_follow(backend: Backend) -> None:
    # Addresses 127.0.0.2 and .3 form round 0; 127.0.0.1 (first in torch's sorted order)
    # arrives later and must not take rank 0 from the running job.
    old = handlers(backend, 2, 2, 3, start=1, last_call=0.3)
    first = join_all(old)
    newcomer = make_handler(backend.connect(), 2, 3, index=0, last_call=0.3)
    late = Join(newcomer)
    again = join_all(old)
    assert [i.rank for i in again] == [i.rank for i in first] == [0, 1]
    assert late.result().rank == 2


def test_late_arrival_is_waiting_then_joins_next_round(backend: Backend) -> None:
    hs = handlers(backend, 3, 2, 3, last_call=0.2)
    first = join_all(hs[:2])
    assert {i.world_size for i in first} == {2}
    assert [h.num_nodes_waiting() for h in hs[:2]] == [0, 0]
    late = Join(hs[2])
    eventually(
        lambda: all(h.num_nodes_waiting() == 1 for h in hs[:2]), what="num_nodes_waiting == 1"
    )
    assert not late.done()
    again = join_all(hs[:2])
    infos = [*again, late.result()]
    assert {i.world_size for i in infos} == {3}
    # Survivors keep their ranks; the newcomer comes after them.
    assert [i.rank for i in again] == [i.rank for i in first]
    assert infos[2].rank == 2


def test_spare_nodes_do_not_count_as_waiting_and_exit_gracefully(backend: Backend) -> None:
    hs = handlers(backend, 3, 2, 2)
    join_all(hs[:2])
    spare = Join(hs[2])
    eventually(lambda: backend.admin.check(["rdzv/job/r1/joined"]), what="the spare's slot")
    time.sleep(3 * INTERVAL)  # heartbeats and refreshes happen; the spare still does not count
    assert [h.num_nodes_waiting() for h in hs[:2]] == [0, 0]
    assert not spare.done()
    hs[0].set_closed()
    _, exc = spare.outcome()
    assert isinstance(exc, RendezvousGracefulExitError)
    assert hs[1].is_closed()
    with pytest.raises(RendezvousClosedError):
        hs[1].next_rendezvous()


def test_members_keep_their_places_over_a_spare(backend: Backend) -> None:
    hs = handlers(backend, 3, 2, 2)
    first = join_all(hs[:2])
    spare = Join(hs[2])  # takes slot 1 of round 1, before the members come back
    eventually(lambda: backend.admin.check(["rdzv/job/r1/joined"]), what="the spare's slot")
    again = join_all(hs[:2])  # e.g. a worker failed: both members re-rendezvous
    assert [i.rank for i in again] == [i.rank for i in first]
    assert not spare.done()  # still a spare, waiting for the next round
    hs[0].set_closed()
    _, exc = spare.outcome()
    assert isinstance(exc, RendezvousGracefulExitError)


def test_spare_becomes_waiting_when_a_member_dies(backend: Backend) -> None:
    hs = handlers(backend, 3, 2, 2)
    join_all(hs[:2])
    spare = Join(hs[2])
    eventually(lambda: backend.admin.check(["rdzv/job/r1/joined"]), what="the spare's slot")
    stop(hs[0])  # member 0 dies after completion
    died = time.monotonic()
    eventually(lambda: hs[1].num_nodes_waiting() == 1, what="the spare to count as waiting")
    assert time.monotonic() - died < EXPIRY + 2.0
    info = Join(hs[1]).result()
    spare_info = spare.result()
    assert {info.world_size, spare_info.world_size} == {2}
    assert {info.rank, spare_info.rank} == {0, 1}
    assert info.rank == 0  # the survivor was rank 1 and is the oldest member now


def test_dead_member_is_excluded_from_the_next_round(backend: Backend) -> None:
    hs = handlers(backend, 3, 2, 3, last_call=0.2)
    join_all(hs)
    stop(hs[1])
    died = time.monotonic()
    joins = [Join(hs[0]), Join(hs[2])]
    infos = [j.result() for j in joins]
    assert {i.world_size for i in infos} == {2}
    took = max(j.finished for j in joins if j.finished) - died
    # detection (expiry + at most one tick) + last call
    assert EXPIRY <= took < EXPIRY + INTERVAL + 0.2 + 2.0, took


def test_dead_pending_node_is_excluded(backend: Backend) -> None:
    # max 4: the round completes when the last call ends, by then x has missed its heartbeats
    # (a round that fills up at once includes a node that died a moment ago, as in torch).
    hs = handlers(backend, 3, 2, 4, last_call=2 * EXPIRY + 0.5)
    a = Join(hs[0])
    x = hs[1]
    # x takes a slot and dies before the round completes: it never waits for its rank.
    x._ensure_keep_alive()
    x._join(0)
    stop(x)
    b = Join(hs[2])
    infos = [a.result(), b.result()]
    assert {i.world_size for i in infos} == {2}
    assert sorted(i.rank for i in infos) == [0, 1]


def test_join_timeout_rolls_back(backend: Backend) -> None:
    hs = handlers(backend, 2, 3, 3, join=0.5)
    joins = [Join(h) for h in hs]
    for j in joins:
        _, exc = j.outcome()
        assert isinstance(exc, RendezvousTimeoutError)
        assert "timed out after 0.5s" in str(exc)
    # both slots were given back: three new nodes complete round 0 without them
    fresh = handlers(backend, 3, 3, 3, start=10)
    infos = join_all(fresh)
    assert {i.world_size for i in infos} == {3}
    assert backend.admin.get("rdzv/job/r0/hb/1") == b"left"


def test_close_wakes_pending_nodes(backend: Backend) -> None:
    hs = handlers(backend, 3, 3, 3)
    joins = [Join(h) for h in hs[:2]]
    time.sleep(0.2)
    assert not hs[2].is_closed()
    hs[2].set_closed()
    for j in joins:
        _, exc = j.outcome()
        assert isinstance(exc, RendezvousClosedError)
    assert all(h.is_closed() for h in hs)
    with pytest.raises(RendezvousClosedError):
        hs[2].next_rendezvous()
    hs[2].set_closed()  # idempotent


def test_shutdown_closes_and_stops_heartbeats(backend: Backend) -> None:
    hs = handlers(backend, 2, 2, 2)
    join_all(hs)
    names = {t.name for t in threading.enumerate()}
    assert {h._keep_alive.name for h in hs if h._keep_alive} <= names
    assert hs[0].shutdown() is True
    assert hs[0].shutdown() is True
    assert hs[1].is_closed()
    assert hs[0]._keep_alive is not None
    hs[0]._keep_alive._thread.join(5)
    assert not hs[0]._keep_alive.is_alive()
    with pytest.raises(RendezvousClosedError):
        hs[1].next_rendezvous()


def test_shutdown_does_not_wait_for_a_store_server_that_is_gone() -> None:
    # When torchrun's job ends, the agent hosting the store may exit first. The others'
    # shutdown must fail at once (logged, False), as with torch's client, instead of
    # reconnecting to the gone server for the store timeout (60 s here), once per call.
    server = ServerThread("127.0.0.1", 0).start()
    stores = [TCPStore("127.0.0.1", server.port, timeout=60) for _ in range(2)]
    hs = [make_handler(store, 2, 2, index=i) for i, store in enumerate(stores)]
    join_all(hs)
    server.stop()
    try:
        # The connection is found lost by a call whose outcome is unknown: reconnectable.
        with pytest.raises(NetworkError, match="reconnects on its next call"):
            stores[1].add("elsewhere", 1)
        started = time.monotonic()
        assert hs[1].shutdown() is False  # leaving: not reconnected
        assert hs[1].shutdown() is False  # closing: no control connection opened
        assert time.monotonic() - started < 20, "shutdown waited for the gone server"
        assert stores[1].reconnect is True  # switched off for the last calls only
    finally:
        for h in hs:
            h.shutdown()
        for store in stores:
            store.close()


def test_bootstrap_endpoint_follows_the_new_rank0(backend: Backend) -> None:
    hs = handlers(backend, 3, 2, 3, last_call=0.2)
    infos = join_all(hs)
    rank0 = rank0_of(hs, infos)
    stop(rank0)
    rest = [h for h in hs if h is not rank0]
    again = join_all(rest)
    assert endpoints(again) == {rank0_of(rest, again)._master_endpoint} != endpoints(infos)


def test_old_rounds_are_cleaned_up(backend: Backend) -> None:
    hs = handlers(backend, 2, 2, 2)
    for _ in range(4):
        join_all(hs)
    admin = backend.admin

    def round_keys(n: int) -> list[str]:
        return [k for k in admin.list_keys() if k.startswith(f"rdzv/job/r{n}/")]

    eventually(lambda: not round_keys(0) and not round_keys(1), what="rounds 0 and 1 deleted")
    assert round_keys(3)


class _DyingCounter(OpCounter):
    dead = False

    def bump(self, op: str, value_bytes: int = 0) -> None:
        if self.dead:
            raise OSError("this node is dead")
        super().bump(op, value_bytes)


class _DiesWhenPublishingRanks(CountingStore):
    """A node's store that 'kills' the node when it publishes rank records: the closer
    dies right after its compare_set froze the round."""

    def _multi_set(self, keys: list[str], values: list[bytes]) -> None:
        if any("/rank/" in k for k in keys):
            assert isinstance(self.counter, _DyingCounter)
            self.counter.dead = True
            raise OSError("killed")
        super()._multi_set(keys, values)


def test_closer_dies_before_publishing_ranks(backend: Backend) -> None:
    hs = handlers(backend, 2, 2, 3, last_call=1.5)
    joins = [Join(h) for h in hs]
    eventually(lambda: backend.admin.check(["rdzv/job/r0/hb/2"]), what="two slots")
    closer = make_handler(
        _DiesWhenPublishingRanks(backend.connect(), _DyingCounter()), 2, 3, index=5, last_call=1.5
    )
    _, exc = Join(closer).outcome()
    assert exc is not None and "killed" in str(exc)
    frozen_at = time.monotonic()
    infos = [j.result() for j in joins]
    # The others published the ranks themselves once they had been missing for the
    # liveness expiry; the dead closer is a member of that round (it froze it).
    assert {i.world_size for i in infos} == {3}
    assert len({i.rank for i in infos}) == 2
    assert time.monotonic() - frozen_at < EXPIRY + INTERVAL + 2.0
    # The next round goes on without it.
    again = join_all(hs)
    assert {i.world_size for i in again} == {2}


# ---------------------------------------------------------------------------- costs and events
@pytest.mark.parametrize("n", [16, 64])
def test_store_operations_per_node_do_not_grow_with_n(backend: Backend, n: int) -> None:
    # The keep-alive threads work on clones, counted apart (they wait for late arrivals).
    counter, background = OpCounter(), OpCounter()
    hs = [
        make_handler(
            CountingStore(backend.connect(), counter, background), n, n, index=i, interval=30
        )
        for i in range(n)
    ]
    join_all(hs)
    per_node = counter.total() / n
    # 6 per node, plus a handful for the closer and the two monitors
    # add(round, 0), add(joined, 1), multi_set(descriptor, heartbeat), get(rank) + a few for
    # the closer and the two monitors
    assert 4 <= per_node <= 4 + 64 / n, counter.snapshot()


def test_events_for_every_step(backend: Backend) -> None:
    seen: list[RdzvEvent] = []
    remove = events.add_callback(
        lambda e: seen.append(e) if isinstance(e, RdzvEvent) and e.run_id.startswith("ev") else None
    )
    try:
        hs = handlers(backend, 2, 2, 2, run_id="ev")
        join_all(hs)
        with pytest.raises(RendezvousTimeoutError):
            make_handler(backend.connect(), 3, 3, index=7, run_id="ev2", join=0.2).next_rendezvous()
        hs[0].set_closed()
    finally:
        remove()
    msgs = [e.message for e in seen]
    assert sum("attempts to join" in m for m in msgs) == 3
    joined = [e for e in seen if "has joined round 0" in e.message]
    assert len(joined) == 2
    assert all(e.duration_ms is not None and e.rank is not None for e in joined)
    failed = [e for e in seen if e.node_state is NodeState.FAILED]
    assert any("RendezvousTimeoutError" in e.message and e.duration_ms for e in failed)
    assert any("has closed the rendezvous" in m for m in msgs)


def test_node_lost_event(backend: Backend) -> None:
    seen: list[RdzvEvent] = []
    remove = events.add_callback(lambda e: seen.append(e) if isinstance(e, RdzvEvent) else None)
    try:
        hs = handlers(backend, 2, 1, 2, last_call=0.1)
        join_all(hs)
        stop(hs[1])
        Join(hs[0]).result()
    finally:
        remove()
    assert any("declared dead" in e.message for e in seen)


def test_join_timeout_names_the_members_that_did_not_come_back(backend: Backend) -> None:
    hs = handlers(backend, 2, 2, 2, join=1.0)
    infos = join_all(hs)
    away = next(h for h, i in zip(hs, infos, strict=True) if i.rank == 1)
    back = next(h for h in hs if h is not away)
    # `away` stays alive (its keep-alive beats) but never joins round 1.
    _, exc = Join(back).outcome()
    assert isinstance(exc, RendezvousTimeoutError)
    text = str(exc)
    assert "Still waiting for 1 member(s) of round 0 to come back or be declared dead" in text
    assert f"pid {os.getpid()}" in text and "last heartbeat " in text


def test_declare_lost_marks_the_node_dead_at_once(backend: Backend) -> None:
    # A long keep-alive expiry: only the launcher's verdict can end the wait early.
    hs = handlers(backend, 2, 1, 2, interval=5.0)
    infos = join_all(hs)
    lost = next(h for h, i in zip(hs, infos, strict=True) if i.rank == 1)
    survivor = next(h for h in hs if h is not lost)
    stop(lost)
    assert survivor.declare_lost(0) is False  # its own rank: nothing to do
    assert survivor.declare_lost(1) is True
    assert survivor.declare_lost(1) is False  # already dead
    slots = [s for s in (1, 2) if backend.admin.get(f"rdzv/job/r0/hb/{s}").startswith(b"dead:")]
    assert len(slots) == 1
    started = time.monotonic()
    info = Join(survivor).result()
    assert info.world_size == 1
    assert time.monotonic() - started < 5.0  # well under the 15 s keep-alive expiry
