"""Unit tests of the sans-I/O engine: parsing, waiter registry, wake rules, barriers."""

from __future__ import annotations

import pytest

from rdzv.engine import Engine, Waiter, format_counter, parse_counter
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


def test_queue_push_wakes_one_in_registration_order() -> None:
    e, rec = Engine(), Recorder()
    first = e.wait([b"q"], rec, only="queue")
    second = e.wait([b"q"], rec, only="queue")
    e.queue_push(b"q", b"1")
    assert rec.fired == [first]
    e.queue_push(b"q", b"2")
    assert rec.fired == [first, second]


def test_a_push_goes_to_a_queue_waiter_not_an_earlier_value_waiter() -> None:
    e, rec = Engine(), Recorder()
    get = e.wait([b"k"], rec, only="value")  # a blocking get, parked first
    pop = e.wait([b"k"], rec, only="queue")  # then a blocking queue_pop
    e.queue_push(b"k", b"item")
    assert rec.fired == [pop]  # the item is for the pop; the get keeps waiting
    e.set(b"k", b"v")
    assert rec.fired == [pop, get]


def test_a_value_does_not_wake_a_queue_waiter_but_wakes_either() -> None:
    e, rec = Engine(), Recorder()
    pop = e.wait([b"k"], rec, only="queue")
    either = e.wait([b"k"], rec)  # a torch WAIT: a value or an item
    e.set(b"k", b"v")
    assert rec.fired == [either]
    e.queue_push(b"k", b"item")
    assert rec.fired == [either, pop]
    assert e.num_waiters() == 0


def test_a_push_prefers_a_queue_waiter_to_an_older_waiter_for_either() -> None:
    e, rec = Engine(), Recorder()
    either = e.wait([b"k"], rec)  # a torch WAIT, maybe a get's
    pop = e.wait([b"k"], rec, only="queue")
    e.queue_push(b"k", b"1")
    assert rec.fired == [pop]
    e.queue_push(b"k", b"2")  # no waiter for an item left: the one for either
    assert rec.fired == [pop, either]


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


def test_wait_only_rejects_unknown_namespace() -> None:
    with pytest.raises(ValueError, match="only"):
        Engine().wait([b"k"], Recorder(), only="bogus")


def test_fastpath_tables_are_the_engines_own_and_park_registers_a_waiter() -> None:
    e, rec = Engine(), Recorder()
    bound: dict[bytes, object] = {}
    tables = e.fastpath_tables(bound)
    tables.data[b"a"] = b"1"  # what the fast path's SET does
    assert e.get(b"a") == b"1"
    w = tables.park(b"k", rec, "conn")
    assert w.owner == "conn" and b"k" in tables.waiters
    e.queue_push(b"k", b"item")  # an item satisfies a parked torch WAIT too
    assert rec.fired == [w]
    assert e.num_waiters() == 0 and not tables.waiters


def test_fastpath_tables_refuse_an_engine_with_a_journal() -> None:
    class Discard:
        def on_set(self, key: bytes, value: bytes) -> None: ...
        def on_append(self, key: bytes, value: bytes) -> None: ...
        def on_delete(self, key: bytes) -> None: ...
        def on_queue_push(self, key: bytes, value: bytes) -> None: ...
        def on_queue_pop(self, key: bytes) -> None: ...

    with pytest.raises(ValueError, match="journal"):
        Engine(Discard()).fastpath_tables({})
