"""Durability for the store server: an append-only log of engine changes plus snapshots.

``rdzv serve --data-dir DIR`` attaches a :class:`DurableJournal` to the server's
:class:`~rdzv.engine.Engine`. Every state change becomes one record in ``DIR/log-<gen>.rdzv``;
:meth:`DurableJournal.commit` writes the buffered records to the file as one *commit* (and
fsyncs it, according to the policy) and the server calls it **before** it sends any reply, so
a write whose effect a client could have observed is on disk first. Every ``snapshot_bytes``
of log, the whole state is written to ``DIR/snapshot-<gen>.rdzv`` (temporary file, fsync,
rename) and a new, empty log generation starts; older files are removed. ``DIR/lock`` is
locked (``flock``) by the server using the directory and holds its pid.

Record format (little-endian)::

    u32 crc32(payload) | u32 len(payload) | payload
    payload = u8 op | u32 len(key) | key [| u32 len(value) | value]

with ``op`` one of SET (1), APPEND (2), DELETE (3), QUEUE_PUSH (4), QUEUE_POP (5),
VOLATILE (6, no value) and COMMIT (7, no value). Counters, barriers and compare_set are
logged as the SET of their result, so replay is deterministic. VOLATILE follows the SET of a
connection-bound (``set_ephemeral``) or leased (``set_lease``) key: such a key does not
survive a restart (its connection is gone, its lease clock was the dead server's); any later
SET, APPEND or DELETE of the key makes it ordinary again.

A log is a sequence of commits; each is a COMMIT record whose 28-byte key is the magic
``RDZVCMT1``, the u64 file offset of this COMMIT record, the u64 length in bytes of the
records that follow and the u32 number of those records. A snapshot is the magic
``RDZVSNP2`` followed by one commit holding SET, QUEUE_PUSH and VOLATILE records.

Recovery (:func:`recover`) loads the newest snapshot and replays its log generation. A
commit that runs past the end of the log (or whose header is cut short) is the unfinished
last write of a crash, never acknowledged: it is dropped whole and the file truncated there.
Any other damage (a bad snapshot, a damaged commit followed by more data, a missing log)
raises :class:`~rdzv.errors.StoreError` naming the file, the offset and what would be lost,
unless an older snapshot with its logs still reaches the last state; with
``discard_corrupt=True`` recovery keeps what is intact instead, reports every dropped record
and byte, sets the damaged files aside (``*.corrupt``) and writes a fresh snapshot. Every
step is linear in the size of the files, whatever the bytes.

fsync policies: ``always`` (fsync at every commit: survives power loss), ``interval``
(fsync at most every ``fsync_interval`` seconds: survives a killed server, may lose the last
interval on power loss), ``never`` (leave it to the OS). A commit whose write or fsync fails
(a full disk) is undone (the file truncated back), kept, and written again by the next
commit; :attr:`DurableJournal.failed` tells the server to refuse writes meanwhile.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import logging
import math
import os
import re
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rdzv.engine import Engine
from rdzv.errors import StoreError
from rdzv.stats import FSYNC_BUCKETS, Histogram

__all__ = ["FSYNC_POLICIES", "RECOVERY_MODES", "DurableJournal", "Recovery", "recover"]

_log = logging.getLogger("rdzv.server.persistence")

FSYNC_POLICIES = ("always", "interval", "never")
#: ``recovery`` choices: refuse to start on damage beyond a torn last commit, or keep what
#: is intact (``rdzv serve --recover``).
RECOVERY_MODES = ("strict", "discard-corrupt")

_SET, _APPEND, _DELETE, _QPUSH, _QPOP, _VOLATILE, _COMMIT = 1, 2, 3, 4, 5, 6, 7
_OPS_WITH_VALUE = (_SET, _APPEND, _QPUSH)
_OPS_WITHOUT_VALUE = (_DELETE, _QPOP, _VOLATILE)
_HEAD = struct.Struct("<II")
_LEN = struct.Struct("<I")
_SNAPSHOT_MAGIC = b"RDZVSNP2"
_COMMIT_MAGIC = b"RDZVCMT1"
_COMMIT_KEY = struct.Struct("<8sQQI")  # magic, own offset, body bytes, body records
_COMMIT_PAYLOAD = 1 + _LEN.size + _COMMIT_KEY.size
_COMMIT_SIZE = _HEAD.size + _COMMIT_PAYLOAD
# The bytes of every COMMIT record after its crc: what a resync searches for (bytes.find).
_COMMIT_NEEDLE = (
    _LEN.pack(_COMMIT_PAYLOAD) + bytes((_COMMIT,)) + _LEN.pack(_COMMIT_KEY.size) + _COMMIT_MAGIC
)
_FILE = re.compile(r"^(log|snapshot)-(\d{10})\.rdzv$")
_LOCK_FILE = "lock"

Record = tuple[int, bytes, bytes | None]


def _record(op: int, key: bytes, value: bytes | None = None) -> bytes:
    payload = bytes((op,)) + _LEN.pack(len(key)) + key
    if value is not None:
        payload += _LEN.pack(len(value)) + value
    return _HEAD.pack(zlib.crc32(payload), len(payload)) + payload


def _commit_header(offset: int, body: int, count: int) -> bytes:
    return _record(_COMMIT, _COMMIT_KEY.pack(_COMMIT_MAGIC, offset, body, count))


def _parse_payload(payload: bytes) -> Record:
    op = payload[0]
    (klen,) = _LEN.unpack_from(payload, 1)
    key = payload[5 : 5 + klen]
    if len(key) != klen:
        raise ValueError("key runs past the record")
    if op not in _OPS_WITH_VALUE:
        if 5 + klen != len(payload) or op not in _OPS_WITHOUT_VALUE:
            raise ValueError(f"bad record (op {op})")
        return op, key, None
    at = 5 + klen
    (vlen,) = _LEN.unpack_from(payload, at)
    value = payload[at + 4 : at + 4 + vlen]
    if len(value) != vlen or at + 4 + vlen != len(payload):
        raise ValueError("value does not fill the record")
    return op, key, value


class _Bad(Exception):
    """A commit cannot be read: ``torn`` when it is an unfinished last write."""

    def __init__(self, problem: str, torn: bool = False, records: int = 0) -> None:
        super().__init__(problem)
        self.problem = problem
        self.torn = torn
        self.records = records  # records its intact header declares (0: unknown)


def _commit_at(data: bytes, at: int) -> tuple[int, int] | None:
    """``(body_bytes, records)`` of an intact COMMIT header at ``at``, else None."""
    if len(data) - at < _COMMIT_SIZE:
        return None
    crc, length = _HEAD.unpack_from(data, at)
    if length != _COMMIT_PAYLOAD or data[at + 4 : at + 4 + len(_COMMIT_NEEDLE)] != _COMMIT_NEEDLE:
        return None
    if zlib.crc32(data[at + _HEAD.size : at + _COMMIT_SIZE]) != crc:
        return None
    _, offset, body, count = _COMMIT_KEY.unpack_from(data, at + _HEAD.size + 5)
    return (body, count) if offset == at else None


def _read_commit(data: bytes, at: int, out: list[Record]) -> int:
    """Append the records of the commit at ``at`` to ``out``; return its end offset.

    Raises _Bad (with the records read so far in ``out``) when it is damaged. Linear in the
    commit's size."""
    n = len(data)
    header = _commit_at(data, at)
    if header is None:
        if n - at < _COMMIT_SIZE:
            raise _Bad("a commit header is cut short", torn=True)
        raise _Bad("no intact commit header where a commit should begin")
    body, count = header
    end = at + _COMMIT_SIZE + body
    if end > n:
        raise _Bad(f"a commit of {body} bytes is cut short", torn=True, records=count)
    pos, seen = at + _COMMIT_SIZE, 0
    while pos < end:
        problem = None
        if end - pos < _HEAD.size:
            problem = "a record header runs past its commit"
        else:
            crc, length = _HEAD.unpack_from(data, pos)
            stop = pos + _HEAD.size + length
            payload = data[pos + _HEAD.size : stop]
            if stop > end:
                problem = "a record runs past its commit"
            elif zlib.crc32(payload) != crc:
                problem = f"the record at offset {pos} fails its checksum"
            else:
                try:
                    out.append(_parse_payload(payload))
                except (ValueError, struct.error, IndexError) as exc:
                    problem = f"the record at offset {pos} is malformed ({exc})"
        if problem is not None:
            # The last commit of the file, written whole in size but not in content, is
            # a write the crash interrupted (e.g. blocks never flushed before power loss).
            raise _Bad(problem, torn=end == n, records=count)
        pos = stop
        seen += 1
    if seen != count:
        raise _Bad(f"the commit holds {seen} records, its header says {count}", records=count)
    return end


