"""Unit tests of the sans-I/O engine: parsing, waiter registry, wake rules, barriers."""

from __future__ import annotations

import pytest

from rdzv.engine import Engine, Journal, Waiter, format_counter, parse_counter
from rdzv.errors import CounterError


class Recorder:
    def __init__(self) -> None:
        self.fired: list[Waiter] = []

    def __call__(self, waiter: Waiter) -> None:
        self.fired.append(waiter)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"0", 0),
        (b"-3", -3),
        (b"+7", 7),
        (b" \t12", 12),
        (b"12abc", 12),
        (b"007", 7),
        (str(2**63 - 1).encode(), 2**63 - 1),
        (str(-(2**63)).encode(), -(2**63)),
    ],
)
def test_parse_counter_follows_strtoll(raw: bytes, value: int) -> None:
    assert parse_counter(b"k", raw) == value


@pytest.mark.parametrize("raw", [b"", b"abc", b"-", b"+", b" ", b"x12", str(2**63).encode()])
def test_parse_counter_rejects(raw: bytes) -> None:
    with pytest.raises(CounterError, match="'k'"):
        parse_counter(b"k", raw)


def test_format_counter() -> None:
    assert format_counter(-3) == b"-3"


def test_wait_returns_none_when_present() -> None:
    e, rec = Engine(), Recorder()
    e.set(b"a", b"1")
    assert e.wait([b"a"], rec) is None
    assert rec.fired == []
    assert e.num_waiters() == 0


def test_wait_fires_once_all_keys_arrive() -> None:
    e, rec = Engine(), Recorder()
    w = e.wait([b"a", b"b"], rec, owner="me")
    assert w is not None and w.owner == "me"
    e.set(b"a", b"1")
    assert rec.fired == []
    e.add(b"b", 1)
    assert rec.fired == [w]
    assert e.num_waiters() == 0


def test_keys_present_at_registration_are_not_rechecked() -> None:
    e, rec = Engine(), Recorder()
    e.set(b"a", b"1")
    w = e.wait([b"a", b"b"], rec)
    e.delete_key(b"a")
    e.set(b"b", b"1")
    assert rec.fired == [w]


def test_delete_wakes_nobody_and_cancel_unregisters() -> None:
    e, rec = Engine(), Recorder()
    w = e.wait([b"a"], rec)
    assert w is not None
    e.delete_key(b"a")
    assert rec.fired == []
    assert e.cancel(w) is True
    assert e.cancel(w) is False
    e.set(b"a", b"1")
    assert rec.fired == []


def test_queue_push_hands_one_item_per_pop_waiter_in_registration_order() -> None:
    e, rec = Engine(), Recorder()
    first = e.queue_pop_wait(b"q", rec)
    second = e.queue_pop_wait(b"q", rec)
    assert isinstance(first, Waiter) and isinstance(second, Waiter)
    e.queue_push(b"q", b"1")
    assert rec.fired == [first] and first.result == b"1"
    assert e.queue_len(b"q") == 0  # popped for the waiter, in the same step
    e.queue_push(b"q", b"2")
    assert rec.fired == [first, second] and second.result == b"2"


def test_queue_pop_wait_pops_at_once_when_an_item_is_there() -> None:
    e, rec = Engine(), Recorder()
    e.queue_push(b"q", b"1")
    assert e.queue_pop_wait(b"q", rec) == b"1"
    assert e.queue_len(b"q") == 0 and e.num_waiters() == 0


def test_a_push_goes_to_a_pop_waiter_not_an_earlier_get_waiter() -> None:
    # The lost wake-up of issue 14: get parked, then queue_pop parked, then queue_push.
    e, rec = Engine(), Recorder()
    get = e.get_wait(b"k", rec)  # a blocking get, parked first
    pop = e.queue_pop_wait(b"k", rec)  # then a blocking queue_pop
    assert isinstance(get, Waiter) and isinstance(pop, Waiter)
    e.queue_push(b"k", b"item")
    assert rec.fired == [pop] and pop.result == b"item"  # the get keeps waiting
    assert e.queue_len(b"k") == 0
    e.set(b"k", b"v")
    assert rec.fired == [pop, get] and get.result == b"v"


