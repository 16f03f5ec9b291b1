"""FileStore beyond the contract suite: the file format, several real processes, refcount
cleanup, fork, and every kind of bad file (each must give a clear error and lose nothing)."""

from __future__ import annotations

import multiprocessing
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rdzv import StoreError, StoreTimeoutError
from rdzv.store.file import FileStore
from tests.conftest import run_python, subprocess_env
from tests.store import filestore_util as util
from tests.store.filestore_util import last_value, read_records, record

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(path: Path) -> Iterator[FileStore]:
    with FileStore(path, timeout=5) as s:
        yield s


# --------------------------------------------------------------------------- format
def test_records_are_torch_layout(path: Path) -> None:
    store = FileStore(path, 2)
    store.set("k", "v")
    store.add("c", 3)
    # The example of the reference: torch writes exactly these bytes for the same calls.
    assert path.read_bytes() == (
        record(b"refcount/", b"1") + record(b"/k", b"v") + record(b"/c", b"3")
    )
    store.close()
    assert read_records(path)[-2:] == [(b"cleanup/", b"1"), (b"refcount/", b"0")]


def test_delete_writes_a_tombstone_only_for_existing_keys(store: FileStore, path: Path) -> None:
    store.set("-dash", b"1")  # a user key starting with "-" is "/-dash", not a tombstone
    size = path.stat().st_size
    assert store.delete_key("absent") is False
    assert path.stat().st_size == size
    assert store.delete_key("-dash") is True
    assert read_records(path)[-1] == (b"-/-dash", b"")


def test_queue_records(store: FileStore, path: Path) -> None:
    store.queue_push("q", b"a")
    store.queue_push("q", b"b")
    assert store.queue_pop("q") == b"a"
    assert read_records(path)[1:] == [
        (b"-rdzv/queue/push/q", b"a"),
        (b"-rdzv/queue/push/q", b"b"),
        (b"-rdzv/queue/pop/q", b""),
    ]
    other = FileStore(path)
    assert other.queue_len("q") == 1
    assert other.queue_pop("q", block=False) == b"b"
    assert store.queue_len("q") == 0
    other.close()


def test_internal_keys_never_listed(path: Path) -> None:
    first = FileStore(path)
    FileStore(path).close()  # writes cleanup/ and refcount/
    first.set("user", b"1")
    assert first.list_keys() == ["user"]
    assert first.num_keys() == 3  # torch's count: refcount/ and cleanup/ included
    first.close()


# --------------------------------------------------------------------------- files and paths
def test_new_file_is_private_and_existing_mode_is_kept(tmp_path: Path) -> None:
    created = tmp_path / "new"
    with FileStore(created):
        assert stat.S_IMODE(created.stat().st_mode) == 0o600
    shared = tmp_path / "shared"
    shared.touch()
    shared.chmod(0o644)
    with FileStore(shared):
        assert stat.S_IMODE(shared.stat().st_mode) == 0o644


def test_path_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with FileStore("relative.store") as store:
        assert store.path == str(tmp_path / "relative.store")
        monkeypatch.chdir("/")
        store.set("k", b"v")  # still the same file after chdir
        assert store.clone().get("k") == b"v"


def test_another_handle_replays_a_large_log(store: FileStore, path: Path) -> None:
    keys = [f"k{i}" for i in range(100_000)]
    store.multi_set(keys, [k.encode() for k in keys])
    store.set("big", b"x" * (6 << 20))
    with FileStore(path) as reader:
        assert reader.num_keys() == 100_001 + 1  # + refcount/, as torch counts
        assert reader.get("k99999") == b"k99999"
        assert len(reader.get("big")) == 6 << 20


# --------------------------------------------------------------------------- timing behaviour
def test_sub_second_timeout_is_exact(store: FileStore) -> None:
    start = time.monotonic()
    with pytest.raises(StoreTimeoutError, match="120ms"):
        store.wait(["never"], 0.12)
    # torch's FileStore rounds to whole seconds: it would take > 1 s here.
    assert 0.11 <= time.monotonic() - start < 0.6


