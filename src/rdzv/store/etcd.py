"""EtcdStore: the whole Store API on an etcd v3 cluster, under a key prefix.

torch's ``EtcdStore`` speaks etcd's v2 API (removed in etcd 3.6) through the unmaintained
python-etcd client, polls, and implements only set/get/add/wait/check. This one speaks v3
(gRPC, through etcd-sdk-python) and implements every Store operation with etcd's own
primitives, so nothing is emulated by polling:

=====================  ===================================================================
operation              etcd v3 mechanism
=====================  ===================================================================
set / multi_set        Put; multi_set batches puts into transactions (``max_txn_ops`` and
                       ``max_request_bytes`` per transaction, so each batch is atomic)
get / multi_get /      Range; missing keys are awaited with a watch that starts at the
wait                   read's revision + 1, so no write between the read and the watch is
                       missed (no polling)
add / append           read-modify-write transaction guarded by the key's mod revision,
                       retried on conflict (the conflict answer carries the new value)
compare_set            one transaction (value compare; nested transaction for the absent /
                       empty-expected case) with torch's truth table
check / num_keys /     count-only ranges; list_keys pages through a keys-only range at one
list_keys              revision
delete_key             DeleteRange (reports truthfully whether the key existed)
queues                 one key per item under a per-queue prefix; FIFO by create revision;
                       pop = delete transaction on the oldest item guarded by its mod
                       revision (exactly one popper gets each item); blocking pop watches
barrier                a counter under the key (as rdzv's engine): ``add`` then a watch until
                       the counter reaches the generation's target; reusable
leases                 ``set_lease(key, value, ttl)``: a new etcd lease per call; or
                       ``lease(ttl)`` + ``set(key, value, lease=...)`` for keys that expire
                       together; expired keys are deleted by etcd
=====================  ===================================================================

Key layout under the prefix ``P`` (``/rdzv/store/`` by default; the bytes are the UTF-8 of
the strings): value ``k`` lives at ``P + "k/" + k``; item ``i`` of queue ``q`` at
``P + "q/" + base64url(q) + "/" + i``. Keys are stored raw (torch base64-encodes them).

Limits (etcd's, not rdzv's): one request (a value, or a multi_set batch) is at most the
server's ``--max-request-bytes`` (1.5 MiB by default; start etcd with more for bigger values)
and a transaction has at most ``--max-txn-ops`` operations (128 by default): pass the
server's values as ``max_request_bytes``/``max_txn_ops`` so batches fit. etcd's database is
limited by ``--quota-backend-bytes`` (2 GiB by default). Lease TTLs are whole seconds, and
etcd raises TTLs below its minimum (about 1.5 election timeouts, 2 s with defaults).
``queue_pop`` sorts the queue's items by create revision on the server: O(queue length).

Failover: see :mod:`rdzv.store.etcd_client`. Reads, puts and watches ride through the loss
of an endpoint; ``add``, ``compare_set``, ``append``, ``delete_key``, ``queue_push`` and
``queue_pop`` are retried on another endpoint only when the failed attempt provably did not
execute, otherwise they raise :class:`~rdzv.errors.NetworkError` ("may or may not have been
applied"), never apply twice.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

from rdzv.engine import INT64_MAX, INT64_MIN, format_counter, parse_counter, show_key
from rdzv.errors import CounterError, NetworkError, QueueEmptyError, StoreError
from rdzv.store.base import (
    Deadline,
    Store,
    TimeoutLike,
    ValueLike,
    check_ttl,
    key_to_str,
    keys_to_list,
    value_to_bytes,
)
from rdzv.store.etcd_client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_REQUEST_TIMEOUT,
    EtcdClient,
    WatchLostError,
    prefix_range_end,
)

from pyetcd import etcdrpc  # isort: skip  (after etcd_client, which explains a missing install)

__all__ = ["DEFAULT_PREFIX", "EtcdLease", "EtcdStore", "LeaseExpiredError"]

#: Default key prefix of an EtcdStore.
DEFAULT_PREFIX = "/rdzv/store/"
#: etcd's default ``--max-txn-ops``.
DEFAULT_MAX_TXN_OPS = 128
#: etcd's default ``--max-request-bytes`` (1.5 MiB).
DEFAULT_MAX_REQUEST_BYTES = 1536 * 1024
_PUT, _DELETE = 0, 1
_CMP = etcdrpc.Compare
_LIST_PAGE = 10_000
log = logging.getLogger("rdzv.store.etcd")
_CACHE_SIZE = 4096
#: TTL of a client's session key (seconds); renewed lazily by the next guarded write after
#: half of it has passed, re-created after it lapsed.
_SESSION_TTL = 600


class LeaseExpiredError(StoreError):
    """The etcd lease no longer exists (it expired or was revoked): its keys are gone."""


def _range(key: bytes, end: bytes = b"", **kw: Any) -> Any:
    return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key, range_end=end, **kw))


def _put(key: bytes, value: bytes, lease: int = 0) -> Any:
    return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, value=value, lease=lease))


def _mod_is(key: bytes, revision: int) -> Any:
    return _CMP(key=key, target=_CMP.MOD, result=_CMP.EQUAL, mod_revision=revision)


def _ttl_seconds(ttl: object) -> int:
    """A lease TTL (:func:`~rdzv.store.base.check_ttl`) in the whole seconds etcd grants,
    rounded up."""
    return max(1, math.ceil(check_ttl(ttl)))


class EtcdLease:
    """An etcd lease: keys written with it are deleted by etcd when it expires.

    Attributes: ``id`` (etcd's lease id), ``ttl`` (granted TTL, whole seconds).
    Obtain one from :meth:`EtcdStore.lease`.
    """

    def __init__(self, store: EtcdStore, lease_id: int, ttl: int) -> None:
        self._store = store
        self.id = lease_id
        self.ttl = ttl

    def __repr__(self) -> str:
        return f"EtcdLease(id={self.id:#x}, ttl={self.ttl})"

    def refresh(self) -> int:
        """Renew the lease for another ``ttl`` seconds (one keep-alive); return the TTL.

        Raises :class:`LeaseExpiredError` if the lease already expired (its keys are gone),
        NetworkError if no endpoint answers within the store's timeout.
        """
        client = self._store._client
        ttl = client.lease_keepalive(self.id, self._store._deadline())
        if ttl <= 0:
            raise LeaseExpiredError(
                f"etcd lease {self.id:#x} (ttl {self.ttl} s) has expired or was revoked; "
                "the keys attached to it were deleted"
            )
        return ttl

    def remaining(self) -> int:
        """Seconds until the lease expires (-1 once it has expired)."""
        response = self._store._unary(
            "Lease", "LeaseTimeToLive", etcdrpc.LeaseTimeToLiveRequest(ID=self.id), "lease ttl"
        )
        return int(response.TTL)

    def revoke(self) -> None:
        """End the lease now: etcd deletes every key attached to it. Revoking an expired
        lease is not an error."""
        try:
            self._store._unary(
                "Lease", "LeaseRevoke", etcdrpc.LeaseRevokeRequest(ID=self.id), "lease revoke"
            )
        except StoreError as exc:
            if "lease not found" not in str(exc):
                raise


class EtcdStore(Store):
    """A :class:`~rdzv.store.base.Store` on etcd v3 (needs ``pip install "rdzv[etcd]"``).

    Args:
        endpoints: etcd client endpoints: a list or a comma-separated string of ``host:port``
            / ``http://host:port`` / ``https://host:port`` (default port 2379). Requests fail
            over between them.
        prefix: every key of this store lives under this etcd key prefix (a ``/`` is
            appended if missing). Stores with different prefixes are independent.
        timeout: default timeout of blocking calls (timedelta or seconds; default 300 s).
            Non-blocking calls use it as their budget for reaching an endpoint.
        ca_cert, cert, key: PEM files for TLS (CA; client certificate and key).
        user, password: etcd authentication.
        max_txn_ops: the server's ``--max-txn-ops`` (multi_set batch size).
        max_request_bytes: the server's ``--max-request-bytes`` (multi_set batch size).
        max_message_bytes: gRPC message limit of the client, bytes.
        request_timeout: upper bound of one request attempt before failing over, seconds.

    The constructor reads the prefix once to check that the cluster is reachable (and, with
    ``user``, that the credentials work) within ``timeout``. Raises NetworkError naming the
    endpoints when none answers, AuthError for rejected credentials or permissions,
    FileNotFoundError naming a missing TLS file, ValueError/TypeError for bad arguments.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] = "127.0.0.1:2379",
        prefix: str = DEFAULT_PREFIX,
        timeout: TimeoutLike | None = None,
        *,
        ca_cert: str | os.PathLike[str] | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        user: str | None = None,
        password: str | None = None,
        max_txn_ops: int = DEFAULT_MAX_TXN_OPS,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        super().__init__(timeout)
        if not isinstance(prefix, str):
            raise TypeError(f"EtcdStore: prefix must be a str, got {type(prefix).__name__}")
        for name, limit in (("max_txn_ops", max_txn_ops), ("max_request_bytes", max_request_bytes)):
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"EtcdStore: {name} must be a positive int, got {limit!r}")
        client_options: dict[str, Any] = {
            "ca_cert": ca_cert,
            "cert": cert,
            "key": key,
            "user": user,
            "password": password,
            "max_message_bytes": max_message_bytes,
            "request_timeout": request_timeout,
        }
        # Everything clone() passes on.
        self._config = {
            **client_options,
            "max_txn_ops": max_txn_ops,
            "max_request_bytes": max_request_bytes,
        }
        self._endpoints_spec = endpoints
        self._client = EtcdClient(endpoints, **client_options)
        self._prefix = prefix if prefix.endswith("/") else prefix + "/"
        raw = self._prefix.encode("utf-8")
        self._values = raw + b"k/"
        self._queues = raw + b"q/"
        self._max_txn_ops = max_txn_ops
        self._max_request_bytes = max_request_bytes
        # key -> (value, mod revision) last seen by this client: the first guess of add.
        self._seen: dict[bytes, tuple[bytes, int]] = {}
        self._watch_losses = 0
        # The session key: see _guarded().
        self._session_key = raw + b"s/" + uuid.uuid4().hex.encode("ascii")
        self._session_lock = threading.Lock()
        self._session_value: bytes | None = None
        self._session_lease = 0
        self._session_renewed = 0.0
        self._session_seq = 0
        self._pending = b""
        try:
            self._unary(
                "KV",
                "Range",
                etcdrpc.RangeRequest(
                    key=self._values, range_end=prefix_range_end(self._values), count_only=True
                ),
                "connect",
            )
        except BaseException:
            self._client.close()
            raise

    # ----------------------------------------------------------------- housekeeping
    def __repr__(self) -> str:
        endpoints = ",".join(map(str, self._client.endpoints))
        return f"EtcdStore(endpoints={endpoints!r}, prefix={self._prefix!r})"

    @property
    def prefix(self) -> str:
        """The etcd key prefix of this store (ends with ``/``)."""
        return self._prefix

    @property
    def endpoints(self) -> list[str]:
        """The configured endpoints as ``host:port``."""
        return [str(e) for e in self._client.endpoints]

    @property
    def endpoint(self) -> str:
        """The endpoint requests currently go to (changes on failover)."""
        return str(self._client.endpoint)

    def clone(self) -> EtcdStore:
        """A new client (own gRPC channels) on the same endpoints, prefix, options and
        timeout; safe to use from another thread or process."""
        return EtcdStore(self._endpoints_spec, self._prefix, self._timeout, **self._config)

    def close(self) -> None:
        """Revoke this client's session lease (best effort, so its session key goes at once
        rather than when the lease expires) and close the gRPC channels. Later calls raise
        NetworkError."""
        with self._session_lock:
            lease, self._session_lease, self._session_value = self._session_lease, 0, None
        if lease:
            with contextlib.suppress(Exception):
                revoke = etcdrpc.LeaseRevokeRequest(ID=lease)
                self._unary("Lease", "LeaseRevoke", revoke, "close", Deadline(1.0))
        self._client.close()

    def __enter__(self) -> EtcdStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has_extended_api(self) -> bool:
        return True

    # ----------------------------------------------------------------- helpers
    def _deadline(self, timeout: float | None = None) -> Deadline:
        return Deadline(self._timeout if timeout is None else timeout)

    def _unary(
        self,
        service: str,
        method: str,
        request: Any,
        what: str,
        deadline: Deadline | None = None,
        idempotent: bool = True,
    ) -> Any:
        return self._client.unary(
            service,
            method,
            request,
            deadline or self._deadline(),
            idempotent=idempotent,
            what=what,
        )

    def _txn(
        self,
        compare: list[Any],
        success: list[Any],
        failure: list[Any],
        what: str,
        idempotent: bool = False,
    ) -> Any:
        request = etcdrpc.TxnRequest(compare=compare, success=success, failure=failure)
        return self._unary("KV", "Txn", request, what, idempotent=idempotent)

    def _vkey(self, key: str) -> bytes:
        return self._values + key.encode("utf-8")

    def _qprefix(self, name: str) -> bytes:
        return self._queues + base64.urlsafe_b64encode(name.encode("utf-8")) + b"/"

    def _queue_name(self, etcd_key: bytes) -> str | None:
        encoded = etcd_key[len(self._queues) :].partition(b"/")[0]
        try:
            return base64.urlsafe_b64decode(encoded).decode("utf-8")
        except ValueError:
            return None

    def _remember(self, vkey: bytes, value: bytes, revision: int) -> None:
        if len(self._seen) >= _CACHE_SIZE:
            self._seen.clear()
        self._seen[vkey] = (value, revision)

    def _read(self, keys: list[str], queues: bool) -> tuple[int, dict[str, bytes], set[str]]:
        """Read ``keys`` (values, and with ``queues`` whether their queues are non-empty)
        in transactions of at most ``max_txn_ops`` ranges. Returns the lowest revision the
        reads saw, the values found and the names whose queue is non-empty."""
        values: dict[str, bytes] = {}
        queued: set[str] = set()
        revision = 0
        per_key = 2 if queues else 1
        step = max(1, self._max_txn_ops // per_key)
        for start in range(0, len(keys), step):
            chunk = keys[start : start + step]
            ops = []
            for k in chunk:
                ops.append(_range(self._vkey(k)))
                if queues:
                    qp = self._qprefix(k)
                    ops.append(_range(qp, prefix_range_end(qp), count_only=True, limit=1))
            response = self._txn([], ops, [], "read", idempotent=True)
            if not revision or response.header.revision < revision:
                revision = response.header.revision
            for i, k in enumerate(chunk):
                found = response.responses[i * per_key].response_range
                if found.kvs:
                    values[k] = found.kvs[0].value
                if queues and response.responses[i * per_key + 1].response_range.count:
                    queued.add(k)
        return revision, values, queued

    def _await(self, keys: list[str], timeout: float, op: str, queues: bool) -> dict[str, bytes]:
        """Wait until every key holds a value (``queues``: or a non-empty queue) and return
        the values seen. Reads, then watches the missing keys from the read's revision + 1;
        a broken watch (failover) means reading again."""
        deadline = Deadline(timeout)
        found: dict[str, bytes] = {}
        missing = list(dict.fromkeys(keys))
        while True:
            revision, values, queued = self._read(missing, queues)
            found.update(values)
            missing = [k for k in missing if k not in values and k not in queued]
            if not missing:
                return found
            if deadline.remaining() <= 0:
                raise self._timeout_error(op, missing, timeout)
            vkeys = sorted(self._vkey(k) for k in missing)
            ranges = [(vkeys[0], b"" if len(vkeys) == 1 else vkeys[-1] + b"\0")]
            if queues:
                qp = self._qprefix(missing[0]) if len(missing) == 1 else self._queues
                ranges.append((qp, prefix_range_end(qp)))
            wanted = set(missing)
            with self._watching(ranges, revision, deadline) as batches:
                for events in batches:
                    for event in events:
                        if event.type != _PUT:
                            continue
                        name = self._name_of(event.kv.key)
                        if name in wanted:
                            wanted.discard(name)
                            if event.kv.key.startswith(self._values):
                                found.setdefault(name, event.kv.value)
                    if not wanted:
                        return found
            missing = list(wanted)  # deadline, or watch lost: read again

    @contextlib.contextmanager
    def _watching(
        self, ranges: list[tuple[bytes, bytes]], revision: int, deadline: Deadline
    ) -> Iterator[Generator[Sequence[Any], None, None]]:
        """Watch ``ranges`` from ``revision + 1``: yields the batches of events. A lost watch
        (failover, compaction) ends the batches early after a short growing pause (so a
        flapping endpoint cannot make the caller spin); callers then read again."""
        batches = self._client.watch(ranges, revision + 1, deadline)
        try:
            yield batches
            self._watch_losses = 0
        except WatchLostError as exc:
            self._watch_losses = min(self._watch_losses + 1, 10)
            log.debug("%r: %s; reading again", self, exc)
            time.sleep(min(0.01 * 2**self._watch_losses, 1.0, deadline.remaining()))
        finally:
            batches.close()  # cancels the gRPC stream at once

    def _name_of(self, etcd_key: bytes) -> str | None:
        if etcd_key.startswith(self._values):
            return etcd_key[len(self._values) :].decode("utf-8", "replace")
        return self._queue_name(etcd_key)

    # ----------------------------------------------------------------- exactly-once writes
    # A transaction that compares (add, append, compare_set, queue_pop) or reports what it
    # did (delete_key) must not be applied twice, yet the request can die mid-flight (the
    # member in use crashes; a follower's proposal times out when the leader dies) and then
    # it may or may not have been applied -- and may even still be applied later.
    # Each client therefore owns a session key ``P + "s/" + uuid`` (on a lease, so a dead
    # client's key expires). Every guarded transaction also compares the session key with
    # its last value and, on success, writes a new sequence number into it. After an
    # ambiguous failure the client *fences*: a transaction that moves the session key on
    # if and only if it still holds the old value. If the fence succeeds, the lost
    # transaction was not applied and never can be (its compare now fails); if the session
    # key holds the lost transaction's number, it was applied. Either way the client knows,
    # so these operations ride through the loss of an endpoint like reads and puts do.

    def _session_ready(self) -> bytes:
        """The session key's current value, (re)creating or renewing its lease when due.
        Called with the session lock held."""
        now = time.monotonic()
        if self._session_value is not None and now - self._session_renewed < _SESSION_TTL / 2:
            return self._session_value
        if self._session_value is not None and self._client.lease_keepalive(
            self._session_lease, self._deadline()
        ):
            self._session_renewed = now
            return self._session_value
        grant = etcdrpc.LeaseGrantRequest(TTL=_SESSION_TTL, ID=0)
        self._session_lease = int(self._unary("Lease", "LeaseGrant", grant, "session").ID)
        self._session_seq += 1
        value = b"%d" % self._session_seq
        put = etcdrpc.PutRequest(key=self._session_key, value=value, lease=self._session_lease)
        self._unary("KV", "Put", put, "session")
        self._session_value, self._session_renewed = value, now
        return value

    def _guarded(
        self,
        compare: list[Any],
        success: list[Any],
        failure: list[Any],
        what: str,
        build: Callable[[Any, Any], tuple[list[Any], list[Any], list[Any]]] | None = None,
    ) -> tuple[bool, Any, int]:
        """Run a transaction exactly once (see above). Returns ``(succeeded, response,
        revision)``; ``response`` is None when the outcome was recovered after a lost
        request (then the caller reads what it needs again), ``revision`` is the
        transaction's revision when it succeeded. ``build(session_compare, session_put)``,
        when given, returns (compare, success, failure) instead (for nested transactions that
        must move the session key too)."""
        with self._session_lock:
            while True:
                try:
                    current = self._session_ready()
                    same, move, read = self._session_ops(current)
                    if build is not None:
                        compare, success, failure = build(same, move)
                    response = self._txn([*compare, same], [*success, move], [*failure, read], what)
                except NetworkError as exc:
                    if "may or may not have been applied" not in str(exc):
                        raise
                    applied, revision = self._fence(current, what)
                    log.warning(
                        "%r: %s lost mid-flight (%s); recovered: %s",
                        self,
                        what,
                        exc,
                        "it was applied" if applied else "it was not applied",
                    )
                    return applied, None, revision
                except StoreError as exc:
                    if "lease not found" not in str(exc):
                        raise
                    self._session_value = None  # the session lapsed: start a new one
                    continue
                moved = self._session_moved(response)
                if response.succeeded or moved:
                    self._session_value = self._pending
                    return True, response, response.header.revision
                held = response.responses[-1].response_range.kvs
                if not held or held[0].value != current:
                    self._session_value = None  # lapsed or disturbed: retry in a new one
                    continue
                return False, response, 0

    def _session_ops(self, current: bytes) -> tuple[Any, Any, Any]:
        """(compare, put, read) of the session key for one guarded transaction."""
        self._session_seq += 1
        self._pending = b"%d" % self._session_seq
        return (
            _CMP(key=self._session_key, target=_CMP.VALUE, result=_CMP.EQUAL, value=current),
            _put(self._session_key, self._pending, self._session_lease),
            _range(self._session_key),
        )

    def _session_moved(self, response: Any) -> bool:
        """Whether a nested transaction in the failure branch succeeded (compare_set)."""
        for item in response.responses:
            if item.WhichOneof("response") == "response_txn" and item.response_txn.succeeded:
                return True
        return False

    def _fence(self, current: bytes, what: str) -> tuple[bool, int]:
        """After a lost guarded transaction: (was it applied, its revision)."""
        lost = self._pending
        self._session_seq += 1
        fence = b"%d" % self._session_seq
        compare = _CMP(key=self._session_key, target=_CMP.VALUE, result=_CMP.EQUAL, value=current)
        response = self._txn(
            [compare],
            [_put(self._session_key, fence, self._session_lease)],
            [_range(self._session_key)],
            f"{what} (recovery)",
            idempotent=True,  # a repeated fence finds its own value and says "not applied"
        )
        if response.succeeded:
            self._session_value = fence
            return False, 0
        held = response.responses[0].response_range.kvs
        if held and held[0].value == lost:
            self._session_value = lost
            return True, int(held[0].mod_revision)
        self._session_value = None if not held else bytes(held[0].value)
        if held and held[0].value == fence:
            return False, 0
        raise StoreError(
            f"etcd {what}: the session key {self._session_key!r} was changed by someone else "
            "while the outcome of a lost request was being recovered"
        )

    def _modify(self, key: str, update: Any, what: str) -> tuple[bytes, int]:
        """Read-modify-write ``key`` with ``update(old value or None) -> new value`` in a
        transaction guarded by the mod revision; returns (new value, revision)."""
        vkey = self._vkey(key)
        old, mod = self._seen.get(vkey, (None, 0))
        while True:
            new = update(old)
            done, response, revision = self._guarded(
                [_mod_is(vkey, mod)], [_put(vkey, new)], [_range(vkey)], f"{what} {key!r}"
            )
            if done:
                self._remember(vkey, new, revision)
                return new, revision
            if response is None:
                response = self._unary("KV", "Range", etcdrpc.RangeRequest(key=vkey), what)
                kvs = response.kvs
            else:
                kvs = response.responses[0].response_range.kvs
            old, mod = (kvs[0].value, kvs[0].mod_revision) if kvs else (None, 0)

    # ----------------------------------------------------------------- core
    def set(
        self,
        key: str | bytes,
        value: ValueLike,
        *,
        ttl: TimeoutLike | None = None,
        lease: EtcdLease | None = None,
    ) -> None:
        """Insert or overwrite ``key`` (same semantics as ``torch.distributed.Store.set``).

        Extensions: ``ttl`` (seconds or timedelta) is an alias of :meth:`set_lease` (kept
        for existing callers): the key expires ``ttl`` after this call; ``lease`` attaches
        the key to an existing :class:`EtcdLease` (keys expire together, kept alive by
        :meth:`EtcdLease.refresh`). Overwriting a key without ttl/lease makes it permanent.
        Raises TypeError/ValueError for bad arguments (:func:`~rdzv.store.base.check_ttl`),
        ValueError if both are given, :class:`LeaseExpiredError` for an expired ``lease``.
        """
        if ttl is not None and lease is not None:
            raise ValueError("set: pass ttl or lease, not both")
        if ttl is not None:
            self.set_lease(key, value, ttl)
            return
        if lease is not None and not isinstance(lease, EtcdLease):
            raise TypeError(f"set: lease must be an EtcdLease, got {type(lease).__name__}")
        self._put(key_to_str(key), value_to_bytes(value), 0 if lease is None else lease.id)

    def _set(self, key: str, value: bytes) -> None:
        self._put(key, value, 0)

    def _set_lease(self, key: str, value: bytes, ttl: float) -> None:
        # Store.set_lease: a new lease of ttl rounded up to whole seconds (etcd raises it to
        # its minimum TTL), then one Put attached to it.
        self._put(key, value, self.lease(ttl).id)

    def _put(self, key: str, value: bytes, lease_id: int) -> None:
        request = etcdrpc.PutRequest(key=self._vkey(key), value=value, lease=lease_id)
        try:
            self._unary("KV", "Put", request, f"set {key!r}")
        except StoreError as exc:
            if "lease not found" in str(exc):
                raise LeaseExpiredError(
                    f"set {key!r}: etcd lease {lease_id:#x} has expired or was revoked"
                ) from None
            raise

    def lookup(self, keys: Sequence[str | bytes]) -> list[bytes | None]:
        """Extension: the values of ``keys`` now (None for an absent key), without waiting;
        one transaction per ``max_txn_ops`` keys."""
        key_list = keys_to_list(keys)
        if not key_list:
            return []
        _, values, _ = self._read(list(dict.fromkeys(key_list)), queues=False)
        return [values.get(k) for k in key_list]

    def lease(self, ttl: TimeoutLike) -> EtcdLease:
        """Grant a new etcd lease of ``ttl`` (seconds or timedelta, rounded up to whole
        seconds; etcd raises TTLs below its minimum). Keys set with ``lease=`` expire with
        it unless it is refreshed. Raises TypeError/ValueError for a bad ttl
        (:func:`~rdzv.store.base.check_ttl`)."""
        seconds = _ttl_seconds(ttl)
        response = self._unary(
            "Lease", "LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=seconds, ID=0), "lease grant"
        )
        if response.error:
            raise StoreError(f"etcd refused a {seconds} s lease: {response.error}")
        return EtcdLease(self, int(response.ID), int(response.TTL))

    def _get(self, key: str, timeout: float) -> bytes:
        return self._await([key], timeout, "get", queues=False)[key]

    def _multi_get(self, keys: list[str], timeout: float) -> list[bytes]:
        found = self._await(keys, timeout, "multi_get", queues=False)
        return [found[k] for k in keys]

    def _wait(self, keys: list[str], timeout: float) -> None:
        self._await(keys, timeout, "wait", queues=True)

    def _check(self, keys: list[str]) -> bool:
        if not keys:
            return True
        _, values, queued = self._read(list(dict.fromkeys(keys)), queues=True)
        return all(k in values or k in queued for k in keys)

    def _add(self, key: str, amount: int) -> int:
        return self._add_with_revision(key, amount)[0]

    def _add_with_revision(self, key: str, amount: int) -> tuple[int, int]:
        bkey = key.encode("utf-8")

        def update(old: bytes | None) -> bytes:
            total = amount if old is None else parse_counter(bkey, old) + amount
            if not INT64_MIN <= total <= INT64_MAX:
                raise CounterError(
                    f"add: {old!r} + {amount} under key {show_key(bkey)} overflows int64 "
                    f"(limit {INT64_MAX if total > 0 else INT64_MIN})"
                )
            return format_counter(total)

        new, revision = self._modify(key, update, "add")
        return int(new), revision

    def _append(self, key: str, value: bytes) -> None:
        self._modify(key, lambda old: value if old is None else old + value, "append")

    def _compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        vkey = self._vkey(key)
        what = f"compare_set {key!r}"
        absent = _CMP(key=vkey, target=_CMP.VERSION, result=_CMP.EQUAL, version=0)
        empty = _CMP(key=vkey, target=_CMP.VALUE, result=_CMP.EQUAL, value=b"")
        while True:
            if expected:
                value_is = _CMP(key=vkey, target=_CMP.VALUE, result=_CMP.EQUAL, value=expected)
                done, response, _ = self._guarded(
                    [value_is], [_put(vkey, desired)], [_range(vkey)], what
                )
                if done:
                    return desired
                if response is not None:
                    kvs = response.responses[0].response_range.kvs
                    return bytes(kvs[0].value) if kvs else expected
                continue  # not applied (recovered): decide again on fresh data

            # Empty expected: create the key if absent, else swap if its value is empty
            # (a nested transaction, which moves the session key as well).
            def build(same: Any, move: Any) -> tuple[list[Any], list[Any], list[Any]]:
                inner = etcdrpc.TxnRequest(
                    compare=[empty, same],
                    success=[_put(vkey, desired), move],
                    failure=[_range(vkey)],
                )
                return [absent], [_put(vkey, desired)], [etcdrpc.RequestOp(request_txn=inner)]

            done, response, _ = self._guarded([], [], [], what, build)
            if done:
                return desired
            if response is not None:
                kvs = response.responses[0].response_txn.responses[0].response_range.kvs
                if kvs:
                    return bytes(kvs[0].value)

    def _delete_key(self, key: str) -> bool:
        vkey = self._vkey(key)
        delete = etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=vkey))
        _, response, revision = self._guarded([], [delete], [], f"delete_key {key!r}")
        if response is not None:
            return bool(response.responses[0].response_delete_range.deleted)
        # Applied, but the reply was lost: did the key exist just before our revision?
        before = etcdrpc.RangeRequest(key=vkey, count_only=True, revision=revision - 1)
        return bool(self._unary("KV", "Range", before, "delete_key").count)

    def _count(self, start: bytes, end: bytes, what: str) -> int:
        request = etcdrpc.RangeRequest(key=start, range_end=end, count_only=True)
        return int(self._unary("KV", "Range", request, what).count)

    def _num_keys(self) -> int:
        return self._count(self._values, prefix_range_end(self._values), "num_keys")

    def _list_keys(self) -> list[str]:
        keys: list[str] = []
        start, end, revision = self._values, prefix_range_end(self._values), 0
        cut = len(self._values)
        while True:
            request = etcdrpc.RangeRequest(
                key=start, range_end=end, keys_only=True, limit=_LIST_PAGE, revision=revision
            )
            response = self._unary("KV", "Range", request, "list_keys")
            revision = revision or response.header.revision
            keys.extend(kv.key[cut:].decode("utf-8", "replace") for kv in response.kvs)
            if not response.more or not response.kvs:
                return keys
            start = response.kvs[-1].key + b"\0"

    def _multi_set(self, keys: list[str], values: list[bytes]) -> None:
        batch: list[Any] = []
        size = 0
        for key, value in zip(keys, values, strict=True):
            vkey = self._vkey(key)
            cost = len(vkey) + len(value) + 16
            if batch and (len(batch) >= self._max_txn_ops or size + cost > self._max_request_bytes):
                self._txn([], batch, [], "multi_set", idempotent=True)
                batch, size = [], 0
            batch.append(_put(vkey, value))
            size += cost
        if batch:
            self._txn([], batch, [], "multi_set", idempotent=True)

    def _barrier(self, key: str, world_size: int, timeout: float) -> None:
        deadline = Deadline(timeout)
        count, revision = self._add_with_revision(key, 1)
        target = -(-count // world_size) * world_size
        vkey, bkey = self._vkey(key), key.encode("utf-8")
        while count < target:
            if deadline.remaining() <= 0:
                raise self._timeout_error("barrier", [key], timeout)
            with self._watching([(vkey, b"")], revision, deadline) as batches:
                for events in batches:
                    for event in events:
                        if event.type == _PUT:
                            count = max(count, parse_counter(bkey, event.kv.value))
                            revision = max(revision, event.kv.mod_revision)
                    if count >= target:
                        return
            response = self._unary("KV", "Range", etcdrpc.RangeRequest(key=vkey), "barrier")
            revision = response.header.revision
            if response.kvs:
                count = max(count, parse_counter(bkey, response.kvs[0].value))

    # ----------------------------------------------------------------- queues
    def _queue_push(self, key: str, value: bytes) -> None:
        item = self._qprefix(key) + uuid.uuid4().hex.encode("ascii")
        self._guarded([], [_put(item, value)], [], f"queue_push {key!r}")

    def _queue_pop(self, key: str, timeout: float | None) -> bytes:
        qp = self._qprefix(key)
        end = prefix_range_end(qp)
        deadline = Deadline(0.0 if timeout is None else timeout)
        oldest = etcdrpc.RangeRequest(
            key=qp,
            range_end=end,
            limit=1,
            sort_order=etcdrpc.RangeRequest.ASCEND,
            sort_target=etcdrpc.RangeRequest.CREATE,
        )
        while True:
            response = self._unary("KV", "Range", oldest, f"queue_pop {key!r}")
            if response.kvs:
                kv = response.kvs[0]
                delete = etcdrpc.RequestOp(
                    request_delete_range=etcdrpc.DeleteRangeRequest(key=kv.key)
                )
                taken, _, _ = self._guarded(
                    [_mod_is(kv.key, kv.mod_revision)], [delete], [], f"queue_pop {key!r}"
                )
                if taken:
                    return bytes(kv.value)
                continue  # another popper took it: look again at once
            if timeout is None:
                raise QueueEmptyError(f"queue_pop: queue {key!r} is empty on {self!r}")
            if deadline.remaining() <= 0:
                raise self._timeout_error("queue_pop", [key], timeout)
            with self._watching([(qp, end)], response.header.revision, deadline) as batches:
                for events in batches:
                    if any(e.type == _PUT for e in events):
                        break

    def _queue_len(self, key: str) -> int:
        qp = self._qprefix(key)
        return self._count(qp, prefix_range_end(qp), f"queue_len {key!r}")
