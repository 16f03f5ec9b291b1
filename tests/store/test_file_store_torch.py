"""Interop: an rdzv FileStore and torch 2.13's ``torch.distributed.FileStore`` on one file."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from rdzv.store.file import FileStore
from tests.store import filestore_util as util
from tests.store.filestore_util import last_value
from tests.store.test_contract import Background

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "store"


def torch_store(path: Path, world_size: int = -1) -> dist.FileStore:
    store = dist.FileStore(str(path), world_size)
    store.set_timeout(timedelta(seconds=10))
    return store


def test_torch_writes_rdzv_reads(path: Path) -> None:
    t = torch_store(path)
    t.set("a", "1")
    t.add("n", 5)
    t.set("d", "gone")
    t.delete_key("d")
    t.compare_set("c", "", "new")
    t.set("-dash", b"\x00\xff")
    t.set("ключ", "värde")
    with FileStore(path, timeout=5) as r:
        assert r.multi_get(["a", "n", "c", "-dash", "ключ"]) == [
            b"1",
            b"5",
            b"new",
            b"\x00\xff",
            "värde".encode(),
        ]
        assert not r.check(["d"])
        assert sorted(r.list_keys()) == sorted(["-dash", "a", "c", "n", "ключ"])
        assert r.num_keys() == 5 + 1  # refcount/ included, as torch counts
        assert r.add("n", 1) == 6
        assert t.get("n") == b"6"
    del t


def test_rdzv_writes_torch_reads(path: Path) -> None:
    with FileStore(path, timeout=5) as r:
        r.set("a", b"1")
        r.add("n", 41)
        r.add("n", 1)
        r.append("ap", b"po")
        r.append("ap", b"tato")
        r.multi_set(["m1", "m2"], [b"x", b"y"])
        r.set("d", b"1")
        assert r.delete_key("d")
        r.compare_set("c", b"", b"created")
        t = torch_store(path)
        assert t.get("a") == b"1"
        assert t.get("n") == b"42"
        assert t.get("ap") == b"potato"
        assert [t.get("m1"), t.get("m2")] == [b"x", b"y"]
        assert t.get("c") == b"created"
        assert not t.check(["d"])
        # torch counts its internal refcount/ key and shows it with the first byte cut off.
        assert t.num_keys() == 6 + 1
        assert set(t.list_keys()) == {"a", "n", "ap", "m1", "m2", "c", "efcount/"}
        assert t.add("n", 8) == 50
        assert r.get("n") == b"50"
        del t


def test_queue_records_are_invisible_to_torch(path: Path) -> None:
    with FileStore(path, timeout=5) as r:
        r.set("plain", b"1")
        t = torch_store(path)
        before = (t.num_keys(), sorted(t.list_keys()))
        r.queue_push("q", b"first")
        r.queue_push("q", b"second")
        assert r.queue_pop("q") == b"first"
        assert (t.num_keys(), sorted(t.list_keys())) == before
        assert not t.check(["q"])
        t.set("after", "2")  # torch appends after the queue records
        assert r.queue_len("q") == 1
        assert r.queue_pop("q") == b"second"
        assert r.get("after") == b"2"
        with pytest.raises(NotImplementedError):
            t.queue_push("q", "x")  # torch's FileStore still has no queues
        del t


def test_waits_released_across_implementations(path: Path) -> None:
    with FileStore(path, timeout=10) as r:
        t = torch_store(path)
        reader = r.clone()
        got = Background(lambda: reader.get("from-torch"))
        time.sleep(0.05)
        t.set("from-torch", "hello")
        assert got.result() == b"hello"

        t_waiter = t.clone()
        waited = Background(lambda: t_waiter.wait(["from-rdzv"], timedelta(seconds=10)))
        time.sleep(0.05)
        r.set("from-rdzv", b"hi")
        assert waited.result() is None
        assert waited.elapsed < 5  # released by the write, not by the 10 s timeout


@pytest.mark.parametrize("torch_closes_first", [True, False])
def test_refcount_shared_with_torch(path: Path, torch_closes_first: bool) -> None:
    t = torch_store(path, 2)
    r = FileStore(path, 2)
    assert last_value(path, b"refcount/") == b"2"
    if torch_closes_first:
        del t
        assert path.exists()
        r.close()
    else:
        r.close()
        assert path.exists()
        del t
    assert not path.exists()  # whichever closed last removed it


def test_counter_shared_by_torch_and_rdzv_processes(path: Path) -> None:
    times = 200
    FileStore(path).close()
    workers = [util.torch_add, util.torch_add, util.rdzv_add, util.rdzv_add]
    with util.spawn_pool(len(workers)) as pool:
        futures = [pool.submit(w, str(path), "shared", times, len(workers)) for w in workers]
        results = [f.result(timeout=100) for f in futures]
    seen = sorted(v for r in results for v in r)
    assert seen == list(range(1, len(workers) * times + 1))
    with FileStore(path) as r:
        assert r.add("shared", 0) == len(workers) * times
    t = torch_store(path)
    assert t.add("shared", 0) == len(workers) * times
    del t