def test_blocked_wait_does_not_spin(store: FileStore) -> None:
    cpu = time.thread_time()
    with pytest.raises(StoreTimeoutError):
        store.wait(["never"], 1.0)
    # Polling with back-off: a few dozen fstat calls, not a busy loop (which would use ~1 s).
    assert time.thread_time() - cpu < 0.2


# --------------------------------------------------------------------------- several processes
def test_processes_adding_to_one_counter(path: Path) -> None:
    parties, times = 4, 300
    FileStore(path).close()  # create the file before the workers race to it
    with util.spawn_pool(parties) as pool:
        futures = [
            pool.submit(util.rdzv_add, str(path), "counter", times, parties) for _ in range(parties)
        ]
        results = [f.result(timeout=90) for f in futures]
    seen = sorted(v for r in results for v in r)
    assert seen == list(range(1, parties * times + 1))  # every add returned a distinct value
    for r in results:
        assert r == sorted(r)
    with FileStore(path) as store:
        assert store.add("counter", 0) == parties * times


def test_wait_released_by_another_process(store: FileStore, path: Path) -> None:
    with util.spawn_pool(1) as pool:
        future = pool.submit(util.rdzv_wait_then_get, str(path), "go")
        store.set_timeout(60)
        store.wait(["waiting/go"])
        time.sleep(0.1)  # let the worker block in wait (the assertions hold either way)
        assert not future.done()
        store.set("go", b"released")
        assert future.result(timeout=60) == b"released"


def test_queue_shared_by_processes_loses_and_duplicates_nothing(
    store: FileStore, path: Path
) -> None:
    items = [str(i).encode() for i in range(200)]
    with util.spawn_pool(2) as pool:
        futures = [pool.submit(util.rdzv_pop_all, str(path), "jobs", "stop") for _ in range(2)]
        for item in items:
            store.queue_push("jobs", item)
        store.queue_push("jobs", b"stop")
        store.queue_push("jobs", b"stop")
        popped = [f.result(timeout=60) for f in futures]
    assert sorted(popped[0] + popped[1], key=int) == items
    for part in popped:
        assert part == sorted(part, key=int)  # FIFO as seen by each consumer
    assert store.queue_len("jobs") == 0


def test_file_removed_after_last_close_with_world_size(path: Path) -> None:
    parent = FileStore(path, 2)
    with util.spawn_pool(1) as pool:
        pool.submit(util.rdzv_open_close, str(path), 2, "child").result(timeout=60)
    assert path.exists()  # one handle closed, the parent's is open
    assert parent.get("child") == b"1"
    parent.close()
    assert not path.exists()  # refcount 0 and 2 closes >= world_size 2
    with FileStore(path) as fresh:  # a new store on the path starts empty
        assert fresh.list_keys() == []
        assert fresh.num_keys() == 1  # its own refcount/ only


def test_file_kept_with_unknown_world_size(path: Path) -> None:
    parent = FileStore(path)
    with util.spawn_pool(1) as pool:
        pool.submit(util.rdzv_open_close, str(path), -1, "child").result(timeout=60)
    parent.close()
    assert path.exists()
    with FileStore(path) as later:
        assert later.get("child") == b"1"  # stale keys survive: use a fresh path per job


def test_file_kept_when_world_size_not_reached(path: Path) -> None:
    FileStore(path, 3).close()
    FileStore(path, 3).close()
    assert path.exists()  # 2 closes < world_size 3
    FileStore(path, 3).close()
    assert not path.exists()


def test_clone_counts_as_a_handle(path: Path) -> None:
    store = FileStore(path, 1)
    twin = store.clone()
    assert last_value(path, b"refcount/") == b"2"
    store.close()
    assert path.exists()
    twin.set("k", b"v")
    twin.close()
    assert not path.exists()


