"""The ``etcd`` rendezvous backend: the dynamic rendezvous on etcd v3, with lease liveness.

torch's two etcd backends (``etcd`` and ``etcd-v2``) need etcd's v2 API, which etcd 3.6
removed. This backend runs rdzv's store-generic dynamic rendezvous
(:mod:`rdzv.rendezvous.dynamic`) on an :class:`~rdzv.store.etcd.EtcdStore` and replaces the
heartbeat counters by **etcd leases**: each node's liveness keys are attached to one lease of
its own, which the handler's keep-alive thread renews every ``keep_alive_interval``. When a
node dies (or is cut off) the lease runs out and *etcd* deletes the node's keys; peers see
the key gone and declare the node dead. No node ever compares its clock with another's, and
no peer has to watch a counter for staleness.

Configuration (``rdzv_conf`` keys; torch's names are accepted too):

=====================  ==================================================================
key                    meaning
=====================  ==================================================================
endpoint (parameter)   etcd client endpoints, comma-separated ``host[:port]`` (port 2379)
``protocol``           ``http`` (default) or ``https`` (case-insensitive)
``ca_cert``            CA file (also ``cacert``); enables TLS
``cert`` / ``key``     client certificate and key files (also ``ssl_cert``/``ssl_cert_key``)
``user``/``password``  etcd authentication (also ``username``)
``prefix``             etcd key prefix (also ``etcd_prefix``; default ``/rdzv/rendezvous/``);
                       the run's keys live under ``<prefix><run_id>/``
``read_timeout``       store timeout in seconds (default 60, > 0)
timeouts               ``join_timeout``, ``last_call_timeout``, ``close_timeout``,
                       ``heartbeat_timeout``, ``keep_alive_interval``,
                       ``keep_alive_max_attempt`` (as the ``c10d`` backend)
=====================  ==================================================================

The lease TTL is ``keep_alive_interval * keep_alive_max_attempt`` rounded up to whole
seconds; etcd raises TTLs below its minimum (2 s with default election settings).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time

from rdzv.errors import NetworkError, RendezvousConnectionError, RendezvousStateError
from rdzv.rendezvous.api import RendezvousParameters
from rdzv.rendezvous.dynamic import DynamicRendezvousHandler, _config_seconds, create_handler
from rdzv.rendezvous.liveness import DEAD_PREFIX, LEFT, Liveness, LivenessObserver, Status
from rdzv.store.base import Store
from rdzv.store.etcd import EtcdLease, EtcdStore, LeaseExpiredError

__all__ = ["DEFAULT_PREFIX", "EtcdLeaseLiveness", "create_etcd_handler", "create_etcd_store"]

#: Default etcd key prefix of rendezvous runs.
DEFAULT_PREFIX = "/rdzv/rendezvous/"
#: Default store timeout (seconds), torch's ``read_timeout``.
DEFAULT_READ_TIMEOUT = 60
#: Value of a live liveness key (the lease, not the value, proves liveness).
ALIVE = b"alive"

_CONNECTION_FAILED = "The connection to etcd has failed. See inner exception for details."


def _classify(key: str, value: bytes) -> Status:
    if value == ALIVE:
        return Status.ALIVE
    if value == LEFT or value.startswith(DEAD_PREFIX):
        return Status.GONE
    raise RendezvousStateError(
        f"the liveness key {key!r} holds {value[:48]!r}, which is not an etcd liveness value: "
        "the rendezvous state is corrupt or hostile"
    )


class EtcdLeaseLiveness(Liveness):
    """Liveness by etcd leases (see the module docstring).

    ``store`` must be the EtcdStore the handler uses (the liveness keys are written through
    it). One lease per instance (= per node), granted at construction, re-granted when it
    has lapsed. Args as :class:`~rdzv.rendezvous.liveness.HeartbeatLiveness`.
    """

    def __init__(
        self, store: EtcdStore, keep_alive_interval: float, keep_alive_max_attempt: int
    ) -> None:
        if not keep_alive_interval > 0:
            raise ValueError(
                f"keep_alive_interval must be > 0 seconds, got {keep_alive_interval!r}"
            )
        if keep_alive_max_attempt < 1:
            raise ValueError(f"keep_alive_max_attempt must be >= 1, got {keep_alive_max_attempt!r}")
        self._store = store
        self._requested = max(1, math.ceil(keep_alive_interval * keep_alive_max_attempt))
        self._lock = threading.Lock()
        self._lease: EtcdLease | None = store.lease(self._requested)
        self._ttl = self._lease.ttl
        self._keys: set[str] = set()

    def __repr__(self) -> str:
        return f"EtcdLeaseLiveness(ttl={self._ttl}s)"

    @property
    def expiry(self) -> float:
        """The lease TTL (seconds): how long a dead node's keys outlive it."""
        return float(self._ttl)

    def _current_lease(self) -> EtcdLease:
        with self._lock:
            if self._lease is None:
                self._lease = self._store.lease(self._requested)
                self._ttl = self._lease.ttl
            return self._lease

    def announce(self, key: str) -> list[tuple[str, bytes]]:
        """Write ``key`` attached to this node's lease (so returns no entries)."""
        for _ in range(2):
            lease = self._current_lease()
            try:
                self._store.set(key, ALIVE, lease=lease)
            except LeaseExpiredError:
                with self._lock:
                    self._lease = None  # lapsed while idle: take a new one
                continue
            with self._lock:
                self._keys.add(key)
            return []
        raise LeaseExpiredError(f"could not attach {key!r} to a fresh etcd lease")

    def keep_alive(self, store: Store, key: str) -> bool:
        with self._lock:
            lease = self._lease if key in self._keys else None
        if lease is None:
            return False
        try:
            lease.refresh()
        except LeaseExpiredError:
            # etcd deleted our keys: our peers consider us gone.
            with self._lock:
                self._lease = None
                self._keys.clear()
            return False
        value = self._store.lookup([key])[0]
        if value == ALIVE:
            return True
        with self._lock:
            self._keys.discard(key)
        if value is not None:
            _classify(key, value)  # corrupt values raise
        return False

    def retire(self, store: Store, key: str) -> bool:
        with self._lock:
            self._keys.discard(key)
        # compare_set writes LEFT without a lease: the mark outlives this node.
        current = self._store.compare_set(key, ALIVE, LEFT)
        if current == LEFT:
            return True
        if current != ALIVE:
            _classify(key, current)
        return False  # declared dead already, or deleted (compare_set returned `expected`)

    def observer(self, token: str) -> LivenessObserver:
        return _LeaseObserver(self, DEAD_PREFIX + token.encode())

    def _declare(self, key: str, marker: bytes) -> Status:
        """Mark a vanished key dead; DECLARED for exactly one caller."""
        current = self._store.compare_set(key, b"", marker)
        if current == marker:
            return Status.DECLARED
        return _classify(key, current)

    def snapshot(self, store: Store, keys: list[str], token: str) -> list[Status]:
        if not keys:
            return []
        if not self._store.check(keys):
            # A slot taken a moment ago whose owner has not written its key yet.
            with contextlib.suppress(TimeoutError):
                self._store.wait(keys, self.expiry)
        marker = DEAD_PREFIX + token.encode()
        values = self._store.lookup(keys)
        return [
            self._declare(key, marker) if value is None else _classify(key, value)
            for key, value in zip(keys, values, strict=True)
        ]


