"""FileStore: a store in one file, for the processes of one machine or of a shared filesystem.

The file is **torch's FileStore format**, so a ``torch.distributed.FileStore`` and an rdzv
:class:`FileStore` can work on the same file at the same time. It is an append-only log of
records, each ``u32 key_len, key, u32 value_len, value`` with native-endian lengths (what
torch writes; little-endian on x86 and ARM). The key says what a record means:

=============================  ==================================================  =========
key on disk                    meaning                                             written by
=============================  ==================================================  =========
``/`` + key                    the value of a user key (last record wins)          both
``-/`` + key (empty value)     tombstone: the key was deleted                      both
``refcount/``                  number of open handles on the file (decimal)        both
``cleanup/``                   number of handles closed so far (decimal)           both
``-rdzv/queue/push/`` + key    ``queue_push(key, value)``                          rdzv only
``-rdzv/queue/pop/`` + key     ``queue_pop(key)`` removed the queue's front item   rdzv only
=============================  ==================================================  =========

Queue records are an rdzv extension. torch reads any key starting with ``-`` as "delete the
rest of the key from the cache"; the rest (``rdzv/queue/...``) never names a key torch has,
so a torch FileStore replays queue records as no-ops: they are invisible to its ``get``,
``check``, ``num_keys`` and ``list_keys``, and torch's own queue calls still raise
NotImplementedError.

Concurrency: every operation takes an ``flock`` on the file, exclusive to append and shared
to read (torch takes the same locks), plus a per-object :class:`threading.Lock`. Each handle
keeps an in-memory replica of the log (an :class:`rdzv.engine.Engine`) and the byte offset
it has replayed up to; an operation replays only the new tail (a read of an unchanged file
costs one ``flock``/``fstat``/unlock). Writers replay the tail before appending, so they
never append after a damaged record.

Blocking calls (get, wait, multi_get, queue_pop, barrier) poll the file with a back-off
sleep (1 ms doubling to 50 ms): a blocked process uses almost no CPU, and a write is noticed
at most 50 ms late. Timeouts are exact to about a millisecond.

Files are created with mode 0600 (torch: 0644). A process that dies without :meth:`close`
leaves its handle counted in ``refcount/``, so the file is never removed and the next job on
the same path sees the old keys (as with torch); a process killed mid-write leaves at most one
incomplete record at the end, which every handle then reports (StoreError with the offset)
instead of appending after it. See ``docs/stores.md``.

POSIX only (it needs ``fcntl.flock``). Over NFS, ``flock`` works on Linux clients (emulated
with byte-range locks) but consult your server's locking support.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import TypeVar

from rdzv.engine import Engine, format_counter
from rdzv.errors import QueueEmptyError, StoreError
from rdzv.store.base import Deadline, Store, TimeoutLike

__all__ = ["FileStore"]

_log = logging.getLogger("rdzv.store.file")

T = TypeVar("T")

_LEN = struct.Struct("=I")  # torch writes uint32 lengths in native byte order
#: Largest key or value a record can hold (the uint32 length field).
MAX_RECORD_FIELD = 2**32 - 1

_USER = b"/"
_TOMBSTONE = b"-"
_QUEUE_PUSH = b"-rdzv/queue/push/"
_QUEUE_POP = b"-rdzv/queue/pop/"
_REFCOUNT = b"refcount/"
_CLEANUP = b"cleanup/"

#: Mode of a file FileStore creates (torch uses 0644): store contents are often secrets
#: (addresses, tokens), so only the owner may read them. An existing file keeps its mode.
FILE_MODE = 0o600

#: Polling back-off of blocking calls, in seconds: first sleep and ceiling.
POLL_INITIAL = 0.001
POLL_MAX = 0.05

_live_stores: weakref.WeakSet[FileStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_live_stores):
        store._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _record(key: bytes, value: bytes) -> bytes:
    """One log record; ValueError if a field does not fit the uint32 length."""
    if len(key) > MAX_RECORD_FIELD or len(value) > MAX_RECORD_FIELD:
        raise ValueError(
            f"FileStore: key {key[:64]!r} with a {len(value)}-byte value does not fit a record "
            f"(keys and values are limited to {MAX_RECORD_FIELD} bytes by the file format)"
        )
    return b"".join((_LEN.pack(len(key)), key, _LEN.pack(len(value)), value))


class FileStore(Store):
    """A store kept in the file ``file_name``, shared by every process that opens it.

    Same role and file format as ``torch.distributed.FileStore``; the two can share a file.

    Args:
        file_name: path of the store file (``str`` or path-like). The file is created (mode
            0600) if absent; its directory must exist. Kept as an absolute path, so a later
            ``chdir`` does not move the store.
        world_size: number of handles expected to use the file over the job, or ``-1`` (any
            negative value) for "unknown". With ``world_size >= 0`` the last :meth:`close`
            removes the file once ``world_size`` handles have been closed (torch's rule: the
            file goes when no handle is open and at least ``world_size`` were closed); with
            ``-1`` the file is never removed.
        timeout: default timeout of blocking calls (timedelta or seconds; default 300 s).

    Raises:
        TypeError: ``file_name`` is not a str/path-like or ``world_size`` not an int.
        ValueError: ``file_name`` is empty.
        StoreError: the file cannot be opened for reading and writing (directory missing,
            path is a directory or not a regular file, permission denied, ...), or its
            content is not a valid FileStore log. The message names the path.

    The constructor registers a handle in the file (``refcount/ += 1``); :meth:`close` (also
    run by ``with`` and, as a last resort, by the garbage collector) unregisters it. A
    process that dies without closing leaves its handle counted, so with ``world_size >= 0``
    the file is not removed and a later job on the same path sees the old keys: use a fresh
    path per job (or delete the file before the job starts).
    """

    def __init__(
        self,
        file_name: str | os.PathLike[str],
        world_size: int = -1,
        timeout: TimeoutLike | None = None,
    ) -> None:
        self._fd = -1
        self._closed = True  # until the file is open and our handle is registered
        if not isinstance(world_size, int) or isinstance(world_size, bool):
            raise TypeError(
                f"FileStore: world_size must be an int, got {type(world_size).__name__}: "
                f"{world_size!r}"
            )
        try:
            path = os.fspath(file_name)
        except TypeError:
            raise TypeError(
                f"FileStore: file_name must be a str or path-like, got "
                f"{type(file_name).__name__}: {file_name!r}"
            ) from None
        if not isinstance(path, str):
            raise TypeError(f"FileStore: file_name must be a str path, got bytes {path!r}")
        if not path:
            raise ValueError("FileStore: file_name must not be empty")
        super().__init__(timeout)
        self._path = os.path.abspath(path)
        self._world_size = world_size
        self._lock = threading.Lock()
        self._inherited = False  # True in a child process that got this object by fork()
        self._reset_replica()
        self._fd = self._open_registered()
        self._closed = False
        _live_stores.add(self)

    # ----------------------------------------------------------------- public extras
    @property
    def path(self) -> str:
        """The absolute path of the store file."""
        return self._path

    @property
    def world_size(self) -> int:
        """The ``world_size`` given to the constructor (``-1``: the file is never removed)."""
        return self._world_size

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def __repr__(self) -> str:
        return f"FileStore(path={self._path!r}, world_size={self._world_size})"

    def __enter__(self) -> FileStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # The garbage collector's close, as torch's destructor; never raise from here.
        # (try/except rather than contextlib.suppress: module globals may be gone at exit.)
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass

    def close(self) -> None:
        """Unregister this handle and release the file; idempotent.

        Adds 1 to ``cleanup/`` and -1 to ``refcount/`` (torch's destructor does the same),
        and removes the file when no handle is left open, ``world_size >= 0`` and at least
        ``world_size`` handles have been closed. Nothing is written if the file is gone or
        damaged (a warning is logged for the latter). A handle inherited through ``fork()``
        only closes its descriptor: the parent owns the registration. Later calls on a
        closed store raise :class:`~rdzv.errors.StoreError`.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _live_stores.discard(self)
            fd, self._fd = self._fd, -1
            if fd < 0:
                return
            try:
                if not self._inherited:
                    self._unregister(fd)
            finally:
                os.close(fd)

    def clone(self) -> FileStore:
        """A new handle on the same file with this handle's timeout and world size
        (registered in the file, like torch's clone)."""
        return FileStore(self._path, self._world_size, self._timeout)

    def has_extended_api(self) -> bool:
        """True: append, multi_get and multi_set are native (one lock, one write)."""
        return True

    # ----------------------------------------------------------------- opening
    def _open_registered(self) -> int:
        """Open (creating if needed) the file, replay it and add our handle to ``refcount/``.

        Retries when the file was unlinked between our ``open`` and our lock (a closing
        handle removed it), so we never register in a file that is already gone.
        """
        for _ in range(100):
            fd = self._open(os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                st = os.fstat(fd)
                if st.st_nlink == 0:
                    os.close(fd)
                    continue
                if not stat.S_ISREG(st.st_mode):
                    raise StoreError(
                        f"FileStore: {self._path!r} is not a regular file "
                        f"(mode {stat.filemode(st.st_mode)}); pass the path of a file"
                    )
                self._replay(fd, st.st_size)
                refs = self._internal.add(_REFCOUNT, 1)
                self._write_records(fd, [_record(_REFCOUNT, format_counter(refs))])
                fcntl.flock(fd, fcntl.LOCK_UN)
                return fd
            except BaseException:
                os.close(fd)
                raise
        raise StoreError(
            f"FileStore: {self._path!r} kept disappearing while being opened "
            "(another process removes it repeatedly)"
        )

    def _open(self, create: int) -> int:
        try:
            return os.open(self._path, os.O_RDWR | os.O_CLOEXEC | create, FILE_MODE)
        except OSError as exc:
            raise self._open_error(exc, creating=bool(create)) from exc

    def _open_error(self, exc: OSError, creating: bool) -> StoreError:
        path = self._path
        directory = os.path.dirname(path)
        if exc.errno == errno.ENOENT and not os.path.isdir(directory):
            why = (
                f"its directory {directory!r} does not exist; create it first "
                "(FileStore does not create directories)"
            )
        elif exc.errno == errno.ENOENT and creating:
            why = (
                f"the file system of {directory!r} does not let files be created there "
                f"({exc.strerror}); pick a path on an ordinary file system (e.g. under /tmp)"
            )
        elif exc.errno == errno.ENOENT:
            why = "the file does not exist any more (it was removed while this handle was open)"
        elif exc.errno == errno.ENOTDIR:
            why = "a component of its directory part is a file, not a directory"
        elif exc.errno == errno.EISDIR:
            why = "it is a directory; pass the path of a file (e.g. a name inside it)"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            why = (
                f"permission denied ({exc.strerror}): FileStore needs read and write access to "
                "the file, and write access to its directory to create it"
            )
        else:
            why = f"{exc.strerror} (errno {exc.errno})"
        return StoreError(f"FileStore: cannot open {path!r}: {why}")

    def _descriptor(self) -> int:
        """The open descriptor (reopened lazily in a forked child). Caller holds _lock."""
        if self._fd >= 0:
            return self._fd
        if self._closed:
            raise StoreError(f"{self!r} is closed; create a new FileStore to use the file")
        self._fd = self._open(0)
        return self._fd

    def _forget_after_fork(self) -> None:
        # In a fork()ed child: the descriptor and its flock state are shared with the parent,
        # and the lock may have been held by a parent thread that does not exist here.
        self._lock = threading.Lock()
        self._inherited = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _unregister(self, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            st = os.fstat(fd)
            if st.st_nlink == 0:
                return
            try:
                self._replay(fd, st.st_size)
            except StoreError as exc:
                _log.warning("not unregistering from a damaged store file: %s", exc)
                return
            finished = self._internal.add(_CLEANUP, 1)
            refs = self._internal.add(_REFCOUNT, -1)
            self._write_records(
                fd,
                [
                    _record(_CLEANUP, format_counter(finished)),
                    _record(_REFCOUNT, format_counter(refs)),
                ],
            )
            if refs == 0 and self._world_size >= 0 and finished >= self._world_size:
                self._remove_file(st)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _remove_file(self, st: os.stat_result) -> None:
        # Still under the exclusive lock, so no handle can register in between; and only if
        # the path still names our file.
        try:
            current = os.stat(self._path)
            if (current.st_dev, current.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(self._path)
                _log.debug("removed store file %s", self._path)
        except FileNotFoundError:
            pass

    # ----------------------------------------------------------------- the log
    def _reset_replica(self) -> None:
        self._engine = Engine()  # user keys (without "/") and queues
        self._internal = Engine()  # refcount/, cleanup/ and any other non-user key
        self._offset = 0  # bytes of the file replayed into the replica

    def _gone_error(self) -> StoreError:
        return StoreError(
            f"FileStore: {self._path!r} was removed while {self!r} was open (its last "
            "registered handle closed it, or another program deleted it); its keys are lost. "
            "Create a new FileStore to start over"
        )

    def _corrupt_error(self, offset: int, size: int, what: str) -> StoreError:
        return StoreError(
            f"FileStore: {self._path!r} is damaged at byte offset {offset} (file size {size}): "
            f"{what}. A process probably died while writing, or the file is not a FileStore "
            f"log. Nothing is written after the damage; to keep the intact records truncate "
            f"the file to {offset} bytes (truncate -s {offset} {self._path}), or remove it"
        )

    def _replay(self, fd: int, size: int) -> None:
        """Apply the records between the replayed offset and ``size``. Caller holds a flock.

        Raises StoreError if the file shrank or its tail is not a whole number of records;
        records before the damage are applied.
        """
        offset = self._offset
        if size == offset:
            return
        if size < offset:
            raise StoreError(
                f"FileStore: {self._path!r} shrank from {offset} to {size} bytes while open: "
                "another program truncated or rewrote it; its state is unknown. Remove the "
                "file and start over"
            )
        data = self._read(fd, offset, size - offset)
        n = len(data)
        pos = 0
        unpack = _LEN.unpack_from
        apply = self._apply
        try:
            while pos < n:
                if n - pos < 4:
                    raise self._corrupt_error(
                        offset + pos, size, f"{n - pos} stray bytes where a record should begin"
                    )
                (klen,) = unpack(data, pos)
                kend = pos + 4 + klen
                if kend + 4 > n:
                    raise self._corrupt_error(
                        offset + pos, size, f"a record announces a {klen}-byte key past the end"
                    )
                (vlen,) = unpack(data, kend)
                vend = kend + 4 + vlen
                if vend > n:
                    raise self._corrupt_error(
                        offset + pos, size, f"a record announces a {vlen}-byte value past the end"
                    )
                apply(data[pos + 4 : kend], data[kend + 4 : vend])
                pos = vend
        finally:
            self._offset = offset + pos

    def _read(self, fd: int, offset: int, count: int) -> bytes:
        chunks = []
        while count > 0:
            chunk = os.pread(fd, count, offset)
            if not chunk:
                break  # shorter than fstat said; the parser reports the damage
            chunks.append(chunk)
            offset += len(chunk)
            count -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _apply(self, key: bytes, value: bytes) -> None:
        """Apply one record to the replica (the same rules as torch's replay, plus queues)."""
        head = key[:1]
        if head == _USER:
            self._engine.set(key[1:], value)
        elif head == _TOMBSTONE:
            if key.startswith(_QUEUE_PUSH):
                self._engine.queue_push(key[len(_QUEUE_PUSH) :], value)
            elif key.startswith(_QUEUE_POP):
                self._engine.queue_pop(key[len(_QUEUE_POP) :])
            elif key[1:2] == _USER:
                self._engine.delete_key(key[2:])
            else:
                self._internal.delete_key(key[1:])
        else:
            self._internal.set(key, value)

    def _write_records(self, fd: int, records: list[bytes]) -> None:
        """Append records at the replayed end (caller holds the exclusive flock and has
        replayed to the end). On failure the file is cut back to where it was, the replica
        is dropped (the next call replays from scratch) and StoreError is raised."""
        start = self._offset
        data = records[0] if len(records) == 1 else b"".join(records)
        written = 0
        try:
            written = os.pwrite(fd, data, start)
            if written < len(data):  # short write: continue from where it stopped
                view = memoryview(data)
                while written < len(data):
                    written += os.pwrite(fd, view[written:], start + written)
        except OSError as exc:
            try:
                os.ftruncate(fd, start)
            except OSError:
                _log.exception("could not cut %s back to %d bytes", self._path, start)
            self._reset_replica()
            raise StoreError(
                f"FileStore: writing {len(data)} bytes to {self._path!r} failed: {exc.strerror}; "
                "the operation was not applied"
            ) from exc
        self._offset = start + written

    # ----------------------------------------------------------------- locked operations
    def _catch_up(self, fd: int) -> None:
        """Caller holds a flock: check that the file still exists, replay its new tail."""
        st = os.fstat(fd)
        if st.st_nlink == 0:
            raise self._gone_error()
        if st.st_size != self._offset:
            self._replay(fd, st.st_size)

    def _read_op(self, fn: Callable[[], T]) -> T:
        """Under the shared flock, replay the new tail (if any); then run ``fn`` on the
        replica. The flock is taken even when nothing changed: on NFS, taking a lock is what
        makes the client revalidate its cached size and data (torch does the same)."""
        with self._lock:
            fd = self._descriptor()
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                self._catch_up(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            return fn()

    def _write_op(self, fn: Callable[[], tuple[T, list[bytes]]]) -> T:
        """Under the exclusive flock: replay the tail, run ``fn`` (which updates the replica
        and returns its result and the records to append), append the records."""
        with self._lock:
            fd = self._descriptor()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                self._catch_up(fd)
                result, records = fn()
                if records:
                    self._write_records(fd, records)
                return result
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _poll(self, attempt: Callable[[], T | None], timeout: float, op: str, keys: list[str]) -> T:
        """Call ``attempt`` until it returns non-None, sleeping with back-off in between;
        StoreTimeoutError after ``timeout`` seconds (``0``: one attempt)."""
        deadline = Deadline(timeout)
        delay = POLL_INITIAL
        while True:
            result = attempt()
            if result is not None:
                return result
            remaining = deadline.remaining()
            if remaining <= 0:
                raise self._timeout_error(op, keys, timeout)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, POLL_MAX)

    # ----------------------------------------------------------------- core
    def _set(self, key: str, value: bytes) -> None:
        bkey = key.encode("utf-8")
        rec = _record(_USER + bkey, value)

        def op() -> tuple[None, list[bytes]]:
            self._engine.set(bkey, value)
            return None, [rec]

        self._write_op(op)

    def _get(self, key: str, timeout: float) -> bytes:
        bkey = key.encode("utf-8")
        return self._poll(
            lambda: self._read_op(lambda: self._engine.get(bkey)), timeout, "get", [key]
        )

    def _add(self, key: str, amount: int) -> int:
        bkey = key.encode("utf-8")

        def op() -> tuple[int, list[bytes]]:
            total = self._engine.add(bkey, amount)
            return total, [_record(_USER + bkey, format_counter(total))]

        return self._write_op(op)

    def _compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        bkey = key.encode("utf-8")
        rec = _record(_USER + bkey, desired)

        def op() -> tuple[bytes, list[bytes]]:
            current = self._engine.get(bkey)
            result = self._engine.compare_set(bkey, expected, desired)
            changed = current == expected if current is not None else not expected
            return result, [rec] if changed else []

        return self._write_op(op)

    def _check(self, keys: list[str]) -> bool:
        bkeys = [k.encode("utf-8") for k in keys]
        return self._read_op(lambda: self._engine.check(bkeys))

    def _wait(self, keys: list[str], timeout: float) -> None:
        bkeys = [k.encode("utf-8") for k in keys]
        self._poll(
            lambda: self._read_op(lambda: True if self._engine.check(bkeys) else None),
            timeout,
            "wait",
            keys,
        )

    def _delete_key(self, key: str) -> bool:
        bkey = key.encode("utf-8")

        def op() -> tuple[bool, list[bytes]]:
            existed = self._engine.delete_key(bkey)
            return existed, [_record(_TOMBSTONE + _USER + bkey, b"")] if existed else []

        return self._write_op(op)

    def _num_keys(self) -> int:
        # torch's count: the internal refcount/ and cleanup/ keys included.
        return self._read_op(lambda: self._engine.num_keys() + self._internal.num_keys())

    def _list_keys(self) -> list[str]:
        raw = self._read_op(self._engine.list_keys)
        return [k.decode("utf-8", "backslashreplace") for k in raw]

    # ----------------------------------------------------------------- extended API
    def _append(self, key: str, value: bytes) -> None:
        bkey = key.encode("utf-8")

        def op() -> tuple[None, list[bytes]]:
            old = self._engine.get(bkey)
            new = value if old is None else old + value
            rec = _record(_USER + bkey, new)
            self._engine.set(bkey, new)
            return None, [rec]

        self._write_op(op)

    def _multi_get(self, keys: list[str], timeout: float) -> list[bytes]:
        bkeys = [k.encode("utf-8") for k in keys]

        def attempt() -> list[bytes] | None:
            values = self._engine.multi_get(bkeys)
            return None if None in values else [v for v in values if v is not None]

        return self._poll(lambda: self._read_op(attempt), timeout, "multi_get", keys)

    def _multi_set(self, keys: list[str], values: list[bytes]) -> None:
        bkeys = [k.encode("utf-8") for k in keys]
        records = [_record(_USER + k, v) for k, v in zip(bkeys, values, strict=True)]

        def op() -> tuple[None, list[bytes]]:
            self._engine.multi_set(bkeys, values)
            return None, records

        self._write_op(op)

    # ----------------------------------------------------------------- queues
    def _queue_push(self, key: str, value: bytes) -> None:
        bkey = key.encode("utf-8")
        rec = _record(_QUEUE_PUSH + bkey, value)

        def op() -> tuple[None, list[bytes]]:
            self._engine.queue_push(bkey, value)
            return None, [rec]

        self._write_op(op)

    def _queue_pop(self, key: str, timeout: float | None) -> bytes:
        bkey = key.encode("utf-8")
        rec = _record(_QUEUE_POP + bkey, b"")

        def pop() -> tuple[bytes | None, list[bytes]]:
            value = self._engine.queue_pop(bkey)
            return value, [] if value is None else [rec]

        def attempt() -> bytes | None:
            # Look under the shared lock first: an empty queue needs no exclusive lock.
            if not self._read_op(lambda: self._engine.queue_len(bkey)):
                return None
            return self._write_op(pop)

        if timeout is None:
            value = attempt()
            if value is None:
                raise QueueEmptyError(f"queue_pop: queue {key!r} is empty on {self!r}")
            return value
        return self._poll(attempt, timeout, "queue_pop", [key])

    def _queue_len(self, key: str) -> int:
        bkey = key.encode("utf-8")
        return self._read_op(lambda: self._engine.queue_len(bkey))
