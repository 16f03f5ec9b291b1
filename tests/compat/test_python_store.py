"""Stores defined in Python the torch way (a ``Store`` subclass overriding only public
methods), wrapped by PrefixStore and used by the rendezvous handlers, in torch's test style:
the code below is what a torch user writes, with ``torch.distributed`` swapped for rdzv."""

from __future__ import annotations

import threading
import unittest
from datetime import timedelta
from typing import Any

from rdzv import HashStore, PrefixStore, Store
from rdzv.rendezvous.c10d import C10dRendezvousBackend
from rdzv.rendezvous.dynamic import DynamicRendezvousHandler, RendezvousTimeout


class DictStore(Store):
    """A thread-safe in-memory store written against the public API only."""

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[str, bytes] = {}
        self.calls: list[tuple[str, Any]] = []
        self._cv = threading.Condition()

    def set(self, key: Any, value: Any) -> None:
        assert isinstance(key, str) and isinstance(value, bytes), (key, value)
        with self._cv:
            self.data[key] = value
            self._cv.notify_all()

    def get(self, key: Any) -> bytes:
        with self._cv:
            if not self._cv.wait_for(lambda: key in self.data, self.timeout.total_seconds()):
                raise TimeoutError(f"wait timeout after {self.timeout}, keys: /{key}")
            return self.data[key]

    def add(self, key: Any, amount: int) -> int:
        with self._cv:
            value = int(self.data.get(key, b"0")) + amount
            self.data[key] = str(value).encode()
            self._cv.notify_all()
            return value

    def compare_set(self, key: Any, expected: Any, desired: Any) -> bytes:
        assert isinstance(expected, bytes) and isinstance(desired, bytes)
        with self._cv:
            current = self.data.get(key)
            if current is None:
                if expected == b"":
                    self.data[key] = desired
                    self._cv.notify_all()
                    return desired
                return bytes(expected)
            if current == expected:
                self.data[key] = desired
                self._cv.notify_all()
                return desired
            return current

    def check(self, keys: Any) -> bool:
        with self._cv:
            return all(k in self.data for k in keys)

    def wait(self, keys: Any, timeout: Any = None) -> None:
        seconds = (timeout or self.timeout).total_seconds()
        with self._cv:
            if not self._cv.wait_for(lambda: all(k in self.data for k in keys), seconds):
                raise TimeoutError(f"wait timeout, keys: {keys}")

    def delete_key(self, key: Any) -> bool:
        with self._cv:
            return self.data.pop(key, None) is not None

    def num_keys(self) -> int:
        with self._cv:
            return len(self.data)


class ExtendedStore(DictStore):
    """Also overrides the extended API, recording the calls PrefixStore makes."""

    def append(self, key: Any, value: Any) -> None:
        self.calls.append(("append", (key, value)))
        super().set(key, self.data.get(key, b"") + value)

    def multi_get(self, keys: Any) -> list[bytes]:
        self.calls.append(("multi_get", list(keys)))
        return [self.data[k] for k in keys]

    def multi_set(self, keys: Any, values: Any) -> None:
        self.calls.append(("multi_set", (list(keys), list(values))))
        for k, v in zip(keys, values, strict=True):
            super().set(k, v)

    def has_extended_api(self) -> bool:
        return True