class _LeaseObserver(LivenessObserver):
    """A key that this observer saw alive and that is now gone was deleted by etcd (its
    lease ran out): declared at once. A key never seen (its owner took the slot but has not
    written it) is declared after the lease TTL of this observer's own monotonic clock."""

    def __init__(self, liveness: EtcdLeaseLiveness, marker: bytes) -> None:
        self._liveness = liveness
        self._marker = marker
        self._seen_alive: set[str] = set()
        self._missing_since: dict[str, float] = {}

    def forget(self, keys: list[str]) -> None:
        for key in keys:
            self._seen_alive.discard(key)
            self._missing_since.pop(key, None)

    def next_deadline(self) -> float | None:
        if not self._missing_since:
            return None
        return min(self._missing_since.values()) + self._liveness.expiry

    def observe(self, store: Store, keys: list[str]) -> dict[str, Status]:
        result: dict[str, Status] = {}
        now = time.monotonic()
        for key, value in zip(keys, self._liveness._store.lookup(keys), strict=True):
            if value is not None:
                status = _classify(key, value)
                self._missing_since.pop(key, None)
                if status is Status.ALIVE:
                    self._seen_alive.add(key)
                else:
                    self._seen_alive.discard(key)
                result[key] = status
                continue
            since = self._missing_since.setdefault(key, now)
            if key in self._seen_alive or now - since >= self._liveness.expiry:
                status = self._liveness._declare(key, self._marker)
                self.forget([key])
                result[key] = status
            else:
                result[key] = Status.ALIVE
        return result