def _commits_after(data: bytes, start: int) -> tuple[int, int]:
    """``(commits, records)``: the intact commits that begin after ``start`` (linear:
    one ``bytes.find`` pass, O(1) checks per candidate)."""
    commits = records = 0
    probe = data.find(_COMMIT_NEEDLE, start + 1)
    while probe >= 0:
        at = probe - 4
        header = _commit_at(data, at) if at > start else None
        if header is not None and at + _COMMIT_SIZE + header[0] <= len(data):
            commits += 1
            records += header[1]
            probe = data.find(_COMMIT_NEEDLE, at + _COMMIT_SIZE + header[0])
        else:
            probe = data.find(_COMMIT_NEEDLE, probe + 1)
    return commits, records


@dataclass
class _Damage:
    path: Path
    offset: int
    problem: str
    lost_bytes: int
    lost_records: int  # at least this many records are in the lost bytes
    torn: bool  # the unfinished last commit of a crash: never acknowledged

    def describe(self) -> str:
        if self.problem == "missing":
            return f"{self.path} is missing"
        if self.torn:
            return (
                f"{self.path} ends in an unfinished commit at offset {self.offset} ({self.problem})"
            )
        return f"{self.path} is corrupt at offset {self.offset}: {self.problem}"

    def loss(self) -> str:
        if self.problem == "missing":
            return f"whatever {self.path} held (the file is missing)"
        if self.torn and self.lost_records:  # its intact header says how many
            records = f"{self.lost_records} records"
        elif self.lost_records:
            records = f"at least {self.lost_records} records"
        else:
            records = "records that cannot be counted"
        return f"{self.lost_bytes} bytes ({records}) of {self.path} from offset {self.offset}"


