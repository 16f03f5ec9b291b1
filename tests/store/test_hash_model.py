"""Property test: HashStore against a model (a dict and a dict of lists) on random programs."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from rdzv import CounterError, HashStore, QueueEmptyError, StoreTimeoutError

KEYS = st.sampled_from(["a", "b", "c", "ключ", ""])
VALUES = st.sampled_from([b"", b"0", b"1", b" 7", b"-2", b"x", b"12abc", b"\xff"])
AMOUNTS = st.integers(min_value=-(2**62), max_value=2**62)


def model_counter(raw: bytes) -> int | None:
    text = raw.lstrip(b" \t\n\v\f\r")
    sign = b""
    if text[:1] in (b"+", b"-"):
        sign, text = text[:1], text[1:]
    digits = b""
    for ch in text:
        if not 48 <= ch <= 57:
            break
        digits += bytes([ch])
    return int(sign + digits) if digits else None


class HashStoreVsModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = HashStore(timeout=0)
        self.values: dict[str, bytes] = {}
        self.queues: dict[str, list[bytes]] = {}
        #: Keys the store keeps for itself, counted by num_keys as torch counts them.
        self.internal_keys = 0

    @rule(key=KEYS, value=VALUES)
    def set(self, key: str, value: bytes) -> None:
        self.store.set(key, value)
        self.values[key] = value

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        if key in self.values:
            assert self.store.get(key) == self.values[key]
        else:
            try:
                self.store.get(key)
            except StoreTimeoutError:
                pass
            else:
                raise AssertionError("get of an absent key must time out")

    @rule(key=KEYS, amount=AMOUNTS)
    def add(self, key: str, amount: int) -> None:
        old = self.values.get(key)
        base = 0 if old is None else model_counter(old)
        if base is None or not -(2**63) <= base + amount < 2**63:
            try:
                self.store.add(key, amount)
            except CounterError:
                return
            raise AssertionError("add must fail")
        assert self.store.add(key, amount) == base + amount
        self.values[key] = str(base + amount).encode()

    @rule(key=KEYS, value=VALUES)
    def append(self, key: str, value: bytes) -> None:
        self.store.append(key, value)
        self.values[key] = self.values.get(key, b"") + value

    @rule(key=KEYS, expected=VALUES, desired=VALUES)
    def compare_set(self, key: str, expected: bytes, desired: bytes) -> None:
        current = self.values.get(key)
        result = self.store.compare_set(key, expected, desired)
        if current is None:
            if expected:
                assert result == expected
            else:
                assert result == desired
                self.values[key] = desired
        elif current == expected:
            assert result == desired
            self.values[key] = desired
        else:
            assert result == current

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        assert self.store.delete_key(key) == (key in self.values)
        self.values.pop(key, None)

    @rule(keys=st.lists(KEYS, max_size=3))
    def check(self, keys: list[str]) -> None:
        expected = all(k in self.values or self.queues.get(k) for k in keys)
        assert self.store.check(keys) == expected

    @rule(key=KEYS, value=VALUES)
    def queue_push(self, key: str, value: bytes) -> None:
        self.store.queue_push(key, value)
        self.queues.setdefault(key, []).append(value)

    @rule(key=KEYS)
    def queue_pop(self, key: str) -> None:
        queue = self.queues.get(key)
        if queue:
            assert self.store.queue_pop(key, block=False) == queue.pop(0)
        else:
            try:
                self.store.queue_pop(key, block=False)
            except QueueEmptyError:
                return
            raise AssertionError("pop of an empty queue must raise")

    @invariant()
    def same_keys(self) -> None:
        assert sorted(self.store.list_keys()) == sorted(self.values)
        assert self.store.num_keys() == len(self.values) + self.internal_keys
        for key, queue in self.queues.items():
            assert self.store.queue_len(key) == len(queue)


HashStoreVsModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestHashStoreVsModel = HashStoreVsModel.TestCase