def _config(params: RendezvousParameters, *names: str) -> str | None:
    for name in names:
        value = params.get(name)
        if value is not None and str(value) != "":
            return str(value)
    return None


def create_etcd_store(params: RendezvousParameters) -> EtcdStore:
    """The EtcdStore of a rendezvous run (prefix ``<prefix><run_id>/``) from launcher
    parameters (see the module docstring).

    Raises ValueError for a bad protocol, read timeout or endpoint; FileNotFoundError naming
    a missing TLS file; RendezvousConnectionError (torch's message, the cause chained) when no
    endpoint answers; AuthError for rejected credentials.
    """
    protocol = (_config(params, "protocol") or "http").strip().lower()
    if protocol not in ("http", "https"):
        raise ValueError("The protocol must be HTTP or HTTPS.")
    timeout = params.get_as_int("read_timeout", DEFAULT_READ_TIMEOUT)
    assert timeout is not None
    if timeout <= 0:
        raise ValueError("The read timeout must be a positive integer.")
    if not params.endpoint.strip():
        raise ValueError("The etcd rendezvous backend needs an endpoint (host[:port],...).")
    endpoints = [
        e if "://" in e else f"{protocol}://{e}"
        for e in (part.strip() for part in params.endpoint.split(","))
        if e
    ]
    prefix = _config(params, "prefix", "etcd_prefix") or DEFAULT_PREFIX
    if not prefix.endswith("/"):
        prefix += "/"
    try:
        return EtcdStore(
            endpoints,
            f"{prefix}{params.run_id}/",
            timeout=timeout,
            ca_cert=_config(params, "ca_cert", "cacert"),
            cert=_config(params, "cert", "ssl_cert"),
            key=_config(params, "key", "ssl_cert_key"),
            user=_config(params, "user", "username"),
            password=_config(params, "password"),
        )
    except NetworkError as exc:
        raise RendezvousConnectionError(_CONNECTION_FAILED) from exc


def create_etcd_handler(params: RendezvousParameters) -> DynamicRendezvousHandler:
    """Create an ``etcd`` dynamic-rendezvous handler: :func:`create_etcd_store` plus
    :class:`EtcdLeaseLiveness`, with the timeouts of
    :func:`rdzv.rendezvous.dynamic.create_handler`. Raises as those two."""
    for key in ("keep_alive_interval", "keep_alive_max_attempt"):
        if key in params.config and params.config[key] is None:
            raise TypeError(f"You passed '{key}=None' as a rendezvous configuration option")
    interval = _config_seconds(params, "keep_alive_interval")
    attempts = params.get_as_int("keep_alive_max_attempt", 3)
    assert attempts is not None
    store = create_etcd_store(params)
    try:
        liveness = EtcdLeaseLiveness(store, 5.0 if interval is None else interval, attempts)
        return create_handler(store, params, backend_name="etcd", liveness=liveness)
    except BaseException:
        store.close()
        raise
