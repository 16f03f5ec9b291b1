"""rdzv.interop.torch store adapters with real torch: C++ callers (PrefixStore, gloo process
groups across processes), error classes, timeouts, unwrapping. The full Store contract runs
through both adapters in tests/store (backend "torch-adapters")."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from rdzv import CounterError, HashStore, NetworkError, QueueEmptyError, StoreTimeoutError
from rdzv.interop.torch import StoreFromTorch, TorchStore, from_torch_store, to_torch_store
from tests.conftest import subprocess_env
from tests.ports import reserved_port


def test_torch_prefix_store_over_torch_store() -> None:
    inner = HashStore(timeout=5)
    adapter = TorchStore(inner)
    prefixed = dist.PrefixStore("job", adapter)  # C++ calls back into the adapter
    prefixed.set("a", "1")
    assert inner.get("job/a") == b"1"
    assert prefixed.get("a") == b"1"
    assert prefixed.add("n", 5) == 5
    assert prefixed.compare_set("a", "1", "2") == b"2"
    assert prefixed.compare_set("missing", "x", "y") == b"x"
    assert prefixed.check(["a", "n"]) and not prefixed.check(["a", "zz"])
    prefixed.wait(["a"], timedelta(seconds=1))
    prefixed.append("a", "3")
    assert prefixed.multi_get(["a", "n"]) == [b"23", b"5"]
    prefixed.multi_set(["x", "y"], ["1", "2"])
    assert inner.multi_get(["job/x", "job/y"]) == [b"1", b"2"]
    assert prefixed.delete_key("x") is True and prefixed.delete_key("x") is False
    assert prefixed.num_keys() == inner.num_keys() == 3
    assert prefixed.has_extended_api() is True
    twin = prefixed.clone()
    assert twin.get("a") == b"23"


def test_adapter_survives_when_only_torch_holds_it() -> None:
    inner = HashStore(timeout=5)
    prefixed = dist.PrefixStore("p", TorchStore(inner))  # no Python reference kept
    clone = prefixed.clone()  # the adapter's clone is created by C++ and dropped by Python
    gc.collect()
    prefixed.set("a", "1")
    clone.set("b", "2")
    assert inner.multi_get(["p/a", "p/b"]) == [b"1", b"2"]


def test_errors_are_torch_classes_through_cpp() -> None:
    adapter = TorchStore(HashStore(timeout=5))
    prefixed = dist.PrefixStore("p", adapter)
    with pytest.raises(dist.DistStoreError, match=r"wait timeout after 50ms.*p/nope"):
        prefixed.wait(["nope"], timedelta(milliseconds=50))
    adapter.set("p/text", "abc")
    with pytest.raises(ValueError):
        prefixed.add("text", 1)
    with pytest.raises(dist.QueueEmptyError, match="q"):
        adapter.queue_pop("q", block=False)


def test_python_store_scenario_of_torch() -> None:
    dist._test_python_store(TorchStore(HashStore(timeout=5)))


def test_torch_side_timeout_is_used_and_kept_separate() -> None:
    inner = HashStore(timeout=30)
    adapter = TorchStore(inner)
    assert adapter.timeout == timedelta(seconds=30)
    adapter.set_timeout(timedelta(milliseconds=100))  # what init_process_group does
    start = time.monotonic()
    with pytest.raises(dist.DistStoreError, match="wait timeout after 100ms, keys: /"):
        adapter.get("missing")
    assert time.monotonic() - start < 5
    with pytest.raises(dist.DistStoreError, match=r"wait timeout after 100ms, keys: /"):
        adapter.multi_get(["missing"])
    assert inner.timeout == timedelta(seconds=30)
    assert adapter.clone().timeout == timedelta(milliseconds=100)


def test_queues_list_keys_barrier() -> None:
    adapter = TorchStore(HashStore(timeout=5))
    adapter.queue_push("q", "a")
    adapter.queue_push("q", b"b")
    assert adapter.queue_len("q") == 2
    assert adapter.queue_pop("q") == b"a"
    assert adapter.queue_pop("q", block=False) == b"b"
    adapter.set("k", "v")
    assert adapter.list_keys() == ["k"]
    adapter.barrier("b", 1)


def test_store_from_torch_over_torch_tcp_store() -> None:
    server = dist.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=5), wait_for_workers=False)
    store = StoreFromTorch(server)
    assert store.timeout == timedelta(seconds=5)
    store.set("k", b"v")
    assert store.get("k") == b"v"
    assert server.get("k") == b"v"
    assert store.add("n", 2) == 2
    with pytest.raises(StoreTimeoutError, match=r"wait timeout after 50ms, keys: /missing"):
        store.wait(["missing"], 0.05)
    with pytest.raises(QueueEmptyError, match="queue_pop"):
        store.queue_pop("q", block=False)
    clone = store.clone()
    assert isinstance(clone, StoreFromTorch) and clone.get("k") == b"v"
    store.set_timeout(2)
    assert server.timeout == timedelta(seconds=2)


def test_store_from_torch_zero_timeout_does_not_block_on_torch_hash_store() -> None:
    # torch's HashStore reads a 0 timeout as "forever"; rdzv's 0 means "do not block".
    store = StoreFromTorch(dist.HashStore())
    store.set_timeout(0)
    with pytest.raises(StoreTimeoutError, match="wait timeout after 0ms"):
        store.get("missing")
    with pytest.raises(StoreTimeoutError):
        store.wait(["missing"], 0)
    store.set("k", b"1")
    assert store.get("k") == b"1"


def test_store_from_torch_counter_error() -> None:
    store = StoreFromTorch(dist.HashStore())
    store.set("k", b"abc")
    with pytest.raises(CounterError, match="'k'"):
        store.add("k", 1)


def test_store_from_torch_network_error() -> None:
    server = dist.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=5), wait_for_workers=False)
    client = StoreFromTorch(dist.TCPStore("127.0.0.1", server.port, 1, False, timedelta(seconds=2)))
    client.set("k", b"v")
    del server  # the server goes away
    with pytest.raises((NetworkError, StoreTimeoutError)):
        client.get("k2")


def test_to_and_from_torch_unwrap() -> None:
    inner = HashStore()
    adapter = to_torch_store(inner)
    assert isinstance(adapter, TorchStore) and adapter.rdzv_store is inner
    assert from_torch_store(adapter) is inner
    torch_store = dist.HashStore()
    wrapped = from_torch_store(torch_store)
    assert isinstance(wrapped, StoreFromTorch) and to_torch_store(wrapped) is torch_store


def test_constructor_type_checks() -> None:
    with pytest.raises(TypeError, match="TorchStore wraps an rdzv Store"):
        TorchStore(dist.HashStore())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"StoreFromTorch wraps a torch\.distributed\.Store"):
        StoreFromTorch(HashStore())


def _run_workers(args: list[list[str]]) -> list[dict[str, Any]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.interop.torch_worker", *a],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for a in args
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=100)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return sorted(results, key=lambda r: r["rank"])


def test_gloo_process_group_on_rdzv_file_store(tmp_path: Path) -> None:
    path = str(tmp_path / "pg-store")
    results = _run_workers([["file", path, str(rank), "2"] for rank in range(2)])
    assert [(r["rank"], r["world_size"], r["sum"]) for r in results] == [(0, 2, 3.0), (1, 2, 3.0)]


def test_gloo_process_group_on_rdzv_url_rendezvous() -> None:
    with reserved_port() as port:
        url = f"tcp://127.0.0.1:{port}?world_size=2"
        results = _run_workers([["url", f"{url}&rank={rank}"] for rank in range(2)])
    assert [(r["rank"], r["world_size"], r["sum"]) for r in results] == [(0, 2, 3.0), (1, 2, 3.0)]
