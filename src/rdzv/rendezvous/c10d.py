"""Creators of the built-in dynamic-rendezvous backends (the ``c10d`` backend, a slot for
``etcd``), with torch's configuration keys.

``c10d``: the dynamic rendezvous (:mod:`rdzv.rendezvous.dynamic`) on a TCPStore at the
rendezvous endpoint (default port 29400), or on a FileStore (``store_type=file``). The first
agent on the endpoint's host serves the TCPStore; the others connect to it. The workers are
told to share that server (``MASTER_ADDR``/``MASTER_PORT`` name it; torch's
``use_agent_store``), unless ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``.

The registry (:mod:`rdzv.rendezvous.registry`) imports this module only when a ``c10d``
handler is created; :func:`register_builtin_backends` registers the creators on any
:class:`~rdzv.rendezvous.api.RendezvousHandlerRegistry`.
"""

from __future__ import annotations

import binascii
import importlib
import logging
import os
import tempfile
from base64 import b64decode, b64encode
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from rdzv.errors import (
    RdzvError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousStateError,
)
from rdzv.events import NodeState, record_rdzv_event_fields
from rdzv.rendezvous.api import (
    RendezvousBackend,
    RendezvousHandler,
    RendezvousHandlerRegistry,
    RendezvousParameters,
    Token,
)
from rdzv.rendezvous.dynamic import DynamicRendezvousHandler, create_handler
from rdzv.store.base import Store
from rdzv.store.file import FileStore
from rdzv.store.tcp import TCPStore

__all__ = [
    "C10D_DEFAULT_PORT",
    "DEFAULT_PORT",
    "DEFAULT_READ_TIMEOUT",
    "C10dRendezvousBackend",
    "create_backend",
    "create_c10d_handler",
    "create_c10d_store",
    "register_builtin_backends",
]

logger = logging.getLogger("rdzv.rendezvous.c10d")

#: The default port of the c10d rendezvous endpoint (torch's ``DEFAULT_PORT``; read at
#: each call, so patching it works as with torch).
DEFAULT_PORT = 29400
C10D_DEFAULT_PORT = DEFAULT_PORT
#: The default timeout of store operations of the c10d backend, in seconds.
DEFAULT_READ_TIMEOUT = 60

_CONNECTION_FAILED = "The connection to the C10d store has failed. See inner exception for details."


def _record_failure(params: RendezvousParameters, exc: BaseException) -> None:
    record_rdzv_event_fields(
        "backends.create_c10d_handler",
        params.run_id,
        f"{type(exc).__name__}: {exc}",
        NodeState.FAILED,
    )


def _read_timeout(params: RendezvousParameters) -> int:
    timeout = params.get_as_int("read_timeout", DEFAULT_READ_TIMEOUT)
    assert timeout is not None
    if timeout <= 0:
        raise ValueError("The read timeout must be a positive integer.")
    return timeout


def _security_options(params: RendezvousParameters) -> dict[str, Any]:
    """TCPStore keyword arguments from the ``token_file`` and ``tls_*`` config keys."""
    options: dict[str, Any] = {}
    token_file = params.get("token_file")
    if token_file:
        options["token_file"] = str(token_file)
    tls_keys = ("tls_ca", "tls_cert", "tls_key", "tls_server_hostname")
    tls = {key[4:]: str(params.get(key)) for key in tls_keys if params.get(key)}
    if tls:
        from rdzv.tls import TLSConfig

        options["tls"] = TLSConfig(**tls)
    return options


