"""EtcdStore on a 3-member etcd cluster while members die and come back: no acknowledged
write is lost, and a client given every endpoint rides through the loss of its own."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from rdzv import NetworkError
from rdzv.store.etcd import EtcdStore
from tests.etcd_fixtures import EtcdCluster, EtcdMember, fresh_prefix

pytestmark = pytest.mark.timeout(120)


class Writer:
    """A background client setting ``w<i>`` = ``i`` for i = 0, 1, ... and counting acks."""

    def __init__(self, store: EtcdStore, op: Callable[[EtcdStore, int], object] | None = None):
        self.store = store
        self.op = op or (lambda s, i: s.set(f"w{i}", str(i)))
        self.acked: list[int] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                self.op(self.store, i)
            except BaseException as exc:  # recorded and asserted on by the test
                self.errors.append(exc)
                return
            with self._progress:
                self.acked.append(i)
                self._progress.notify_all()
            i += 1

    def wait_acks(self, n: int, timeout: float = 30.0) -> None:
        """Wait (bounded) until ``n`` more writes than now are acknowledged."""
        with self._progress:
            target = len(self.acked) + n
            ok = self._progress.wait_for(
                lambda: len(self.acked) >= target or bool(self.errors), timeout
            )
        assert not self.errors, self.errors
        assert ok, f"writer stalled at {len(self.acked)} acks"

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()
        assert not self.errors, self.errors
        return self.acked


def _client(endpoints: list[str], prefix: str, first: str | None = None) -> EtcdStore:
    """A store on ``endpoints``, talking to ``first`` to begin with."""
    order = list(endpoints)
    if first is not None:
        order.remove(first)
        order.insert(0, first)
    return EtcdStore(order, prefix, timeout=20)


def _assert_all_present(store: EtcdStore, acked: list[int]) -> None:
    assert acked, "nothing was acknowledged"
    values = store.multi_get([f"w{i}" for i in acked])
    assert values == [str(i).encode() for i in acked]


def _survivors(cluster: EtcdCluster, dead: EtcdMember) -> list[str]:
    return [m.endpoint for m in cluster.members if m is not dead]


def test_stop_a_follower_during_writes(etcd_cluster: EtcdCluster) -> None:
    prefix = fresh_prefix()
    leader = etcd_cluster.leader()
    follower = next(m for m in etcd_cluster.members if m is not leader)
    writer = Writer(_client(etcd_cluster.endpoints, prefix, first=follower.endpoint))
    writer.wait_acks(50)
    follower.stop(kill=True)
    writer.wait_acks(50)  # rides through the loss of the member it was talking to
    acked = writer.stop()
    assert writer.store.endpoint != follower.endpoint
    _assert_all_present(_client(_survivors(etcd_cluster, follower), prefix), acked)


def test_stop_the_leader_during_writes(etcd_cluster: EtcdCluster) -> None:
    prefix = fresh_prefix()
    leader = etcd_cluster.leader()
    writer = Writer(_client(etcd_cluster.endpoints, prefix, first=leader.endpoint))
    writer.wait_acks(50)
    leader.stop(kill=True)
    writer.wait_acks(50)
    acked = writer.stop()
    new_leader = etcd_cluster.leader()
    assert new_leader is not leader
    _assert_all_present(_client(_survivors(etcd_cluster, leader), prefix), acked)


def test_graceful_stop_of_the_member_in_use(etcd_cluster: EtcdCluster) -> None:
    prefix = fresh_prefix()
    member = etcd_cluster.members[1]
    writer = Writer(_client(etcd_cluster.endpoints, prefix, first=member.endpoint))
    writer.wait_acks(30)
    member.stop()  # SIGTERM
    writer.wait_acks(30)
    _assert_all_present(_client(_survivors(etcd_cluster, member), prefix), writer.stop())


def test_restarted_member_has_every_acknowledged_write(etcd_cluster: EtcdCluster) -> None:
    prefix = fresh_prefix()
    victim = etcd_cluster.members[2]
    writer = Writer(_client(etcd_cluster.endpoints, prefix, first=etcd_cluster.members[0].endpoint))
    writer.wait_acks(30)
    victim.stop(kill=True)
    writer.wait_acks(30)  # written while the member was down
    victim.start(state="existing")
    writer.wait_acks(30)
    acked = writer.stop()
    # Read through the restarted member only: it caught up with what it missed.
    only_victim = EtcdStore(victim.endpoint, prefix, timeout=20)
    _assert_all_present(only_victim, acked)


def test_counters_and_cas_ride_through_the_loss_of_the_member_in_use(
    etcd_cluster: EtcdCluster,
) -> None:
    store = _client(etcd_cluster.endpoints, fresh_prefix())
    assert store.add("n", 1) == 1
    assert store.compare_set("c", b"", b"a") == b"a"
    store.queue_push("q", b"1")
    in_use = etcd_cluster.member_at(store.endpoint)
    in_use.stop(kill=True)
    assert store.add("n", 1) == 2
    assert store.compare_set("c", b"a", b"b") == b"b"
    store.queue_push("q", b"2")
    assert [store.queue_pop("q"), store.queue_pop("q")] == [b"1", b"2"]
    assert store.delete_key("c") is True
    assert store.endpoint != in_use.endpoint
    store.barrier("b", 1)


def test_blocked_get_survives_the_loss_of_its_member(etcd_cluster: EtcdCluster) -> None:
    prefix = fresh_prefix()
    leader = etcd_cluster.leader()
    follower = next(m for m in etcd_cluster.members if m is not leader)
    reader = _client(etcd_cluster.endpoints, prefix, first=follower.endpoint)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(reader.get("late")), daemon=True)
    t.start()
    follower.wait_metric("etcd_debugging_mvcc_watcher_total", 1)  # the reader is watching
    follower.stop(kill=True)
    writer = _client(_survivors(etcd_cluster, follower), prefix)
    writer.set("late", b"value")
    t.join(30)
    assert result == [b"value"]


def test_whole_cluster_down_raises_network_error_naming_every_endpoint(
    etcd_cluster: EtcdCluster,
) -> None:
    store = EtcdStore(etcd_cluster.endpoints, fresh_prefix(), timeout=1)
    store.set("k", b"v")
    for member in etcd_cluster.members:
        member.stop(kill=True)
    start = time.monotonic()
    with pytest.raises(NetworkError) as info:
        store.set("k", b"w")
    assert time.monotonic() - start < 6
    assert all(e in str(info.value) for e in etcd_cluster.endpoints)


def test_lost_quorum_is_reported_then_recovers(etcd_cluster: EtcdCluster) -> None:
    store = EtcdStore(etcd_cluster.endpoints, fresh_prefix(), timeout=1.5)
    store.set("k", b"v")
    a, b, _ = etcd_cluster.members
    a.stop(kill=True)
    b.stop(kill=True)
    with pytest.raises(NetworkError, match=r"no leader|answered"):
        store.set("k", b"w")
    a.start(state="existing", wait=False)
    b.start(state="existing", wait=False)
    a.wait_ready()
    store.set_timeout(20)
    store.set("k", b"x")
    assert store.get("k") == b"x"


def test_adds_are_applied_exactly_once_across_a_leader_crash(etcd_cluster: EtcdCluster) -> None:
    # Two clients count on one key; the one talking to the leader loses it mid-stream.
    # Lost requests are recovered (session fence), never re-applied: the counter ends at
    # exactly the number of acknowledged adds, and nobody got an error.
    prefix = fresh_prefix()
    leader = etcd_cluster.leader()
    follower = next(m for m in etcd_cluster.members if m is not leader)

    def add(s: EtcdStore, i: int) -> None:
        s.add("n", 1)

    writers = [
        Writer(_client(etcd_cluster.endpoints, prefix, first=leader.endpoint), add),
        Writer(_client(etcd_cluster.endpoints, prefix, first=follower.endpoint), add),
    ]
    for w in writers:
        w.wait_acks(30)
    leader.stop(kill=True)
    for w in writers:
        w.wait_acks(30)
    acked = sum(len(w.stop()) for w in writers)
    reader = _client(_survivors(etcd_cluster, leader), prefix)
    assert reader.add("n", 0) == acked