@dataclass
class _File:
    """A parsed log or snapshot: its intact records, where they end, and any damage."""

    records: list[Record]
    good: int
    damage: _Damage | None


def _parse_log(path: Path) -> _File:
    data = path.read_bytes()
    records: list[Record] = []
    at = 0
    while at < len(data):
        batch: list[Record] = []
        try:
            end = _read_commit(data, at, batch)
        except _Bad as bad:  # a commit is all or nothing: drop it whole
            torn = bad.torn
            lost = bad.records
            if not torn or not lost:
                later, later_records = _commits_after(data, at)
                lost += later_records
                torn = torn and not later
            return _File(records, at, _Damage(path, at, bad.problem, len(data) - at, lost, torn))
        records += batch
        at = end
    return _File(records, at, None)


def _parse_snapshot(path: Path) -> _File:
    data = path.read_bytes()
    records: list[Record] = []
    if not data.startswith(_SNAPSHOT_MAGIC):
        problem = f"bad magic {data[:8]!r} (expected {_SNAPSHOT_MAGIC!r})"
        return _File(records, 0, _Damage(path, 0, problem, len(data), 0, False))
    start = len(_SNAPSHOT_MAGIC)
    try:
        end = _read_commit(data, start, records)
        if end != len(data):
            raise _Bad(f"{len(data) - end} bytes follow the snapshot's records")
    except _Bad as bad:  # a snapshot is written whole before it is renamed: no torn tail
        lost = max(bad.records - len(records), 0)
        damage = _Damage(path, start, bad.problem, len(data) - start, lost, False)
        return _File(records, start, damage)
    return _File(records, end, None)


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