def _tcp_store(params: RendezvousParameters, timeout: int) -> tuple[Store, tuple[str, int]]:
    from rdzv.rendezvous.utils import (
        matches_machine_hostname,
        parse_rendezvous_endpoint,
    )

    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=DEFAULT_PORT)
    security = _security_options(params)
    explicit = params.get_as_bool("is_host")
    if "tls" in security:
        # TLS needs a server certificate: the store is an external `rdzv serve --tls-cert`.
        if explicit:
            raise ValueError(
                "is_host=true cannot be combined with tls_* keys: run the TLS server with "
                "`rdzv serve --tls-cert ...` at the rendezvous endpoint"
            )
        explicit = False
    is_host = matches_machine_hostname(host) if explicit is None else explicit
    read_timeout = timedelta(seconds=timeout)
    if is_host:
        try:
            server = TCPStore(
                host, port, is_master=True, multi_tenant=True, timeout=read_timeout, **security
            )
        except (OSError, RuntimeError, ValueError) as exc:
            if explicit:
                raise RendezvousConnectionError(_CONNECTION_FAILED) from exc
            # Another agent of this host serves the endpoint already: be its client.
            logger.info("the endpoint %s:%d is served already; connecting as a client", host, port)
        else:
            msg = f"Process {os.getpid()} hosts the TCP store for the C10d rendezvous backend."
            logger.info(msg)
            record_rdzv_event_fields(
                "backends.create_c10d_handler", params.run_id, msg, NodeState.INIT
            )
            return server, (host, server.port)
    try:
        client = TCPStore(host, port, is_master=False, timeout=read_timeout, **security)
    except (OSError, RuntimeError, ValueError) as exc:
        raise RendezvousConnectionError(_CONNECTION_FAILED) from exc
    return client, (host, client.port)


def _file_store(params: RendezvousParameters) -> Store:
    path = params.endpoint.strip()
    if not path:
        try:
            fd, path = tempfile.mkstemp()
        except OSError as exc:
            raise RendezvousError(
                "The file creation for C10d store has failed. See inner exception for details."
            ) from exc
        os.close(fd)
    try:
        return FileStore(path)  # torch's default timeout (300 s), not the read timeout
    except (OSError, RuntimeError, ValueError) as exc:
        raise RendezvousConnectionError(_CONNECTION_FAILED) from exc


def create_c10d_store(params: RendezvousParameters) -> tuple[Store, tuple[str, int] | None]:
    """The store of a ``c10d`` rendezvous and the endpoint to publish as MASTER_ADDR/PORT.

    Config: ``store_type`` (``tcp`` default | ``file``, case-insensitive), ``read_timeout``
    (seconds, default 60, > 0; the TCPStore's timeout: a FileStore keeps the default 300 s,
    as in torch), ``is_host`` (bool; default: whether the endpoint's host is
    this machine, and then fall back to a client if the port is served already).
    Security (rdzv only, ``docs/security.md``): ``token_file`` (shared secret; else
    ``$RDZV_TOKEN``; the hosting agent's server requires it too), ``tls_ca``, ``tls_cert``,
    ``tls_key``, ``tls_server_hostname`` (connect with TLS; the store is then an external
    ``rdzv serve --tls-cert`` server: ``is_host`` defaults to false, true is a ValueError).

    Raises ValueError for a bad store type, read timeout or endpoint;
    RendezvousConnectionError if the store cannot be created or reached.
    """
    store_type = str(params.get("store_type", "tcp")).strip().lower()
    timeout = _read_timeout(params)
    if store_type == "tcp":
        return _tcp_store(params, timeout)
    if store_type == "file":
        return _file_store(params), None
    raise ValueError("Invalid store type given. Currently only supports file and tcp.")


