"""``get(key, timeout=None)`` and ``multi_get(keys, timeout=None)`` are public: a per-call
timeout overrides the store's, torch's one-argument calls keep working, and a store defined
in Python the torch way (overriding ``get(key)`` only) still works under callers that pass a
timeout."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from rdzv import HashStore, PrefixStore, Store
from rdzv.errors import StoreTimeoutError
from rdzv.server import ServerThread
from rdzv.store.tcp import TCPStore
from tests.store.backends import async_tcp_store


@pytest.fixture(params=["hash", "tcp"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "hash":
        yield HashStore()
        return
    server = ServerThread().start()
    client = TCPStore("127.0.0.1", server.port, timeout=30)
    try:
        yield client
    finally:
        client.close()
        server.stop()


def test_a_per_call_timeout_overrides_the_store_timeout(store: Store) -> None:
    store.set_timeout(30)
    with pytest.raises(StoreTimeoutError):
        store.get("absent", timeout=0.05)
    with pytest.raises(StoreTimeoutError):
        store.multi_get(["absent", "also"], timedelta(milliseconds=50))
    store.set("k", b"v")
    assert store.get("k") == b"v"
    assert store.get("k", 0) == b"v"
    assert store.multi_get(["k"]) == [b"v"]
    assert store.multi_get(["k", "k"], timeout=1) == [b"v", b"v"]
    assert store.multi_get([], timeout=0) == []


def test_the_async_client_takes_a_per_call_multi_get_timeout(tmp_path: Path) -> None:
    with async_tcp_store(tmp_path) as store:  # its own timeout: 5 s
        started = time.monotonic()
        with pytest.raises(StoreTimeoutError):
            store.multi_get(["absent", "also"], timeout=0)
        with pytest.raises(StoreTimeoutError):
            store.multi_get(["absent"], timeout=timedelta(milliseconds=50))
        assert time.monotonic() - started < 4
        store.set("k", b"v")
        assert store.multi_get(["k", "k"], timeout=0) == [b"v", b"v"]
        assert store.multi_get(["k"]) == [b"v"]


def test_a_bad_timeout_is_refused(store: Store) -> None:
    with pytest.raises(TypeError, match="timeout must be"):
        store.get("k", timeout="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.multi_get(["k"], timeout=-1)


class TorchStyle(Store):
    """Overrides the public get/set only, with torch's one-argument get."""

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[str, bytes] = {}

    def set(self, key: Any, value: Any) -> None:
        self.data[key] = value

    def get(self, key: Any) -> bytes:
        if key not in self.data:
            raise StoreTimeoutError(f"no {key}")
        return self.data[key]


def test_a_torch_style_override_accepts_the_timeout_argument() -> None:
    inner = TorchStyle()
    view = PrefixStore("p", inner)
    view.set("k", b"v")
    assert inner.data == {"p/k": b"v"}
    assert view.get("k", timeout=5) == b"v"
    assert view.multi_get(["k"], timeout=5) == [b"v"]
    assert inner.get("p/k", 1) == b"v"
    with pytest.raises(StoreTimeoutError):
        view.get("absent", timeout=0)
