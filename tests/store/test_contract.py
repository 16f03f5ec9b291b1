"""The Store contract: one suite, run against every backend in ``tests/store/backends.py``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from rdzv import CounterError, QueueEmptyError, Store, StoreError, StoreTimeoutError
from tests.store.backends import BACKENDS

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=sorted(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with BACKENDS[request.param](tmp_path) as s:
        yield s


class Background:
    """Run ``fn`` in a thread; ``result()`` joins it (bounded) and returns or re-raises."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self._fn = fn
        self._value: object = None
        self._error: BaseException | None = None
        self.elapsed = -1.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        try:
            self._value = self._fn()
        except BaseException as exc:  # re-raised in result()
            self._error = exc
        self.elapsed = time.monotonic() - start

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float = 15.0) -> object:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background call did not finish in time"
        if self._error is not None:
            raise self._error
        return self._value


# --------------------------------------------------------------------------- set / get
def test_set_get_roundtrip(store: Store) -> None:
    store.set("k", b"v")
    assert store.get("k") == b"v"
    store.set("k", "second")  # str values are encoded UTF-8, overwriting
    assert store.get("k") == b"second"


def test_bytes_key_is_the_decoded_str_key(store: Store) -> None:
    store.set(b"bk", b"1")
    assert store.get("bk") == b"1"


def test_unicode_keys_and_values(store: Store) -> None:
    key = "ключ/键/🔑"
    store.set(key, "värde ✓")
    assert store.get(key) == "värde ✓".encode()
    assert key in store.list_keys()


def test_empty_value(store: Store) -> None:
    store.set("empty", b"")
    assert store.get("empty") == b""
    assert store.check(["empty"])


def test_large_value(store: Store) -> None:
    big = bytes(range(256)) * (6 * 4096)  # 6 MiB
    store.set("big", big)
    assert store.get("big") == big


def test_many_keys(store: Store) -> None:
    n = 100_000
    base = store.num_keys()  # internal keys, counted as torch counts them (FileStore: 1)
    keys = [f"key{i}" for i in range(n)]
    for start in range(0, n, 10_000):
        chunk = keys[start : start + 10_000]
        store.multi_set(chunk, [k.encode() for k in chunk])
    assert store.num_keys() == base + n
    assert set(store.list_keys()) == set(keys)
    assert store.get("key0") == b"key0"
    assert store.get("key99999") == b"key99999"


# --------------------------------------------------------------------------- timeouts
def test_default_timeout_is_reported_and_settable(store: Store) -> None:
    assert store.timeout == timedelta(seconds=5)
    store.set_timeout(timedelta(milliseconds=1500))
    assert store.timeout == timedelta(seconds=1.5)
    store.set_timeout(2)
    assert store.timeout == timedelta(seconds=2)


def test_get_times_out_with_default_timeout(store: Store) -> None:
    store.set_timeout(0.3)
    start = time.monotonic()
    with pytest.raises(StoreTimeoutError) as info:
        store.get("missing")
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 3.0
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, StoreError)
    assert "missing" in str(info.value)
    assert "300ms" in str(info.value)


def test_wait_explicit_fractional_timeout(store: Store) -> None:
    start = time.monotonic()
    with pytest.raises(StoreTimeoutError, match="absent"):
        store.wait(["absent"], timedelta(milliseconds=150))
    assert 0.12 <= time.monotonic() - start < 2.0


def test_wait_timeout_zero_does_not_block(store: Store) -> None:
    store.set("here", b"1")
    store.wait(["here"], 0)
    start = time.monotonic()
    with pytest.raises(StoreTimeoutError):
        store.wait(["here", "not-here"], 0)
    assert time.monotonic() - start < 1.0


def test_default_timeout_zero_makes_get_non_blocking(store: Store) -> None:
    store.set("present", b"p")
    store.set_timeout(0)
    assert store.get("present") == b"p"
    start = time.monotonic()
    with pytest.raises(StoreTimeoutError):
        store.get("absent")
    assert time.monotonic() - start < 1.0