class C10dRendezvousBackend(RendezvousBackend):
    """torch's ``C10dRendezvousBackend``: the rendezvous state, base64-encoded, in one key
    (``torch.rendezvous.{run_id}``) of ``store``, set with compare_set; the fencing token is
    the stored base64 value. Same key, encoding and empty-state sentinel as torch's, so its
    state is interchangeable with torch's backend at the byte level (the handler refuses a
    pickled state; see :mod:`rdzv.rendezvous.backend_state`).

    Args:
        store: any rdzv Store (a Python subclass overriding the public methods included).
        run_id: the run id (non-empty; ValueError otherwise).

    Store failures raise RendezvousConnectionError("The connection to the C10d store has
    failed. See inner exception for details."); a value that is not base64 raises
    RendezvousStateError("The state object is corrupt. See inner exception for details.").
    """

    # What the key holds while there is no state (a get on a missing key would block).
    _NULL_SENTINEL = b"Y2FuaW1hZGFt"

    def __init__(self, store: Store, run_id: str) -> None:
        if not run_id:
            raise ValueError("The run id must be a non-empty string.")
        self._store = store
        self._key = "torch.rendezvous." + run_id
        self._call_store(lambda: store.compare_set(self._key, b"", self._NULL_SENTINEL))

    @property
    def name(self) -> str:
        """``"c10d"``."""
        return "c10d"

    def get_state(self) -> tuple[bytes, Token] | None:
        """See :class:`~rdzv.rendezvous.api.RendezvousBackend`."""
        return self._decode_state(self._call_store(lambda: self._store.get(self._key)))

    def set_state(
        self, state: bytes, token: Token | None = None
    ) -> tuple[bytes, Token, bool] | None:
        """See :class:`~rdzv.rendezvous.api.RendezvousBackend`. Whether the write won is
        decided by comparing the stored state with ``state`` (compare_set does not say)."""
        encoded = b64encode(state)
        if token:
            if not isinstance(token, bytes):  # not one of ours: cannot be current
                current = self.get_state()
                return None if current is None else (current[0], current[1], False)
            expected = token
        else:
            expected = self._NULL_SENTINEL
        raw = self._call_store(lambda: self._store.compare_set(self._key, expected, encoded))
        pair = self._decode_state(raw)
        if pair is None:
            return None
        return pair[0], pair[1], pair[0] == state

    def _call_store(self, op: Callable[[], bytes]) -> bytes:
        try:
            return op()
        except (RdzvError, OSError, RuntimeError, ValueError) as exc:
            raise RendezvousConnectionError(_CONNECTION_FAILED) from exc

    def _decode_state(self, raw: bytes) -> tuple[bytes, Token] | None:
        if raw == self._NULL_SENTINEL:
            return None
        try:
            state = b64decode(raw, validate=True)
        except binascii.Error as exc:
            raise RendezvousStateError(
                "The state object is corrupt. See inner exception for details."
            ) from exc
        return state, raw


def create_backend(params: RendezvousParameters) -> tuple[C10dRendezvousBackend, Store]:
    """torch's ``create_backend``: a :class:`C10dRendezvousBackend` on the store of
    :func:`create_c10d_store` (same configuration keys), and that store. Failures are
    recorded as FAILED rendezvous events and re-raised."""
    try:
        store, _ = create_c10d_store(params)
        return C10dRendezvousBackend(store, params.run_id), store
    except Exception as exc:
        _record_failure(params, exc)
        raise


def create_c10d_handler(params: RendezvousParameters) -> DynamicRendezvousHandler:
    """Create a ``c10d`` dynamic-rendezvous handler (see the module docstring).

    Takes the configuration keys of :func:`create_c10d_store` and of
    :func:`rdzv.rendezvous.dynamic.create_handler` (``join_timeout``, ``last_call_timeout``,
    ``close_timeout``, ``heartbeat_timeout``, ``keep_alive_interval``,
    ``keep_alive_max_attempt``). Failures are recorded as FAILED rendezvous events and
    re-raised.
    """
    try:
        store, endpoint = create_c10d_store(params)
        return create_handler(store, params, backend_name="c10d", master_endpoint=endpoint)
    except Exception as exc:
        _record_failure(params, exc)
        raise


def _create_etcd_handler(params: RendezvousParameters) -> RendezvousHandler:
    """The ``etcd`` backend lives in :mod:`rdzv.rendezvous.etcd` (its own module)."""
    module = importlib.import_module("rdzv.rendezvous.etcd")
    creator: Callable[[RendezvousParameters], RendezvousHandler] = module.create_etcd_handler
    return creator(params)


def register_builtin_backends(registry: RendezvousHandlerRegistry) -> None:
    """Register ``c10d`` (:func:`create_c10d_handler`) and ``etcd`` (delegating to
    ``rdzv.rendezvous.etcd.create_etcd_handler``, imported when used) on ``registry``."""
    registry.register("c10d", create_c10d_handler)
    registry.register("etcd", _create_etcd_handler)