@dataclass
class Recovery:
    """What :func:`recover` did.

    Attributes:
        generation: the log generation to continue in.
        dropped_records: records dropped (a torn last commit's included; for damage whose
            records cannot be identified, the ones known from intact commit headers).
        dropped_bytes: bytes of log or snapshot dropped.
        losses: one line per damaged place: file, offset, problem, bytes and records.
        rewrite: the files on disk are not what was loaded (a fallback or discarded
            damage): the caller must write a fresh snapshot before continuing.
        set_aside: damaged files renamed ``*.corrupt`` (discard mode).
    """

    generation: int = 0
    dropped_records: int = 0
    dropped_bytes: int = 0
    losses: list[str] = field(default_factory=list)
    rewrite: bool = False
    set_aside: list[Path] = field(default_factory=list)


def recover(
    data_dir: str | os.PathLike[str], engine: Engine, *, discard_corrupt: bool = False
) -> Recovery:
    """Rebuild ``engine`` (which must be empty) from ``data_dir``.

    The newest snapshot plus its log is the last state; if that snapshot is damaged, an
    older one whose logs all remain still reaches it. A torn last commit is dropped and the
    log truncated (logged with its bytes and records). Raises
    :class:`~rdzv.errors.StoreError` when the last state cannot be reached, naming each
    damaged file, the offset, and what ``discard_corrupt=True`` (``rdzv serve
    --recover=discard-corrupt``) would lose; with it, the intact records are loaded instead
    (the snapshot's records before the damage, each log's commits before it, no log after
    a damaged one), the damaged files are renamed ``*.corrupt`` and ``rewrite`` is set."""
    collecting = gc.isenabled()
    gc.disable()  # millions of long-lived records: collection passes would only cost time
    try:
        return _recover(Path(data_dir), engine, discard_corrupt)
    finally:
        if collecting:
            gc.enable()


def _recover(root: Path, engine: Engine, discard_corrupt: bool) -> Recovery:
    snapshots = _generations(root, "snapshot")
    logs = _generations(root, "log")
    last = max(snapshots[-1:] + logs[-1:], default=0)
    parsed: dict[Path, _File] = {}

    def load(path: Path, kind: str) -> _File:
        if path not in parsed:
            parsed[path] = _parse_snapshot(path) if kind == "snapshot" else _parse_log(path)
        return parsed[path]

    problems: list[str] = []
    if last > (snapshots[-1] if snapshots else 0):
        problems.append(
            f"{_path(root, 'snapshot', last)} is missing "
            f"(the state {_path(root, 'log', last).name} starts from)"
        )
    # Bases, newest first: each snapshot, then the empty state generation 0 started from.
    bases: list[int | None] = [*reversed(snapshots), None]
    for index, base in enumerate(bases):
        start = 0 if base is None else base
        if base is not None:
            snap = load(_path(root, "snapshot", base), "snapshot")
            if snap.damage is not None:
                problems.append(snap.damage.describe())
                continue
        # The logs an older base would need are normally gone: only the newest base's
        # reasons are worth reporting (unless a missing snapshot already explains them).
        report = problems if index == 0 and not problems else []
        chain = _log_chain(root, logs, start, last, load, report)
        if chain is None:
            continue
        # The last state is reachable from here.
        result = Recovery(generation=last, rewrite=base != (snapshots[-1] if snapshots else None))
        volatile: set[bytes] = set()
        if base is not None:
            _apply_all(engine, parsed[_path(root, "snapshot", base)].records, volatile)
        for log in chain:
            _apply_all(engine, log.records, volatile)
        tail = chain[-1].damage if chain else None
        if tail is not None:  # a torn last commit (checked by _log_chain)
            _truncate(tail.path, tail.offset)
            _count_loss(result, tail, "dropped the unfinished last commit (never acknowledged)")
        if problems:
            _log.warning(
                "%s: recovered the last state from older files; skipped: %s",
                root,
                "; ".join(problems),
            )
        _drop_volatile(engine, volatile)
        return result
    plan = _discard_plan(root, snapshots, last, load)
    if not discard_corrupt:
        damaged = [p for p in problems if " is missing" not in p] or problems
        raise StoreError(
            f"durable store in {root} cannot be recovered to its last state: "
            + "; ".join(damaged)
            + ". Choices: restore the directory from a backup, or start from what is intact "
            "with `rdzv serve --recover=discard-corrupt` (StoreServer(recovery="
            "'discard-corrupt')), which loses: "
            + ("; ".join(d.loss() for d in plan.damage) or "nothing identifiable")
        )
    return _discard(root, engine, last, plan)