class TestPythonStore(unittest.TestCase):
    def test_optional_methods_fail(self) -> None:
        class MyStore(Store):
            pass

        store = MyStore()
        self.assertFalse(store.has_extended_api())
        with self.assertRaisesRegex(RuntimeError, "Not implemented."):
            store.append("foo", "bar")
        with self.assertRaisesRegex(RuntimeError, "Not implemented."):
            store.multi_get(["foo", "bar"])
        with self.assertRaisesRegex(RuntimeError, "Not implemented."):
            store.multi_set(["foo", "bar"], [b"v", b"v"])
        with self.assertRaisesRegex(RuntimeError, "Not implemented."):
            store.clone()

    def test_has_extended_api_passthrough(self) -> None:
        class MyStore(Store):
            pass

        store = PrefixStore("p", MyStore())
        self.assertFalse(store.has_extended_api())
        with self.assertRaisesRegex(RuntimeError, "Not implemented."):
            store.append("foo", "bar")
        with self.assertRaisesRegex(RuntimeError, "Not implemented."):
            store.multi_get(["foo", "bar"])

    def test_has_extended_api_roundtrip(self) -> None:
        self.assertTrue(PrefixStore("p", ExtendedStore()).has_extended_api())

    def test_append_roundtrip(self) -> None:
        inner = ExtendedStore()
        PrefixStore("p", inner).append("foo", "bar")
        self.assertEqual(inner.calls, [("append", ("p/foo", b"bar"))])

    def test_multi_get_roundtrip(self) -> None:
        inner = ExtendedStore()
        inner.data.update({"p/foo": b"x", "p/bar": b"y"})
        self.assertEqual(PrefixStore("p", inner).multi_get(["foo", "bar"]), [b"x", b"y"])
        self.assertEqual(inner.calls, [("multi_get", ["p/foo", "p/bar"])])

    def test_multi_set_roundtrip(self) -> None:
        inner = ExtendedStore()
        PrefixStore("p", inner).multi_set(["foo", "bar"], [b"x", b"y"])
        self.assertEqual(inner.calls, [("multi_set", (["p/foo", "p/bar"], [b"x", b"y"]))])
        self.assertEqual(inner.data, {"p/foo": b"x", "p/bar": b"y"})

    def test_extended_methods_fallbacks(self) -> None:
        inner = DictStore()
        store = PrefixStore("p", inner)
        store.append("foo", b"po")
        store.append("foo", b"tato")
        self.assertEqual(store.get("foo"), b"potato")
        store.multi_set(["a", "b"], [b"1", b"2"])
        self.assertEqual(store.multi_get(["a", "b"]), [b"1", b"2"])
        self.assertEqual(inner.data["p/foo"], b"potato")

    def test_public_overrides_reached_through_prefix_store(self) -> None:
        inner = DictStore()
        store = PrefixStore("job", inner)
        store.set("k", "v")
        self.assertEqual(inner.data, {"job/k": b"v"})
        self.assertEqual(store.add("n", 5), 5)
        self.assertEqual(store.compare_set("k", b"v", b"w"), b"w")
        self.assertTrue(store.check(["k", "n"]))
        store.wait(["k"], timedelta(seconds=1))
        self.assertTrue(store.delete_key("k"))
        self.assertEqual(store.num_keys(), inner.num_keys())
        store.barrier("b", 1, timedelta(seconds=5))


class TestPythonStoreInRendezvous(unittest.TestCase):
    def _join_two(self, make: Any) -> list[Any]:
        handlers = [make() for _ in range(2)]
        results: list[Any] = [None, None]

        def run(i: int) -> None:
            results[i] = handlers[i].next_rendezvous()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for handler in handlers:
            handler.shutdown()
        return results

    def test_dynamic_handler_on_python_store(self) -> None:
        store = DictStore()
        timeout = RendezvousTimeout(join=20, last_call=10)
        results = self._join_two(
            lambda: DynamicRendezvousHandler(
                "run", store, 2, 2, local_addr="127.0.0.1", timeout=timeout
            )
        )
        self.assertEqual(sorted(r.rank for r in results), [0, 1])
        self.assertEqual({r.world_size for r in results}, {2})
        results[0].store.set("from0", b"x")
        self.assertEqual(results[1].store.get("from0"), b"x")

    def test_backend_handler_on_python_store(self) -> None:
        store = DictStore()
        backend = C10dRendezvousBackend(store, "run")
        timeout = RendezvousTimeout(join=20, last_call=10)
        results = self._join_two(
            lambda: DynamicRendezvousHandler.from_backend(
                "run", store, backend, 2, 2, local_addr="127.0.0.1", timeout=timeout
            )
        )
        self.assertEqual(sorted(r.rank for r in results), [0, 1])
        self.assertIs(results[0].store.underlying_store, store)
        self.assertIn("torch.rendezvous.run", store.data)

    def test_hash_store_still_uses_core(self) -> None:
        # Built-in stores implement the core: PrefixStore does not go through public calls.
        store = PrefixStore("p", HashStore())
        store.set("a", b"1")
        self.assertEqual(store.get("a"), b"1")
