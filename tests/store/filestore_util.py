"""Helpers for the FileStore tests: the on-disk record format and worker functions that run
in spawned processes (module-level, so ``multiprocessing`` can import them by name)."""

from __future__ import annotations

import multiprocessing
import os
import struct
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from rdzv.store.file import FileStore

_LEN = struct.Struct("=I")


def record(key: bytes, value: bytes) -> bytes:
    """One record as torch writes it: u32 key_len, key, u32 value_len, value (native order)."""
    return _LEN.pack(len(key)) + key + _LEN.pack(len(value)) + value


def read_records(path: Path) -> list[tuple[bytes, bytes]]:
    """Parse a whole store file into (key, value) records; asserts it is well formed."""
    data = path.read_bytes()
    out = []
    pos = 0
    while pos < len(data):
        (klen,) = _LEN.unpack_from(data, pos)
        key = data[pos + 4 : pos + 4 + klen]
        pos += 4 + klen
        (vlen,) = _LEN.unpack_from(data, pos)
        value = data[pos + 4 : pos + 4 + vlen]
        pos += 4 + vlen
        assert len(value) == vlen, f"truncated record at the end of {path}"
        out.append((key, value))
    return out


def last_value(path: Path, key: bytes) -> bytes | None:
    """The value of the last record with ``key`` (e.g. ``b"refcount/"``), None if absent."""
    values = [v for k, v in read_records(path) if k == key]
    return values[-1] if values else None


@contextmanager
def spawn_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool that starts fresh interpreters (spawn) on this checkout's sources."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        yield pool


# ------------------------------------------------------------------ rdzv workers
def rdzv_add(path: str, key: str, times: int, parties: int) -> list[int]:
    """Meet ``parties`` processes at a barrier, then add 1 to ``key`` ``times`` times."""
    with FileStore(path, timeout=60) as store:
        store.barrier("start/" + key, parties)
        return [store.add(key, 1) for _ in range(times)]


def rdzv_wait_then_get(path: str, key: str) -> bytes:
    """Announce ``waiting/<key>``, then block in ``get(key)``."""
    with FileStore(path, timeout=60) as store:
        store.set("waiting/" + key, b"1")
        store.wait([key])
        return store.get(key)


def rdzv_pop_all(path: str, queue: str, stop: str) -> list[bytes]:
    """Pop from ``queue`` (blocking) until the item ``stop`` arrives; return what was popped."""
    out = []
    with FileStore(path, timeout=60) as store:
        while True:
            item = store.queue_pop(queue)
            if item == stop.encode():
                return out
            out.append(item)


def rdzv_open_close(path: str, world_size: int, key: str) -> None:
    """Open a handle, write ``key``, close it."""
    with FileStore(path, world_size) as store:
        store.set(key, b"1")


def rdzv_open_and_die(path: str, world_size: int) -> None:
    """Open a handle and exit the process without closing it (as a crash would)."""
    store = FileStore(path, world_size)
    store.set("died", b"1")
    sys.stdout.flush()
    os._exit(0)


# ------------------------------------------------------------------ torch workers
def torch_add(path: str, key: str, times: int, parties: int) -> list[int]:
    """As :func:`rdzv_add` but with ``torch.distributed.FileStore`` (torch's base-class
    barrier: add + set + wait)."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.FileStore(path, -1)
    store.set_timeout(timedelta(seconds=60))
    store.barrier("start/" + key, parties, timedelta(seconds=60))
    try:
        return [store.add(key, 1) for _ in range(times)]
    finally:
        del store