def _log_chain(
    root: Path,
    logs: list[int],
    start: int,
    last: int,
    load: _Loader,
    problems: list[str],
) -> list[_File] | None:
    """The parsed logs ``start..last`` if they replay to the last state, else None (with
    the reason appended to ``problems``). Only the last log may end in a torn commit."""
    chain: list[_File] = []
    for generation in range(start, last + 1):
        path = _path(root, "log", generation)
        if generation not in logs:
            if generation == last:
                break  # not created yet: an empty log
            problems.append(f"{path} is missing")
            return None
        log = load(path, "log")
        if log.damage is not None and not (generation == last and log.damage.torn):
            problems.append(log.damage.describe())
            return None
        chain.append(log)
    return chain


_Loader = Callable[[Path, str], _File]


@dataclass
class _Plan:
    """What ``discard_corrupt`` loads: the intact records of each file, and what is lost."""

    files: list[_File]
    damage: list[_Damage]


def _discard_plan(root: Path, snapshots: list[int], last: int, load: _Loader) -> _Plan:
    files: list[_File] = []
    damage: list[_Damage] = []
    start = snapshots[-1] if snapshots else 0
    broken = False
    if last > start:  # the snapshot the last log starts from is gone
        damage.append(_Damage(_path(root, "snapshot", last), 0, "missing", 0, 0, False))
        broken = True
        start = last
    elif snapshots:
        snap = load(_path(root, "snapshot", start), "snapshot")
        files.append(snap)
        if snap.damage is not None:
            damage.append(snap.damage)
    for generation in range(start, last + 1):
        path = _path(root, "log", generation)
        if not path.exists():
            if generation < last and not broken:
                damage.append(_Damage(path, 0, "missing", 0, 0, False))
                broken = True
            continue
        if broken:  # its changes apply to a state that was not rebuilt
            size = path.stat().st_size
            damage.append(_Damage(path, 0, "follows missing or damaged data", size, 0, False))
            continue
        log = load(path, "log")
        files.append(log)
        if log.damage is not None:
            damage.append(log.damage)
            broken = True
    return _Plan(files, damage)


def _discard(root: Path, engine: Engine, last: int, plan: _Plan) -> Recovery:
    result = Recovery(generation=last, rewrite=True)
    volatile: set[bytes] = set()
    for file in plan.files:
        _apply_all(engine, file.records, volatile)
    for damage in plan.damage:
        _count_loss(result, damage, "discarded damaged data (--recover=discard-corrupt)")
    for path in sorted({d.path for d in plan.damage if d.path.exists()}):
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        result.set_aside.append(aside)
        _log.warning("%s: damaged file kept as %s", root, aside)
    _drop_volatile(engine, volatile)
    return result