def test_process_dying_without_close_keeps_the_file(path: Path) -> None:
    store = FileStore(path, 1)
    with util.spawn_pool(1) as pool:
        pool.submit(util.rdzv_open_and_die, str(path), 1).exception(timeout=60)
    store.close()
    # The dead handle is still counted: the file and its keys stay for the next job.
    assert path.exists()
    assert last_value(path, b"refcount/") == b"1"
    with FileStore(path) as later:
        assert later.get("died") == b"1"


def _forked_child(store: FileStore) -> None:
    store.set("from-child", str(os.getpid()))
    store.close()  # an inherited handle closes only its descriptor


def test_handle_inherited_by_fork(path: Path) -> None:
    store = FileStore(path, 1, timeout=5)
    child = multiprocessing.get_context("fork").Process(target=_forked_child, args=(store,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert store.get("from-child") == str(child.pid).encode()
    assert last_value(path, b"refcount/") == b"1"  # the child did not unregister us
    store.close()
    assert not path.exists()


def test_write_failure_cuts_the_file_back(path: Path) -> None:
    # In a child with a 64 KiB file-size limit, a 1 MiB write fails half-way (EFBIG).
    script = textwrap.dedent(
        f"""
        import resource, signal, os
        from rdzv import StoreError
        from rdzv.store.file import FileStore
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        store = FileStore({str(path)!r})
        store.set("small", b"1")
        size = os.path.getsize({str(path)!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        try:
            store.set("big", b"x" * (1 << 20))
        except StoreError as exc:
            assert {str(path)!r} in str(exc), exc
        else:
            raise SystemExit("no error")
        assert os.path.getsize({str(path)!r}) == size
        store.set("after", b"2")
        assert store.get("small") == b"1" and not store.check(["big"])
        print("ok")
        """
    )
    out = run_python(script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    with FileStore(path) as store:
        assert store.multi_get(["small", "after"]) == [b"1", b"2"]
        assert not store.check(["big"])


# --------------------------------------------------------------------------- bad input
def test_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory") as info:
        FileStore(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_directory_fails_fast(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    start = time.monotonic()
    with pytest.raises(StoreError, match="does not exist") as info:
        FileStore(missing / "store", timeout=300)
    assert time.monotonic() - start < 5  # torch waits for the whole 300 s timeout
    assert str(missing) in str(info.value)
    assert not missing.exists()


def test_directory_part_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"")
    with pytest.raises(StoreError, match="not a directory") as info:
        FileStore(tmp_path / "plain" / "store")
    assert str(tmp_path / "plain" / "store") in str(info.value)


def test_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(StoreError, match="not a regular file"):
        FileStore(fifo)


@pytest.mark.parametrize("bad", [None, 5, b"bytes-path"])
def test_file_name_type(bad: object) -> None:
    with pytest.raises(TypeError, match="file_name"):
        FileStore(bad)  # type: ignore[arg-type]


def test_bad_world_size_and_empty_path(path: Path) -> None:
    with pytest.raises(TypeError, match="world_size"):
        FileStore(path, "2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        FileStore("")
    assert not path.exists()


_UNWRITABLE_CHECK = """
import os, sys
from rdzv import StoreError
from rdzv.store.file import FileStore
if os.geteuid() == 0:  # root ignores file modes: become "nobody" (after the imports)
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
try:
    FileStore(sys.argv[1])
except StoreError as exc:
    print(exc)
else:
    print("opened")
"""


def _open_as_unprivileged(path: Path) -> str:
    """Try to open ``path`` as a user without write permission; return the message.

    Root ignores file modes, so a child run as root drops to ``nobody`` before trying (the
    interpreter lives under /root, which nobody cannot read, hence not ``user=``)."""
    out = subprocess.run(
        [sys.executable, "-c", _UNWRITABLE_CHECK, str(path)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    # pytest's tmp_path lives under a 0700 directory that ``nobody`` cannot enter.
    with tempfile.TemporaryDirectory(prefix="rdzv-perm-") as tmp:
        os.chmod(tmp, 0o755)
        yield Path(tmp)


def test_unwritable_file(world_readable_dir: Path) -> None:
    target = world_readable_dir / "store"
    with FileStore(target) as store:
        store.set("k", b"v")
    target.chmod(0o444)
    message = _open_as_unprivileged(target)
    assert "permission denied" in message
    assert str(target) in message
    target.chmod(0o600)
    with FileStore(target) as store:  # nothing was lost or written
        assert store.get("k") == b"v"


def test_unwritable_directory(world_readable_dir: Path) -> None:
    locked = world_readable_dir / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    message = _open_as_unprivileged(locked / "store")
    assert "permission denied" in message
    assert str(locked / "store") in message
    assert not (locked / "store").exists()


# --------------------------------------------------------------------------- damaged files
def _filled(path: Path) -> int:
    with FileStore(path) as store:
        store.set("a", b"1")
        store.add("n", 5)
    return path.stat().st_size


@pytest.mark.parametrize(
    ("tail", "what"),
    [
        (b"\x05\x00", "stray bytes"),
        (record(b"/half", b"value")[:-2], "value past the end"),
        (b"\xff\xff\xff\xff" + b"x" * 10, "key past the end"),
    ],
    ids=["stray", "truncated-value", "huge-length"],
)
def test_damaged_tail_is_reported_with_path_and_offset(path: Path, tail: bytes, what: str) -> None:
    intact = _filled(path)
    with path.open("ab") as f:
        f.write(tail)
    with pytest.raises(StoreError, match=what) as info:
        FileStore(path)
    message = str(info.value)
    assert str(path) in message
    assert f"offset {intact}" in message
    assert f"truncate -s {intact}" in message
    assert path.stat().st_size == intact + len(tail)  # nothing written after the damage
    os.truncate(path, intact)  # the documented recovery keeps every intact record
    with FileStore(path) as store:
        assert store.multi_get(["a", "n"]) == [b"1", b"5"]


def test_damage_seen_by_an_open_handle(path: Path) -> None:
    store = FileStore(path, timeout=0.2)
    store.set("a", b"1")
    intact = path.stat().st_size
    with path.open("ab") as f:
        f.write(record(b"/b", b"2") + record(b"/c", b"3")[:5])
    for call in (
        lambda: store.get("a"),
        lambda: store.set("x", b"1"),
        lambda: store.add("n", 1),
        lambda: store.delete_key("a"),
        lambda: store.queue_push("q", b"1"),
    ):
        with pytest.raises(StoreError, match=f"offset {intact + len(record(b'/b', b'2'))}"):
            call()
    # Records before the damage were applied; nothing was appended after it.
    assert path.stat().st_size == intact + len(record(b"/b", b"2")) + 5
    os.truncate(path, intact + len(record(b"/b", b"2")))
    assert store.multi_get(["a", "b"]) == [b"1", b"2"]
    store.close()


def test_file_shrunk_under_an_open_handle(store: FileStore, path: Path) -> None:
    store.set("a", b"1")
    os.truncate(path, 4)
    with pytest.raises(StoreError, match="shrank"):
        store.check(["a"])


def test_file_removed_under_an_open_handle(store: FileStore, path: Path) -> None:
    store.set("a", b"1")
    path.unlink()
    with pytest.raises(StoreError, match="was removed"):
        store.get("a")
    with pytest.raises(StoreError, match="was removed"):
        store.set("b", b"2")
    store.close()  # nothing to unregister from; no error
    assert not path.exists()


def test_closed_store_refuses_calls(path: Path) -> None:
    store = FileStore(path)
    store.close()
    store.close()  # idempotent
    assert store.closed
    with pytest.raises(StoreError, match="closed"):
        store.set("k", b"v")
    assert last_value(path, b"refcount/") == b"0"
