"""torch's error sentences and counts, kept intact after an import swap (rdzv's detail
follows the sentence)."""

from __future__ import annotations

import socket
import tempfile
import unittest
from datetime import timedelta

from rdzv import FileStore, HashStore, PrefixStore, TCPStore
from rdzv.errors import NetworkError, StoreTimeoutError
from rdzv.rendezvous.api import RendezvousHandlerRegistry, RendezvousParameters
from tests.ports import reserved_port


class TimeoutTextTest(unittest.TestCase):
    def test_tcp_store_timeout_set(self) -> None:
        server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self.addCleanup(server.close)
        server.set_timeout(timedelta(seconds=0.1))
        with self.assertRaisesRegex(
            StoreTimeoutError, "wait timeout after 100ms, keys: /nonexistent key"
        ):
            server.get("nonexistent key")
        server.set("nonexistent key", b"now")  # the client stays usable
        self.assertEqual(server.get("nonexistent key"), b"now")

    def test_wait_lists_every_key(self) -> None:
        store = HashStore()
        with self.assertRaisesRegex(StoreTimeoutError, r"^wait timeout after 50ms, keys: /a, /b"):
            store.wait(["a", "b"], timedelta(milliseconds=50))

    def test_store_timeout_on_missing_clients(self) -> None:
        with self.assertRaisesRegex(
            StoreTimeoutError,
            r"Timed out after \d+ seconds waiting for clients. \d+/\d+ clients joined.",
        ) as info:
            TCPStore("127.0.0.1", 0, world_size=2, is_master=True, timeout=timedelta(seconds=1))
        self.assertRegex(str(info.exception), r"^Timed out after [0-9]+ seconds")  # whole s

    def test_address_already_in_use(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with self.assertRaisesRegex(
                NetworkError, f"^The server socket has failed to listen on any local .*{port}"
            ):
                TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)

    def test_unresolvable_host_fails_to_listen(self) -> None:
        with self.assertRaisesRegex(
            NetworkError,
            r"^The server socket has failed to listen on any local network address\.",
        ):
            TCPStore("dnsnotexist.invalid", 0, is_master=True, wait_for_workers=False)

    def test_registry_sentence_is_anchored(self) -> None:
        registry = RendezvousHandlerRegistry()
        params = RendezvousParameters("dummy", "", "run", 1, 1)
        with self.assertRaisesRegex(
            ValueError,
            r"^The rendezvous backend 'dummy' is not registered. Did you forget to call "
            r"`register`\?$",
        ):
            registry.create_handler(params)


class NumKeysTest(unittest.TestCase):
    """num_keys counts like torch: internal keys included, PrefixStore = underlying total."""

    def _set_get_check(self, store: object, num_keys_total: int) -> None:
        assert isinstance(store, (HashStore, FileStore, TCPStore, PrefixStore))
        store.add("key", 1)
        store.add("key", 2)
        store.add("key", 3)
        store.set("key0", "value0")
        store.add("key3", 1)
        store.set("key1", "value1")
        store.add("key3", 2)
        store.set("key2", "value2")
        store.add("key3", 3)
        store.add("key3", 4)
        store.add("key3", 5)
        store.add("key3", 6)
        self.assertEqual(store.num_keys(), num_keys_total)
        self.assertEqual(b"6", store.get("key"))
        self.assertEqual(b"21", store.get("key3"))
        store.set("-key3", "7")
        self.assertEqual(b"7", store.get("-key3"))
        store.delete_key("-key3")
        self.assertEqual(store.num_keys(), num_keys_total)

    def test_hash_store(self) -> None:
        self._set_get_check(HashStore(), 5)

    def test_file_store(self) -> None:
        with tempfile.NamedTemporaryFile(delete=False) as f:
            path = f.name
        store = FileStore(path, 1)
        self._set_get_check(store, 6)  # + refcount/
        prefixed = PrefixStore("test/", FileStore(path, 1))
        self.assertEqual(prefixed.num_keys(), 6)  # the whole underlying store
        store.close()

    def test_tcp_store(self) -> None:
        with reserved_port() as port:
            store = TCPStore("127.0.0.1", port, world_size=1, is_master=True)
            self.addCleanup(store.close)
            self._set_get_check(store, 6)  # + init/
            self.assertEqual(PrefixStore("p", store).num_keys(), 6)

    def test_numkeys_delkeys(self) -> None:
        store = TCPStore("127.0.0.1", 0, world_size=1, is_master=True)
        self.addCleanup(store.close)
        self.assertEqual(store.num_keys(), 1)  # init/
        store.add("key", 1)
        store.add("key", 2)
        store.add("key", 3)
        store.set("key0", "value0")
        store.add("key3", 1)
        store.set("key1", "value1")
        self.assertEqual(store.num_keys(), 5)
        store.delete_key("key")
        self.assertEqual(store.num_keys(), 4)
        store.set_timeout(timedelta(seconds=0.2))
        with self.assertRaises(RuntimeError):
            store.get("key")
        store.delete_key("key0")
        store.delete_key("key3")
        self.assertEqual(store.num_keys(), 2)
        store.set("key4", "value2")
        self.assertEqual(store.num_keys(), 3)
        self.assertEqual(sorted(store.list_keys()), ["key1", "key4"])