def test_a_value_does_not_wake_a_pop_waiter_but_wakes_a_wait() -> None:
    e, rec = Engine(), Recorder()
    pop = e.queue_pop_wait(b"k", rec)
    either = e.wait([b"k"], rec)  # a torch WAIT: a value or an item
    e.set(b"k", b"v")
    assert rec.fired == [either]
    e.queue_push(b"k", b"item")
    assert rec.fired == [either, pop] and pop.result == b"item"
    assert e.num_waiters() == 0


def test_a_push_prefers_a_pop_waiter_to_an_older_wait() -> None:
    e, rec = Engine(), Recorder()
    either = e.wait([b"k"], rec)  # a torch WAIT, maybe a get's
    pop = e.queue_pop_wait(b"k", rec)
    e.queue_push(b"k", b"1")
    assert rec.fired == [pop]
    e.queue_push(b"k", b"2")  # no pop waiter left: the WAIT wakes, the item stays
    assert rec.fired == [pop, either]
    assert e.queue_len(b"k") == 1


def test_get_wait_is_handed_the_value_that_woke_it() -> None:
    e, rec = Engine(), Recorder()
    e.set(b"other", b"x")
    assert e.get_wait(b"other", rec) == b"x"
    w = e.get_wait(b"k", rec)
    assert isinstance(w, Waiter) and w.kind == "get"
    e.queue_push(b"k", b"item")  # an item is not a value
    assert rec.fired == []
    e.add(b"k", 5)
    assert rec.fired == [w] and w.result == b"5"


def test_multi_get_wait_collects_every_value_and_waits_again_for_deleted_keys() -> None:
    e, rec = Engine(), Recorder()
    e.set(b"a", b"1")
    assert e.multi_get_wait([b"a"], rec) == [b"1"]
    w = e.multi_get_wait([b"a", b"b", b"c"], rec)
    assert isinstance(w, Waiter)
    e.set(b"b", b"2")
    e.delete_key(b"a")  # present at registration, gone before the last key arrives
    e.set(b"c", b"3")
    assert rec.fired == []  # waits again, for a
    assert w.missing == {b"a"}
    e.set(b"a", b"one")
    assert rec.fired == [w] and w.result == [b"one", b"2", b"3"]
    assert e.num_waiters() == 0


def test_a_cancelled_waiter_that_already_fired_keeps_its_result() -> None:
    e, rec = Engine(), Recorder()
    w = e.queue_pop_wait(b"q", rec)
    assert isinstance(w, Waiter)
    e.queue_push(b"q", b"x")
    assert e.cancel(w) is False and w.result == b"x"


def test_compare_set_wakes_only_when_key_exists_afterwards() -> None:
    e, rec = Engine(), Recorder()
    w = e.wait([b"k"], rec)
    assert e.compare_set(b"k", b"nope", b"x") == b"nope"
    assert rec.fired == []
    assert e.compare_set(b"k", b"", b"x") == b"x"
    assert rec.fired == [w]


def test_barrier_generations() -> None:
    e, rec = Engine(), Recorder()
    w1 = e.barrier(b"b", 2, rec)
    assert w1 is not None
    assert e.barrier(b"b", 2, rec) is None  # second arrival releases generation 1
    assert rec.fired == [w1]
    w3 = e.barrier(b"b", 2, rec)  # generation 2 waits again
    assert w3 is not None and rec.fired == [w1]
    assert e.get(b"b") == b"3"
    assert e.cancel(w3) is True
    assert e.num_waiters() == 0


def test_add_on_barrier_key_releases_it() -> None:
    e, rec = Engine(), Recorder()
    w = e.barrier(b"b", 3, rec)
    e.add(b"b", 2)
    assert rec.fired == [w]


def test_barrier_rejects_non_integer_and_bad_world_size() -> None:
    e, rec = Engine(), Recorder()
    e.set(b"b", b"x")
    with pytest.raises(CounterError):
        e.barrier(b"b", 2, rec)
    with pytest.raises(ValueError, match="world_size"):
        e.barrier(b"c", 0, rec)


def test_multi_set_mismatch_changes_nothing() -> None:
    e = Engine()
    with pytest.raises(ValueError, match="2 keys but 1 values"):
        e.multi_set([b"a", b"b"], [b"1"])
    assert e.num_keys() == 0