def test_wait_empty_list_returns(store: Store) -> None:
    store.wait([], 0)
    store.wait([])


@pytest.mark.parametrize("bad", [-1, -0.5, timedelta(seconds=-1), float("nan")])
def test_negative_timeouts_are_refused(store: Store, bad: object) -> None:
    with pytest.raises(ValueError, match="timeout"):
        store.set_timeout(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        store.wait(["k"], bad)  # type: ignore[arg-type]
    assert store.timeout == timedelta(seconds=5)


def test_wrong_timeout_type(store: Store) -> None:
    with pytest.raises(TypeError, match="timedelta"):
        store.set_timeout("5")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- waking
@pytest.mark.parametrize(
    "write",
    [
        lambda s: s.set("w", b"1"),
        lambda s: s.add("w", 1),
        lambda s: s.append("w", b"x"),
        lambda s: s.compare_set("w", b"", b"x"),
        lambda s: s.multi_set(["other", "w"], [b"1", b"2"]),
        lambda s: s.queue_push("w", b"item"),
    ],
    ids=["set", "add", "append", "compare_set", "multi_set", "queue_push"],
)
def test_writes_wake_waiters(store: Store, write: Callable[[Store], object]) -> None:
    waiter = store.clone()
    bg = Background(lambda: waiter.wait(["w"], 10))
    time.sleep(0.05)
    write(store)
    bg.result()
    assert bg.elapsed < 5.0  # woken by the write, not by the 10 s deadline


def test_get_blocks_until_set(store: Store) -> None:
    reader = store.clone()
    bg = Background(lambda: reader.get("later"))
    time.sleep(0.05)
    store.set("later", b"now")
    assert bg.result() == b"now"


def test_wait_for_several_keys_needs_all(store: Store) -> None:
    waiter = store.clone()
    store.set("a", b"1")
    bg = Background(lambda: waiter.wait(["a", "b", "c"], 10))
    store.set("b", b"1")
    time.sleep(0.05)
    assert not bg.done()  # still waiting for "c"
    store.set("c", b"1")
    bg.result()


def test_failed_compare_set_on_missing_key_wakes_nobody(store: Store) -> None:
    store.compare_set("cs", b"expected", b"desired")
    assert not store.check(["cs"])
    with pytest.raises(StoreTimeoutError):
        store.wait(["cs"], 0.1)


# --------------------------------------------------------------------------- add
def test_add_counts(store: Store) -> None:
    assert store.add("c", 5) == 5
    assert store.add("c", -7) == -2
    assert store.add("c", 0) == -2
    assert store.get("c") == b"-2"


def test_add_parses_like_strtoll(store: Store) -> None:
    store.set("ws", b" 12")
    assert store.add("ws", 1) == 13
    store.set("tail", b"12abc")
    assert store.add("tail", 1) == 13
    store.set("plus", b"+4")
    assert store.add("plus", 1) == 5


@pytest.mark.parametrize("raw", [b"abc", b"", b"-", b" x1"])
def test_add_on_non_integer_fails_and_keeps_value(store: Store, raw: bytes) -> None:
    store.set("n", raw)
    with pytest.raises(CounterError, match="n'") as info:
        store.add("n", 1)
    assert isinstance(info.value, ValueError)
    assert store.get("n") == raw
    store.set("after", b"ok")  # the store is still usable
    assert store.get("after") == b"ok"


def test_add_overflow(store: Store) -> None:
    assert store.add("big", 2**63 - 1) == 2**63 - 1
    with pytest.raises(CounterError, match="int64"):
        store.add("big", 1)
    assert store.get("big") == str(2**63 - 1).encode()
    with pytest.raises(CounterError, match="int64"):
        store.add("other", 2**63)
    store.set("huge", b"99999999999999999999")
    with pytest.raises(CounterError, match="int64"):
        store.add("huge", 1)


@pytest.mark.parametrize("amount", [1.5, "1", None, True])
def test_add_amount_type(store: Store, amount: object) -> None:
    with pytest.raises(TypeError, match="amount"):
        store.add("c", amount)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- append / cas
def test_append(store: Store) -> None:
    store.append("ap", b"a")
    store.append("ap", "b")
    store.append("ap", b"")
    assert store.get("ap") == b"ab"


def test_compare_set_truth_table(store: Store) -> None:
    # absent, expected empty: created, returns desired
    assert store.compare_set("k1", b"", b"d") == b"d"
    assert store.get("k1") == b"d"
    # absent, expected non-empty: nothing, returns expected
    assert store.compare_set("k2", b"e", b"d") == b"e"
    assert not store.check(["k2"])
    # present and equal: set, returns desired
    assert store.compare_set("k1", b"d", b"d2") == b"d2"
    assert store.get("k1") == b"d2"
    # present and different (also with empty expected): nothing, returns current
    assert store.compare_set("k1", b"zzz", b"d3") == b"d2"
    assert store.compare_set("k1", b"", b"d3") == b"d2"
    assert store.get("k1") == b"d2"


def test_compare_set_on_empty_value(store: Store) -> None:
    store.set("ev", b"")
    assert store.compare_set("ev", b"", b"x") == b"x"
    assert store.get("ev") == b"x"


# --------------------------------------------------------------------------- delete / check / keys
def test_delete_key_reports_truthfully(store: Store) -> None:
    store.set("d", b"1")
    assert store.delete_key("d") is True
    assert store.delete_key("d") is False
    assert store.delete_key("never") is False
    assert not store.check(["d"])
    with pytest.raises(StoreTimeoutError):
        store.wait(["d"], 0.05)


def test_check(store: Store) -> None:
    assert store.check([])
    store.set("x", b"1")
    assert store.check(["x"])
    assert not store.check(["x", "y"])


def test_num_keys_and_list_keys_are_exact(store: Store) -> None:
    # num_keys counts like torch: a fresh store holds only its internal keys (FileStore's
    # refcount/; PrefixStore counts its underlying store); list_keys holds only user keys.
    base = store.num_keys()
    assert base in (0, 1)
    assert store.list_keys() == []
    store.set("a", b"1")
    store.add("b", 1)
    store.set("c/d", b"2")
    store.queue_push("q", b"not a key")
    assert store.num_keys() == base + 3
    assert sorted(store.list_keys()) == ["a", "b", "c/d"]
    store.delete_key("a")
    assert store.num_keys() == base + 2


# --------------------------------------------------------------------------- multi
def test_multi_set_multi_get(store: Store) -> None:
    store.multi_set(["m1", "m2", "m3"], [b"1", "2", b""])
    assert store.multi_get(["m3", "m1", "m2"]) == [b"", b"1", b"2"]
    assert store.multi_get([]) == []


def test_multi_set_length_mismatch_writes_nothing(store: Store) -> None:
    with pytest.raises(ValueError, match="2 keys but 1 values"):
        store.multi_set(["x1", "x2"], [b"1"])
    assert not store.check(["x1"])


def test_multi_get_waits_for_missing_and_times_out(store: Store) -> None:
    store.set("g1", b"1")
    reader = store.clone()
    bg = Background(lambda: reader.multi_get(["g1", "g2"]))
    time.sleep(0.05)
    store.set("g2", b"2")
    assert bg.result() == [b"1", b"2"]
    store.set_timeout(0.1)
    with pytest.raises(StoreTimeoutError, match="g3"):
        store.multi_get(["g1", "g3"])


# --------------------------------------------------------------------------- queues
def test_queue_fifo(store: Store) -> None:
    assert store.queue_len("q") == 0
    for item in (b"1", b"2", b"3"):
        store.queue_push("q", item)
    assert store.queue_len("q") == 3
    assert [store.queue_pop("q") for _ in range(3)] == [b"1", b"2", b"3"]
    assert store.queue_len("q") == 0


def test_queue_pop_non_blocking_on_empty(store: Store) -> None:
    with pytest.raises(QueueEmptyError, match="q0"):
        store.queue_pop("q0", block=False)
    store.queue_push("q0", b"x")
    assert store.queue_pop("q0", block=False) == b"x"


def test_queue_pop_blocking_times_out(store: Store) -> None:
    store.set_timeout(0.2)
    start = time.monotonic()
    with pytest.raises(StoreTimeoutError, match="qt"):
        store.queue_pop("qt")
    assert 0.15 <= time.monotonic() - start < 2.0


def test_queue_pop_blocking_is_woken_by_push(store: Store) -> None:
    popper = store.clone()
    bg = Background(lambda: popper.queue_pop("qb"))
    time.sleep(0.05)
    store.queue_push("qb", b"item")
    assert bg.result() == b"item"


def test_queue_push_wakes_exactly_one_popper(store: Store) -> None:
    poppers = [store.clone(), store.clone()]
    for p in poppers:
        p.set_timeout(1.0)
    results: list[object] = []
    lock = threading.Lock()

    def pop(s: Store) -> None:
        try:
            value: object = s.queue_pop("q1")
        except StoreTimeoutError as exc:
            value = exc
        with lock:
            results.append(value)

    threads = [threading.Thread(target=pop, args=(p,)) for p in poppers]
    for t in threads:
        t.start()
    time.sleep(0.1)
    store.queue_push("q1", b"only")
    for t in threads:
        t.join(10)
    assert results.count(b"only") == 1
    assert sum(isinstance(r, StoreTimeoutError) for r in results) == 1
    assert store.queue_len("q1") == 0


def test_a_push_goes_to_the_popper_not_to_an_earlier_get(store: Store) -> None:
    """A blocked get of ``k`` (parked first) and a blocked queue_pop of ``k``: a push to
    ``k`` reaches the pop (a lost wake-up left both waiting while the queue held the
    item); the get still returns once a value is set."""
    getter, popper = store.clone(), store.clone()
    got = Background(lambda: getter.get("k"))
    time.sleep(0.05)
    popped = Background(lambda: popper.queue_pop("k"))
    time.sleep(0.05)
    store.queue_push("k", b"item")
    assert popped.result() == b"item"
    assert store.queue_len("k") == 0
    store.set("k", b"value")
    assert got.result() == b"value"


def test_queue_is_not_a_value_but_counts_for_check(store: Store) -> None:
    base = store.num_keys()
    store.queue_push("qv", b"1")
    assert store.check(["qv"])
    store.set_timeout(0.05)
    with pytest.raises(StoreTimeoutError):
        store.get("qv")
    assert store.num_keys() == base


# --------------------------------------------------------------------------- barrier
def _run_barrier(store: Store, key: str, n: int, timeout: float = 10) -> list[object]:
    clones = [store.clone() for _ in range(n)]
    tasks = [Background(lambda c=c: c.barrier(key, n, timeout)) for c in clones]  # type: ignore[misc]
    return [t.result() for t in tasks]


def test_barrier_releases_all(store: Store) -> None:
    assert _run_barrier(store, "b", 4) == [None] * 4


def test_barrier_blocks_until_world_size_and_times_out(store: Store) -> None:
    start = time.monotonic()
    with pytest.raises(StoreTimeoutError, match="barrier"):
        store.barrier("lonely", 2, timedelta(milliseconds=200))
    assert 0.15 <= time.monotonic() - start < 2.0


def test_barrier_reuse(store: Store) -> None:
    _run_barrier(store, "rb", 3)
    _run_barrier(store, "rb", 3)
    # The key is reusable: a third generation with a single arrival blocks.
    with pytest.raises(StoreTimeoutError):
        store.barrier("rb", 3, 0.1)


def test_barrier_world_size_one(store: Store) -> None:
    store.barrier("solo", 1, 0)
    store.barrier("solo", 1, 0)


def test_barrier_bad_world_size(store: Store) -> None:
    with pytest.raises(ValueError, match="world_size"):
        store.barrier("x", 0)


def test_ranked_barrier_timeout_lists_every_missing_rank(store: Store) -> None:
    # Ranks 0, 2 and 4 of 7 arrive (the first two in threads of their own), 1 3 5 6 never do.
    clones = {r: store.clone() for r in (0, 2)}
    waiting = [
        Background(lambda c=c, r=r: c.barrier("rk", 7, 2.0, rank=r))  # type: ignore[misc]
        for r, c in clones.items()
    ]
    deadline = time.monotonic() + 10
    while not (
        store.check(["rk/arrived_ranks"]) and store.get("rk/arrived_ranks").count(b"\n") == 2
    ):
        assert time.monotonic() < deadline, "the two threads did not arrive"
        time.sleep(0.01)
    with pytest.raises(StoreTimeoutError, match=r"4 of 7 ranks never arrived: 1, 3, 5, 6$"):
        store.barrier("rk", 7, 0.3, rank=4)
    for task in waiting:
        with pytest.raises(StoreTimeoutError, match=r"never arrived: 1, 3, 5, 6$"):
            task.result()


def test_ranked_barrier_reused_names_the_missing_of_its_generation(store: Store) -> None:
    clones = [store.clone() for _ in range(3)]
    tasks = [
        Background(lambda c=c, r=r: c.barrier("rg", 3, 10, rank=r))  # type: ignore[misc]
        for r, c in enumerate(clones)
    ]
    assert [t.result() for t in tasks] == [None] * 3
    # Second generation: only rank 1 comes.
    with pytest.raises(StoreTimeoutError, match=r"2 of 3 ranks never arrived: 0, 2$"):
        store.barrier("rg", 3, 0.1, rank=1)


def test_ranked_barrier_bad_rank(store: Store) -> None:
    with pytest.raises(ValueError, match=r"rank must be in 0\.\.1, got 2"):
        store.barrier("x", 2, 0, rank=2)
    with pytest.raises(TypeError, match="rank must be an int"):
        store.barrier("x", 2, 0, rank="1")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- clone / misc
def test_clone_shares_data(store: Store) -> None:
    other = store.clone()
    assert isinstance(other, Store)
    other.set("from-clone", b"1")
    assert store.get("from-clone") == b"1"
    assert other.timeout == store.timeout


def test_has_extended_api_is_bool(store: Store) -> None:
    assert isinstance(store.has_extended_api(), bool)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: s.set("k", 5), "bytes or str"),
        (lambda s: s.set(5, b"v"), "str"),
        (lambda s: s.get(None), "str"),
        (lambda s: s.wait("abc"), "list"),
        (lambda s: s.check("abc"), "list"),
        (lambda s: s.multi_get("ab"), "list"),
        (lambda s: s.compare_set("k", 1, b"x"), "bytes or str"),
        (lambda s: s.queue_pop("k", block="no"), "bool"),
    ],
)
def test_wrong_types_raise_type_error(
    store: Store, call: Callable[[Store], object], match: str
) -> None:
    base = store.num_keys()
    with pytest.raises(TypeError, match=match):
        call(store)
    assert store.num_keys() == base


def test_threads_hammering_add(store: Store) -> None:
    threads, per_thread = 8, 300
    clones = [store.clone() for _ in range(threads)]

    def hammer(s: Store) -> None:
        for _ in range(per_thread):
            s.add("hot", 1)

    workers = [threading.Thread(target=hammer, args=(c,)) for c in clones]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert store.add("hot", 0) == threads * per_thread


def test_queue_pop_waits_for_the_queue_not_a_value_of_the_same_name(store: Store) -> None:
    store.set("shared-name", b"value")
    store.set_timeout(0.1)
    with pytest.raises(StoreTimeoutError):
        store.queue_pop("shared-name")
    store.queue_push("shared-name", b"item")
    assert store.queue_pop("shared-name") == b"item"
    assert store.get("shared-name") == b"value"
