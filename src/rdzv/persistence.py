"""Durability for the store server: an append-only log of engine changes plus snapshots.

``rdzv serve --data-dir DIR`` attaches a :class:`DurableJournal` to the server's
:class:`~rdzv.engine.Engine`. Every state change becomes one record in ``DIR/log-<gen>.rdzv``;
:meth:`DurableJournal.commit` writes the buffered records to the file (and fsyncs them,
according to the policy) and the server calls it **before** it sends any reply, so a write
whose effect a client could have observed is on disk first. Every ``snapshot_bytes`` of log,
the whole state is written to ``DIR/snapshot-<gen>.rdzv`` (temporary file, fsync, rename) and a
new, empty log generation starts; older files are removed.

Record format (little-endian)::

    u32 crc32(payload) | u32 len(payload) | payload
    payload = u8 op | u32 len(key) | key [| u32 len(value) | value]

with ``op`` one of SET (1), APPEND (2), DELETE (3), QUEUE_PUSH (4), QUEUE_POP (5),
VOLATILE (6, no value). Counters, barriers and compare_set are logged as the SET of their
result, so replay is deterministic. VOLATILE follows the SET of a connection-bound
(``set_ephemeral``) or leased (``set_lease``) key: such a key does not survive a restart
(its connection is gone, its lease clock was the dead server's); any later SET, APPEND or
DELETE of the key makes it ordinary again. A snapshot is a header (magic ``RDZVSNP1``)
followed by SET, QUEUE_PUSH and VOLATILE records of the same format.

Recovery (:func:`recover`) loads the newest snapshot whose checksums verify, then replays its
log generation. A record cut short or failing its checksum at the *end* of the log is a write
that was torn by a crash before it was acknowledged: it is dropped and the file truncated
there. Corruption in the middle of a log (a valid record follows) raises
:class:`~rdzv.errors.StoreError` naming the file and offset: the operator decides.

fsync policies: ``always`` (fsync at every commit: survives power loss), ``interval``
(fsync at most every ``fsync_interval`` seconds: survives a killed server, may lose the last
interval on power loss), ``never`` (leave it to the OS).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from rdzv.engine import Engine
from rdzv.errors import StoreError
from rdzv.stats import FSYNC_BUCKETS, Histogram

__all__ = ["FSYNC_POLICIES", "DurableJournal", "recover"]

_log = logging.getLogger("rdzv.persistence")

FSYNC_POLICIES = ("always", "interval", "never")

_SET, _APPEND, _DELETE, _QPUSH, _QPOP, _VOLATILE = 1, 2, 3, 4, 5, 6
_OPS_WITH_VALUE = (_SET, _APPEND, _QPUSH)
_HEAD = struct.Struct("<II")
_LEN = struct.Struct("<I")
_SNAPSHOT_MAGIC = b"RDZVSNP1"
_FILE = re.compile(r"^(log|snapshot)-(\d{10})\.rdzv$")


def _record(op: int, key: bytes, value: bytes | None = None) -> bytes:
    payload = bytes((op,)) + _LEN.pack(len(key)) + key
    if value is not None:
        payload += _LEN.pack(len(value)) + value
    return _HEAD.pack(zlib.crc32(payload), len(payload)) + payload


def _parse_payload(payload: bytes) -> tuple[int, bytes, bytes | None]:
    op = payload[0]
    (klen,) = _LEN.unpack_from(payload, 1)
    key = payload[5 : 5 + klen]
    if len(key) != klen:
        raise ValueError("key runs past the record")
    if op not in _OPS_WITH_VALUE:
        if 5 + klen != len(payload) or op not in (_DELETE, _QPOP, _VOLATILE):
            raise ValueError(f"bad record (op {op})")
        return op, key, None
    at = 5 + klen
    (vlen,) = _LEN.unpack_from(payload, at)
    value = payload[at + 4 : at + 4 + vlen]
    if len(value) != vlen or at + 4 + vlen != len(payload):
        raise ValueError("value does not fill the record")
    return op, key, value


def _records(data: bytes, path: Path) -> Iterator[tuple[int, int, bytes, bytes | None]]:
    """Yield ``(end_offset, op, key, value)``; stops silently at a torn tail, raises
    StoreError on corruption followed by more data."""
    at, n = 0, len(data)
    while at < n:
        problem = None
        if n - at < _HEAD.size:
            problem = "a record header is cut short"
        else:
            crc, length = _HEAD.unpack_from(data, at)
            end = at + _HEAD.size + length
            payload = data[at + _HEAD.size : end]
            if end > n:
                problem = "a record is cut short"
            elif zlib.crc32(payload) != crc:
                problem = "a record fails its checksum"
            else:
                try:
                    op, key, value = _parse_payload(payload)
                except (ValueError, struct.error, IndexError) as exc:
                    problem = f"a record is malformed ({exc})"
        if problem is not None:
            if _looks_like_torn_tail(data, at):
                _log.warning("%s: dropping a torn last record at offset %d (%s)", path, at, problem)
                return
            raise StoreError(
                f"durable store {path} is corrupt at offset {at}: {problem}, and valid data "
                "follows; restore the data directory from a backup or remove the file to "
                "start from the last snapshot"
            )
        yield end, op, key, value
        at = end


def _looks_like_torn_tail(data: bytes, at: int) -> bool:
    # A torn write only ever damages the last record; if a valid record header with a
    # matching checksum starts anywhere after `at`, the damage is in the middle.
    probe = at + 1
    n = len(data)
    while probe + _HEAD.size <= n:
        crc, length = _HEAD.unpack_from(data, probe)
        end = probe + _HEAD.size + length
        if length > 0 and end <= n and zlib.crc32(data[probe + _HEAD.size : end]) == crc:
            return False
        probe += 1
    return True


def _apply(engine: Engine, op: int, key: bytes, value: bytes | None, volatile: set[bytes]) -> None:
    if op == _VOLATILE:
        volatile.add(key)
        return
    if op in (_SET, _APPEND, _DELETE):
        volatile.discard(key)
    if op == _SET and value is not None:
        engine.apply_set(key, value)
    elif op == _APPEND and value is not None:
        engine.apply_append(key, value)
    elif op == _DELETE:
        engine.apply_delete(key)
    elif op == _QPUSH and value is not None:
        engine.apply_queue_push(key, value)
    elif op == _QPOP:
        engine.apply_queue_pop(key)


def _generations(data_dir: Path, kind: str) -> list[int]:
    found = []
    for entry in data_dir.iterdir():
        match = _FILE.match(entry.name)
        if match and match.group(1) == kind:
            found.append(int(match.group(2)))
    return sorted(found)


def _path(data_dir: Path, kind: str, generation: int) -> Path:
    return data_dir / f"{kind}-{generation:010d}.rdzv"


def recover(data_dir: str | os.PathLike[str], engine: Engine) -> int:
    """Rebuild ``engine`` (which must be empty) from ``data_dir``; return the generation
    to continue in (0 for an empty directory). Raises StoreError on unrecoverable
    corruption, naming the file and offset."""
    root = Path(data_dir)
    volatile: set[bytes] = set()
    snapshots = _generations(root, "snapshot")
    generation = 0
    for candidate in reversed(snapshots):
        path = _path(root, "snapshot", candidate)
        data = path.read_bytes()
        if not data.startswith(_SNAPSHOT_MAGIC):
            _log.warning("%s: not a snapshot (bad magic), skipped", path)
            continue
        try:
            records = list(_records(data[len(_SNAPSHOT_MAGIC) :], path))
        except StoreError:
            _log.warning("%s: corrupt snapshot, trying an older one", path)
            continue
        for _, op, key, value in records:
            _apply(engine, op, key, value, volatile)
        generation = candidate
        break
    log_path = _path(root, "log", generation)
    if log_path.exists():
        data = log_path.read_bytes()
        good = 0
        for end, op, key, value in _records(data, log_path):
            _apply(engine, op, key, value, volatile)
            good = end
        if good < len(data):
            with open(log_path, "r+b") as f:
                f.truncate(good)
    for key in volatile:  # connection-bound and leased keys die with the old server
        engine.apply_delete(key)
    if volatile:
        _log.info("%d connection-bound or leased keys dropped at recovery", len(volatile))
    return generation


class DurableJournal:
    """An :class:`~rdzv.engine.Journal` that makes an engine's state survive restarts.

    Args:
        data_dir: directory for the log and snapshots (created if missing).
        fsync: ``"always"``, ``"interval"`` or ``"never"`` (see the module docstring).
        fsync_interval: seconds between fsyncs for the ``interval`` policy.
        snapshot_bytes: log size (bytes) after which a snapshot is taken.

    Use :meth:`open` to recover an engine and attach the journal to it. Raises ValueError
    for an unknown policy, StoreError if the directory is unusable or corrupt.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        fsync: str = "always",
        fsync_interval: float = 0.05,
        snapshot_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {FSYNC_POLICIES}, got {fsync!r}")
        self.data_dir = Path(data_dir)
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.snapshot_bytes = snapshot_bytes
        self._pending: list[bytes] = []
        self._file: BinaryIO | None = None
        self._engine: Engine | None = None
        self._generation = 0
        self._log_size = 0
        self._last_fsync = 0.0
        self._volatile: set[bytes] = set()
        self._unsynced = False  # written since the last fsync
        #: Commits that wrote records, and the time of each fsync (for metrics).
        self.commits = 0
        self.fsync_time = Histogram(FSYNC_BUCKETS)

    def open(self, engine: Engine) -> None:
        """Recover ``engine`` from the directory, then journal its changes from now on."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._generation = recover(self.data_dir, engine)
            log_path = _path(self.data_dir, "log", self._generation)
            self._file = open(log_path, "ab")  # noqa: SIM115 - lives as long as the journal
        except OSError as exc:
            raise StoreError(
                f"cannot use data directory {self.data_dir}: {exc.strerror or exc}; "
                "give --data-dir a writable directory"
            ) from exc
        self._log_size = self._file.tell()
        self._engine = engine
        engine.set_journal(self)
        _log.info(
            "durable store in %s: %d keys recovered (generation %d)",
            self.data_dir,
            engine.num_keys(),
            self._generation,
        )

    @property
    def dirty(self) -> bool:
        """True while changes are buffered that :meth:`commit` has not written yet."""
        return bool(self._pending)

    def mark_volatile(self, key: bytes) -> None:
        """Record that ``key`` (just set) is connection-bound or leased: recovery drops it.
        A later set, append or delete of the key makes it ordinary again."""
        self._volatile.add(key)
        self._pending.append(_record(_VOLATILE, key))

    # Journal protocol: buffer records until commit().
    def on_set(self, key: bytes, value: bytes) -> None:
        if self._volatile:
            self._volatile.discard(key)
        self._pending.append(_record(_SET, key, value))

    def on_append(self, key: bytes, value: bytes) -> None:
        if self._volatile:
            self._volatile.discard(key)
        self._pending.append(_record(_APPEND, key, value))

    def on_delete(self, key: bytes) -> None:
        if self._volatile:
            self._volatile.discard(key)
        self._pending.append(_record(_DELETE, key))

    def on_queue_push(self, key: bytes, value: bytes) -> None:
        self._pending.append(_record(_QPUSH, key, value))

    def on_queue_pop(self, key: bytes) -> None:
        self._pending.append(_record(_QPOP, key))

    def commit(self) -> None:
        """Write buffered records (and fsync per policy). Call before sending replies."""
        written = self._write_pending()
        if not written or self._file is None:
            return
        self._log_size += written
        self.commits += 1
        now = time.monotonic()
        if self.fsync == "always" or (
            self.fsync == "interval" and now - self._last_fsync >= self.fsync_interval
        ):
            self._timed_fsync()
            self._last_fsync = now
            self._unsynced = False
        else:
            self._unsynced = self.fsync == "interval"
        if self._log_size >= self.snapshot_bytes:
            self.snapshot()

    @property
    def unsynced(self) -> bool:
        """True when the ``interval`` policy left written records without an fsync (call
        :meth:`sync` within ``fsync_interval``, as the server does)."""
        return self._unsynced

    def sync(self) -> None:
        """fsync what :meth:`commit` wrote without one (``interval`` policy)."""
        if self._unsynced and self._file is not None:
            self._timed_fsync()
            self._last_fsync = time.monotonic()
            self._unsynced = False

    def snapshot(self) -> None:
        """Write the whole state as a new generation and drop the older files."""
        if self._engine is None or self._file is None:
            return
        self._write_pending()
        generation = self._generation + 1
        final = _path(self.data_dir, "snapshot", generation)
        tmp = final.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(_SNAPSHOT_MAGIC)
            for key, value in self._engine.items():
                f.write(_record(_SET, key, value))
            for key, items in self._engine.queues():
                for item in items:
                    f.write(_record(_QPUSH, key, item))
            for key in self._volatile:
                f.write(_record(_VOLATILE, key))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self._file.close()
        self._file = open(_path(self.data_dir, "log", generation), "ab")  # noqa: SIM115
        self._fsync_dir()
        self._generation = generation
        self._log_size = 0
        for kind in ("snapshot", "log"):
            for old in _generations(self.data_dir, kind):
                if old < generation:
                    _path(self.data_dir, kind, old).unlink(missing_ok=True)

    def _timed_fsync(self) -> None:
        assert self._file is not None
        start = time.perf_counter()
        os.fsync(self._file.fileno())
        self.fsync_time.observe(time.perf_counter() - start)

    def _write_pending(self) -> int:
        """Write the buffered records to the log (no fsync); return the bytes written."""
        if not self._pending or self._file is None:
            return 0
        data = b"".join(self._pending)
        self._pending.clear()
        self._file.write(data)
        self._file.flush()
        return len(data)

    def _fsync_dir(self) -> None:
        fd = os.open(self.data_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Commit, fsync and close the log."""
        if self._file is None:
            return
        self._write_pending()
        if self.fsync != "never":
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        if self._engine is not None:
            self._engine.set_journal(None)