def test_add_overflow_keeps_value() -> None:
    e = Engine()
    e.add(b"c", 2**63 - 1)
    with pytest.raises(CounterError, match="overflows int64"):
        e.add(b"c", 1)
    assert e.get(b"c") == str(2**63 - 1).encode()


def test_fastpath_tables_are_the_engines_own_and_park_registers_a_waiter() -> None:
    e, rec = Engine(), Recorder()
    tables = e.fastpath_tables()
    tables.data[b"a"] = b"1"  # what the fast path's SET does
    assert e.get(b"a") == b"1"
    w = tables.park(b"k", rec, "conn")
    assert w.owner == "conn" and b"k" in tables.waiters
    e.queue_push(b"k", b"item")  # an item satisfies a parked torch WAIT too
    assert rec.fired == [w]
    assert e.num_waiters() == 0 and not tables.waiters


def test_fastpath_tables_refuse_an_engine_with_a_journal() -> None:
    class Discard(Journal):  # the protocol's own methods do nothing
        pass

    with pytest.raises(ValueError, match="journal"):
        Engine(Discard()).fastpath_tables()


def test_ephemeral_keys_are_deleted_when_their_owner_closes() -> None:
    e = Engine()
    e.set_ephemeral(b"a", b"1", "conn1")
    e.set_ephemeral(b"b", b"1", "conn1")
    e.set_ephemeral(b"c", b"1", "conn2")
    e.set_ephemeral(b"d", b"1", "conn1")
    e.set(b"d", b"2")  # a plain write makes it ordinary
    e.set_ephemeral(b"b", b"2", "conn2")  # set again: bound to the new owner
    assert sorted(e.bound_keys()) == [b"a", b"b", b"c"]
    assert sorted(e.owner_closed("conn1")) == [b"a"]
    assert e.owner_closed("conn1") == []
    assert e.list_keys() == [b"b", b"c", b"d"]
    assert sorted(e.owner_closed("conn2")) == [b"b", b"c"]
    assert e.bound_keys() == [] and e.list_keys() == [b"d"]


def test_writes_unbind_an_ephemeral_key() -> None:
    for write in (
        lambda e: e.append(b"k", b"x"),
        lambda e: e.add(b"k", 1),
        lambda e: e.compare_set(b"k", b"1", b"2"),
        lambda e: e.multi_set([b"k"], [b"v"]),
        lambda e: e.delete_key(b"k"),
    ):
        e = Engine()
        e.set_ephemeral(b"k", b"1", "conn")
        write(e)
        assert e.bound_keys() == []
        assert e.owner_closed("conn") == []
    e = Engine()
    e.set_ephemeral(b"k", b"1", "conn")
    e.compare_set(b"k", b"other", b"2")  # no write: still bound
    assert e.owner_closed("conn") == [b"k"]


def test_leases_expire_at_their_deadline_and_renew() -> None:
    e = Engine()
    assert e.next_deadline() is None and e.expire(1e9) == []
    e.set_lease(b"a", b"1", 10.0)
    e.set_lease(b"b", b"1", 5.0)
    e.set_lease(b"c", b"1", 7.0)
    e.set_lease(b"b", b"2", 20.0)  # renewal replaces the deadline
    e.set(b"c", b"plain")  # ordinary now
    assert e.next_deadline() == 10.0
    assert e.expire(9.99) == []
    assert e.expire(10.0) == [b"a"]
    assert e.next_deadline() == 20.0
    assert e.list_keys() == [b"b", b"c"]
    assert e.expire(25.0) == [b"b"]
    assert e.next_deadline() is None and e.bound_keys() == []
    assert e.list_keys() == [b"c"]


def test_a_lease_and_an_owner_replace_each_other() -> None:
    e = Engine()
    e.set_lease(b"k", b"1", 5.0)
    e.set_ephemeral(b"k", b"2", "conn")
    assert e.expire(10.0) == []  # the lease is gone with the rebinding
    e.set_lease(b"k", b"3", 20.0)
    assert e.owner_closed("conn") == []
    assert e.expire(20.0) == [b"k"]