def _apply_all(engine: Engine, records: list[Record], volatile: set[bytes]) -> None:
    for op, key, value in records:
        _apply(engine, op, key, value, volatile)


def _count_loss(result: Recovery, damage: _Damage, what: str) -> None:
    result.dropped_records += damage.lost_records
    result.dropped_bytes += damage.lost_bytes
    result.losses.append(damage.loss())
    _log.warning("%s: %s: %s", what, damage.describe(), damage.loss())


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def _drop_volatile(engine: Engine, volatile: set[bytes]) -> None:
    for key in volatile:  # connection-bound and leased keys die with the old server
        engine.apply_delete(key)
    if volatile:
        _log.info("%d connection-bound or leased keys dropped at recovery", len(volatile))


class _DirectoryLock:
    """An exclusive ``flock`` on ``DIR/lock``, which holds the owner's pid."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / _LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise StoreError(
                f"data directory {data_dir} is in use by another server (pid {holder} holds "
                f"the lock on {self.path}); stop that server first, or give --data-dir "
                "another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None


class DurableJournal:
    """An :class:`~rdzv.engine.Journal` that makes an engine's state survive restarts.

    Args:
        data_dir: directory for the log and snapshots (created if missing).
        fsync: ``"always"``, ``"interval"`` or ``"never"`` (see the module docstring).
        fsync_interval: seconds between fsyncs for the ``interval`` policy (> 0).
        snapshot_bytes: log size (bytes) after which a snapshot is taken (> 0).
        recovery: ``"strict"`` (refuse to start on damage beyond a torn last commit) or
            ``"discard-corrupt"`` (keep what is intact; see :func:`recover`).

    Use :meth:`open` to recover an engine and attach the journal to it. Raises ValueError
    for an unknown policy or mode or a non-positive interval or size, StoreError from
    :meth:`open` if the directory is unusable, locked by another server or corrupt.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        fsync: str = "always",
        fsync_interval: float = 0.05,
        snapshot_bytes: int = 64 * 1024 * 1024,
        recovery: str = "strict",
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {FSYNC_POLICIES}, got {fsync!r}")
        if recovery not in RECOVERY_MODES:
            raise ValueError(f"recovery must be one of {RECOVERY_MODES}, got {recovery!r}")
        if not (fsync_interval > 0 and math.isfinite(fsync_interval)):
            raise ValueError(f"fsync_interval must be > 0 seconds, got {fsync_interval}")
        if snapshot_bytes <= 0:
            raise ValueError(f"snapshot_bytes must be > 0, got {snapshot_bytes}")
        self.data_dir = Path(data_dir)
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.snapshot_bytes = snapshot_bytes
        self.recovery = recovery
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._fd = -1
        self._lock: _DirectoryLock | None = None
        self._engine: Engine | None = None
        self._generation = 0
        self._log_size = 0  # bytes of whole commits in the log (where the next one goes)
        self._snapshot_at = snapshot_bytes
        self._last_fsync = 0.0
        self._volatile: set[bytes] = set()
        self._unsynced = False  # written since the last fsync
        self._truncate_needed = False  # a failed commit left bytes after _log_size
        #: Commits written, and the time of each fsync of the log (for metrics).
        self.commits = 0
        self.fsync_time = Histogram(FSYNC_BUCKETS)
        self.failed: OSError | None = None
        """The error of the last commit when it failed (its records are kept and written
        again by the next commit); None once a commit succeeds."""

    def open(self, engine: Engine) -> Recovery:
        """Lock the directory, recover ``engine`` from it, then journal its changes."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._lock = _DirectoryLock(self.data_dir)
        except OSError as exc:
            raise StoreError(
                f"cannot use data directory {self.data_dir}: {exc.strerror or exc}; "
                "give --data-dir a writable directory"
            ) from exc
        try:
            for leftover in self.data_dir.glob("snapshot-*.tmp"):
                leftover.unlink()  # a snapshot a crash interrupted before its rename
            result = recover(
                self.data_dir, engine, discard_corrupt=self.recovery == "discard-corrupt"
            )
            self._generation = result.generation
            self._open_log()
        except OSError as exc:
            self._release()
            raise StoreError(
                f"cannot use data directory {self.data_dir}: {exc.strerror or exc}; "
                "give --data-dir a writable directory"
            ) from exc
        except BaseException:
            self._release()
            raise
        self._engine = engine
        engine.set_journal(self)
        if result.rewrite:  # the files on disk are not what was loaded: start clean
            try:
                self.snapshot()
            except OSError as exc:
                self.close()
                raise StoreError(
                    f"cannot write a snapshot of the recovered state in {self.data_dir}: "
                    f"{exc.strerror or exc}"
                ) from exc
        _log.info(
            "durable store in %s: %d keys recovered (generation %d)",
            self.data_dir,
            engine.num_keys(),
            self._generation,
        )
        return result

    def _open_log(self) -> None:
        """Open the current generation's log (raises OSError)."""
        path = _path(self.data_dir, "log", self._generation)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._log_size = os.fstat(self._fd).st_size
        self._snapshot_at = self.snapshot_bytes

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def dirty(self) -> bool:
        """True while changes are buffered that :meth:`commit` has not written yet."""
        return bool(self._pending)

    @property
    def pending_bytes(self) -> int:
        """Bytes of records buffered for the next commit."""
        return self._pending_bytes

    def _add(self, record: bytes) -> None:
        self._pending.append(record)
        self._pending_bytes += len(record)

    def mark_volatile(self, key: bytes) -> None:
        """Record that ``key`` (just set) is connection-bound or leased: recovery drops it.
        A later set, append or delete of the key makes it ordinary again."""
        self._volatile.add(key)
        self._add(_record(_VOLATILE, key))

    # Journal protocol: buffer records until commit().
    def on_set(self, key: bytes, value: bytes) -> None:
        if self._volatile:
            self._volatile.discard(key)
        self._add(_record(_SET, key, value))

    def on_append(self, key: bytes, value: bytes) -> None:
        if self._volatile:
            self._volatile.discard(key)
        self._add(_record(_APPEND, key, value))

    def on_delete(self, key: bytes) -> None:
        if self._volatile:
            self._volatile.discard(key)
        self._add(_record(_DELETE, key))

    def on_queue_push(self, key: bytes, value: bytes) -> None:
        self._add(_record(_QPUSH, key, value))

    def on_queue_pop(self, key: bytes) -> None:
        self._add(_record(_QPOP, key))

    def commit(self) -> None:
        """Write the buffered records as one commit (and fsync per policy). Call before
        sending replies.

        Raises OSError when the write or fsync fails (a full disk: ENOSPC, EFBIG, EDQUOT;
        EIO): the commit is then undone (the log truncated back), its records kept for the
        next commit, and :attr:`failed` set until a commit succeeds. While :attr:`failed`
        is set and nothing is buffered, a commit probes the disk with an fsync."""
        if self._engine is None:
            return  # not open (or closed)
        if self._fd < 0:  # a snapshot could not open its new log: open it now
            self._guard(self._open_log)
        if not self._pending:
            if self.failed is not None:
                self._guard(lambda: os.fsync(self._fd))
                self._recovered()
            return
        body = b"".join(self._pending)
        data = _commit_header(self._log_size, len(body), len(self._pending)) + body
        now = time.monotonic()
        sync = self.fsync == "always" or (
            self.fsync == "interval" and now - self._last_fsync >= self.fsync_interval
        )
        self._guard(lambda: self._append(data, sync))
        self._pending.clear()
        self._pending_bytes = 0
        self._log_size += len(data)
        self.commits += 1
        if sync:
            self._last_fsync = now
            self._unsynced = False
        else:
            self._unsynced = self.fsync == "interval"
        if self.failed is not None:
            self._recovered()
        if self._log_size >= self._snapshot_at:
            try:
                self.snapshot()
            except OSError as exc:  # the log holds everything: retry after more log
                self._snapshot_at = self._log_size + self.snapshot_bytes
                _log.error("%s: cannot write a snapshot: %s (retried later)", self.data_dir, exc)

    def _append(self, data: bytes, sync: bool) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        if sync:
            self._fsync()

    def _fsync(self) -> None:
        start = time.perf_counter()
        os.fsync(self._fd)
        self.fsync_time.observe(time.perf_counter() - start)

    def _guard(self, step: Callable[[], None]) -> None:
        """Run ``step``; on OSError undo any partial commit, remember and re-raise it."""
        try:
            if self._truncate_needed and self._fd >= 0:  # no partial commit before the next
                os.ftruncate(self._fd, self._log_size)
                self._truncate_needed = False
            step()
        except OSError as exc:
            if self.failed is None:  # the server logs it for the operator, once
                _log.debug("%s: cannot write the log: %s", self.data_dir, exc)
            self.failed = exc
            try:
                if self._fd >= 0:
                    os.ftruncate(self._fd, self._log_size)
            except OSError as undo:
                _log.error("%s: cannot truncate the log back yet: %s", self.data_dir, undo)
                self._truncate_needed = True
            raise

    def _recovered(self) -> None:
        _log.debug("%s: the log is writable again", self.data_dir)
        self.failed = None

    @property
    def unsynced(self) -> bool:
        """True when the ``interval`` policy left written records without an fsync (call
        :meth:`sync` within ``fsync_interval``, as the server does)."""
        return self._unsynced

    def sync(self) -> None:
        """fsync what :meth:`commit` wrote without one (``interval`` policy). Raises
        OSError (and sets :attr:`failed`) when the fsync fails."""
        if self._unsynced and self._fd >= 0:
            self._guard(self._fsync)
            self._last_fsync = time.monotonic()
            self._unsynced = False

    def snapshot(self) -> None:
        """Write the whole state as a new generation and drop the older files. Call with
        nothing buffered (after a commit); raises OSError if the snapshot cannot be written
        (the current generation then continues)."""
        if self._engine is None or self._fd < 0 or self._pending:
            return
        generation = self._generation + 1
        final = _path(self.data_dir, "snapshot", generation)
        tmp = final.with_suffix(".tmp")
        records = [_record(_SET, key, value) for key, value in self._engine.items()]
        records += [
            _record(_QPUSH, key, item) for key, items in self._engine.queues() for item in items
        ]
        records += [_record(_VOLATILE, key) for key in self._volatile]
        try:
            with open(tmp, "wb") as f:
                f.write(_SNAPSHOT_MAGIC)
                size = sum(len(r) for r in records)
                f.write(_commit_header(len(_SNAPSHOT_MAGIC), size, len(records)))
                for record in records:
                    f.write(record)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        os.close(self._fd)
        self._fd = -1
        self._generation = generation
        self._open_log()
        self._fsync_dir()
        for kind in ("snapshot", "log"):
            for old in _generations(self.data_dir, kind):
                if old < generation:
                    _path(self.data_dir, kind, old).unlink(missing_ok=True)

    def _fsync_dir(self) -> None:
        fd = os.open(self.data_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Commit, fsync and close the log; release the directory (idempotent)."""
        engine, self._engine = self._engine, None
        if engine is not None:
            self._engine = engine  # commit() needs it
            try:
                self.commit()
                if self.fsync != "never" and self._fd >= 0:
                    os.fsync(self._fd)
            except OSError as exc:
                _log.error(
                    "%s: closing with %d records not written: %s",
                    self.data_dir,
                    len(self._pending),
                    exc,
                )
            self._engine = None
            engine.set_journal(None)
        self._release()
