"""PyTorch interop: store adapters, handler adapters and the ``torchrun`` plug-in.

Imported only when needed (it imports torch); nothing in rdzv's core imports it.

Stores
    :class:`TorchStore` is a real ``torch.distributed.Store`` (a Python subclass) around any
    rdzv :class:`~rdzv.store.base.Store`: ``init_process_group(store=TorchStore(s), ...)``,
    ``torch.distributed.PrefixStore(p, TorchStore(s))`` and torchelastic's agent use it like a
    native store. :class:`StoreFromTorch` is the reverse: an rdzv Store around a torch store.
    :func:`to_torch_store` / :func:`from_torch_store` pick the right one and unwrap instead of
    double-wrapping. Errors are translated (rdzv's ``StoreTimeoutError`` <-> torch's
    ``DistStoreError``, ``NetworkError`` <-> ``DistNetworkError``, ``QueueEmptyError`` <->
    ``QueueEmptyError``).

    torch keeps only the C++ half of a Python store alive: were the :class:`TorchStore`
    object garbage-collected while torch still uses it (``init_process_group(store=
    TorchStore(s))`` keeps no Python reference; neither do the clones torch makes), torch
    would fail with "Tried to call pure virtual function". So every TorchStore keeps itself
    alive until :meth:`TorchStore.release` is called (e.g. after ``destroy_process_group``).

Rendezvous handlers
    :class:`TorchRendezvousHandler` presents an rdzv handler as a torchelastic
    ``RendezvousHandler`` (torch's types, torch's exception classes);
    :class:`RdzvHandlerFromTorch` is the reverse (used by rdzv's registry for ``torchrun.
    handlers`` plug-ins).

The torchrun plug-in
    rdzv declares the entry point ``rdzv = "rdzv.interop.torch:torchrun_handler"`` in torch's
    group ``torchrun.handlers``; torch calls :func:`torchrun_handler` and registers the
    returned :func:`create_torchrun_handler` as backend ``rdzv``. So::

        torchrun --rdzv-backend rdzv --rdzv-endpoint HOST:PORT --nnodes 1:2 train.py

    runs torchelastic's agent on rdzv's dynamic rendezvous (rdzv backend ``c10d``; choose
    another rdzv backend with ``--rdzv-conf rdzv_backend=<name>``; the other ``--rdzv-conf``
    options go to that backend). The agent gets a :class:`TorchStore` and a real TCP
    endpoint (an rdzv TCPStore server, which speaks torch's protocol) in
    ``bootstrap_store_info``, so torch workers connect to it natively.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


# torchrun's entry point comes first, before torch is imported: importing this module
# imports torch.distributed.elastic.rendezvous, whose __init__ loads the torchrun.handlers
# entry points, this one included, while this module is still half-initialised.
def torchrun_handler() -> Callable[[Any], Any]:
    """The object of rdzv's ``torchrun.handlers`` entry point: torch calls it with no
    argument and registers the returned creator, which runs
    :func:`create_torchrun_handler`."""
    return _torchrun_creator


def _torchrun_creator(params: Any) -> Any:
    return create_torchrun_handler(params)


import logging
import math
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import api as torch_api

from rdzv import errors
from rdzv.rendezvous import api as rdzv_api
from rdzv.store.base import (
    Store,
    TimeoutLike,
    key_to_str,
    keys_to_list,
)

__all__ = [
    "INNER_BACKEND_OPTION",
    "RdzvHandlerFromTorch",
    "StoreFromTorch",
    "TorchRendezvousHandler",
    "TorchStore",
    "create_torchrun_handler",
    "creator_from_torchrun",
    "from_torch_store",
    "handler_from_torch",
    "handler_to_torch",
    "to_torch_store",
    "torchrun_handler",
]

logger = logging.getLogger("rdzv.interop.torch")

#: ``--rdzv-conf`` option naming the rdzv backend behind torchrun's ``rdzv`` backend.
INNER_BACKEND_OPTION = "rdzv_backend"
_DEFAULT_INNER_BACKEND = "c10d"

# torch's type stubs for c10d are incomplete: torch stores are typed as Any here.
TorchStoreType = Any
_TORCH_STORE: Any = getattr(dist, "Store")  # noqa: B009

# torch stores take timeouts as timedelta; "no limit" is sent as 10 years (torch converts to
# int64 milliseconds and nanoseconds: timedelta.max would overflow).
_FOREVER = timedelta(days=3650)


def _timedelta(seconds: float) -> timedelta:
    return _FOREVER if math.isinf(seconds) else min(timedelta(seconds=seconds), _FOREVER)


# --------------------------------------------------------------------------- error translation
@contextmanager
def _torch_store_errors() -> Iterator[None]:
    """rdzv store errors -> torch's classes (what torch code catches)."""
    try:
        yield
    except errors.QueueEmptyError as exc:
        raise dist.QueueEmptyError(str(exc)) from exc
    except errors.NetworkError as exc:
        raise dist.DistNetworkError(str(exc)) from exc
    except errors.CounterError:
        raise  # a ValueError, which is what torch's HashStore raises
    except errors.StoreError as exc:
        raise dist.DistStoreError(str(exc)) from exc


@contextmanager
def _rdzv_store_errors(op: str, keys: Sequence[str]) -> Iterator[None]:
    """torch store errors -> rdzv's classes. torch reports timeouts as DistStoreError
    (HashStore, TCPStore) or plain RuntimeError (FileStore), recognisable by their text."""
    try:
        yield
    except dist.QueueEmptyError as exc:
        raise errors.QueueEmptyError(f"{op} {list(keys)!r}: {exc}") from exc
    except dist.DistNetworkError as exc:
        raise errors.NetworkError(f"{op} {list(keys)!r}: {exc}") from exc
    except (dist.DistStoreError, RuntimeError) as exc:
        if isinstance(exc, errors.RdzvError):
            raise
        text = str(exc)
        if "timeout" in text.lower() or "timed out" in text.lower():
            raise errors.StoreTimeoutError(f"{op} {list(keys)!r}: {text}") from exc
        if isinstance(exc, dist.DistStoreError):
            raise errors.StoreError(f"{op} {list(keys)!r}: {text}") from exc
        raise


# --------------------------------------------------------------------------- stores
# Every TorchStore until released (see the module docstring: torch holds only the C++ half).
_live: dict[int, TorchStore] = {}
_live_lock = threading.Lock()


class TorchStore(_TORCH_STORE):  # type: ignore[misc]
    """A ``torch.distributed.Store`` that delegates every method to an rdzv ``store``.

    Blocking calls (``get``, ``wait`` without timeout, ``multi_get``, blocking ``queue_pop``,
    ``barrier`` without timeout) use this object's torch-side timeout (:attr:`timeout`,
    initialised from ``store.timeout``, changed with ``set_timeout``), so torch code that
    adjusts it (``init_process_group``, torchelastic's ``store_timeout``) is honoured without
    changing the rdzv store's own default. Semantics are the rdzv store's (e.g. a timeout of
    0 means "do not block"); errors are torch's classes: ``DistStoreError`` (timeouts and
    other store errors), ``DistNetworkError``, ``QueueEmptyError``, ``ValueError`` (``add`` on
    a non-integer), ``NotImplementedError`` (an operation the rdzv store lacks).
    """

    def __init__(self, store: Store) -> None:
        if not isinstance(store, Store):
            raise TypeError(f"TorchStore wraps an rdzv Store, got {type(store).__name__}")
        super().__init__()
        self._store = store
        _TORCH_STORE.set_timeout(self, _timedelta(store.timeout.total_seconds()))
        with _live_lock:
            _live[id(self)] = self

    def release(self) -> None:
        """Stop keeping this adapter alive: call it once torch no longer uses the store
        (after ``destroy_process_group``, or when the rendezvous round is over); it is then
        collected like any object once unreferenced. Idempotent; clones are released
        separately."""
        with _live_lock:
            _live.pop(id(self), None)

    def __repr__(self) -> str:
        return f"TorchStore({self._store!r})"

    @property
    def rdzv_store(self) -> Store:
        """The wrapped rdzv store."""
        return self._store

    def _seconds(self, timeout: TimeoutLike | None = None) -> float:
        value = self.timeout if timeout is None else timeout
        seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
        return max(0.0, seconds)  # torch accepts negative timeouts; rdzv reads them as 0

    def set(self, key: str | bytes, value: str | bytes) -> None:
        with _torch_store_errors():
            self._store.set(key, value)

    def get(self, key: str | bytes) -> bytes:
        with _torch_store_errors():
            return self._store.get(key, self._seconds())

    def add(self, key: str | bytes, amount: int) -> int:
        with _torch_store_errors():
            return self._store.add(key, amount)

    def append(self, key: str | bytes, value: str | bytes) -> None:
        with _torch_store_errors():
            self._store.append(key, value)

    def compare_set(
        self, key: str | bytes, expected_value: str | bytes, desired_value: str | bytes
    ) -> bytes:
        with _torch_store_errors():
            return self._store.compare_set(key, expected_value, desired_value)

    def check(self, keys: list[str]) -> bool:
        with _torch_store_errors():
            return self._store.check(keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        with _torch_store_errors():
            self._store.wait(keys, self._seconds(timeout))

    def delete_key(self, key: str | bytes) -> bool:
        with _torch_store_errors():
            return self._store.delete_key(key)

    def num_keys(self) -> int:
        with _torch_store_errors():
            return self._store.num_keys()

    # torch's C++ trampoline looks these up by their C++ names.
    deleteKey = delete_key
    getNumKeys = num_keys

    def list_keys(self) -> list[str]:
        with _torch_store_errors():
            return self._store.list_keys()

    def multi_get(self, keys: list[str]) -> list[bytes]:
        key_list = keys_to_list(keys)
        with _torch_store_errors():
            return self._store.multi_get(key_list, self._seconds())

    def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
        with _torch_store_errors():
            self._store.multi_set(keys, values)

    def queue_push(self, key: str | bytes, value: str | bytes) -> None:
        with _torch_store_errors():
            self._store.queue_push(key, value)

    def queue_pop(self, key: str | bytes, block: bool = True) -> bytes:
        with _torch_store_errors():
            return self._store._queue_pop(key_to_str(key), self._seconds() if block else None)

    def queue_len(self, key: str | bytes) -> int:
        with _torch_store_errors():
            return self._store.queue_len(key)

    def barrier(self, key: str | bytes, world_size: int, timeout: timedelta | None = None) -> None:
        with _torch_store_errors():
            self._store.barrier(key, world_size, self._seconds(timeout))

    def has_extended_api(self) -> bool:
        return self._store.has_extended_api()

    def clone(self) -> TorchStore:
        """``TorchStore(store.clone())`` with this object's timeout."""
        with _torch_store_errors():
            twin = TorchStore(self._store.clone())
        _TORCH_STORE.set_timeout(twin, self.timeout)
        return twin


class StoreFromTorch(Store):
    """An rdzv :class:`~rdzv.store.base.Store` around a ``torch.distributed.Store``.

    rdzv's timeout rules apply (``0`` = do not block: never passed to torch, where HashStore
    and FileStore read it as "forever"); :meth:`set_timeout` also sets the torch store's
    timeout (torch's blocking ``queue_pop`` only knows that one). torch's errors become
    rdzv's: timeouts (``DistStoreError`` or FileStore's ``RuntimeError``) ->
    :class:`~rdzv.errors.StoreTimeoutError`, ``DistNetworkError`` ->
    :class:`~rdzv.errors.NetworkError`, ``QueueEmptyError`` ->
    :class:`~rdzv.errors.QueueEmptyError`, ``ValueError`` of ``add`` ->
    :class:`~rdzv.errors.CounterError`.
    """

    def __init__(self, store: TorchStoreType) -> None:
        if not isinstance(store, _TORCH_STORE):
            raise TypeError(
                f"StoreFromTorch wraps a torch.distributed.Store, got {type(store).__name__}"
            )
        super().__init__(max(store.timeout, timedelta(0)))
        self._torch = store

    def __repr__(self) -> str:
        return f"StoreFromTorch({self._torch!r})"

    @property
    def torch_store(self) -> TorchStoreType:
        """The wrapped torch store."""
        return self._torch

    def set_timeout(self, timeout: TimeoutLike) -> None:
        super().set_timeout(timeout)
        self._torch.set_timeout(_timedelta(self._timeout))

    def clone(self) -> StoreFromTorch:
        with _rdzv_store_errors("clone", []):
            twin = StoreFromTorch(self._torch.clone())
        twin._timeout = self._timeout
        return twin

    def has_extended_api(self) -> bool:
        return bool(self._torch.has_extended_api())

    def _await(self, op: str, keys: list[str], timeout: float) -> None:
        """Wait for ``keys`` with rdzv timeout semantics."""
        if timeout == 0:
            with _rdzv_store_errors(op, keys):
                present = self._torch.check(keys)
            if not present:
                raise self._timeout_error(op, keys, 0)
            return
        try:
            with _rdzv_store_errors(op, keys):
                self._torch.wait(keys, _timedelta(timeout))
        except errors.StoreTimeoutError as exc:
            raise self._timeout_error(op, keys, timeout) from exc

    def _set(self, key: str, value: bytes) -> None:
        with _rdzv_store_errors("set", [key]):
            self._torch.set(key, value)

    def _get(self, key: str, timeout: float) -> bytes:
        self._await("get", [key], timeout)
        with _rdzv_store_errors("get", [key]):
            return bytes(self._torch.get(key))

    def _add(self, key: str, amount: int) -> int:
        try:
            with _rdzv_store_errors("add", [key]):
                return int(self._torch.add(key, amount))
        except ValueError as exc:
            raise errors.CounterError(f"add: the value of key {key!r} is not an int64") from exc

    def _compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        with _rdzv_store_errors("compare_set", [key]):
            return bytes(self._torch.compare_set(key, expected, desired))

    def _check(self, keys: list[str]) -> bool:
        with _rdzv_store_errors("check", keys):
            return bool(self._torch.check(keys))

    def _wait(self, keys: list[str], timeout: float) -> None:
        self._await("wait", keys, timeout)

    def _delete_key(self, key: str) -> bool:
        with _rdzv_store_errors("delete_key", [key]):
            return bool(self._torch.delete_key(key))

    def _num_keys(self) -> int:
        with _rdzv_store_errors("num_keys", []):
            return int(self._torch.num_keys())

    def _list_keys(self) -> list[str]:
        with _rdzv_store_errors("list_keys", []):
            return list(self._torch.list_keys())

    def _append(self, key: str, value: bytes) -> None:
        with _rdzv_store_errors("append", [key]):
            self._torch.append(key, value)

    def _multi_get(self, keys: list[str], timeout: float) -> list[bytes]:
        self._await("multi_get", keys, timeout)
        with _rdzv_store_errors("multi_get", keys):
            return [bytes(v) for v in self._torch.multi_get(keys)]

    def _multi_set(self, keys: list[str], values: list[bytes]) -> None:
        with _rdzv_store_errors("multi_set", keys):
            self._torch.multi_set(keys, values)

    def _barrier(self, key: str, world_size: int, timeout: float) -> None:
        with _rdzv_store_errors("barrier", [key]):
            self._torch.barrier(key, world_size, _timedelta(timeout))

    def _queue_push(self, key: str, value: bytes) -> None:
        with _rdzv_store_errors("queue_push", [key]):
            self._torch.queue_push(key, value)

    def _queue_pop(self, key: str, timeout: float | None) -> bytes:
        with _rdzv_store_errors("queue_pop", [key]):
            return bytes(self._torch.queue_pop(key, timeout is not None))

    def _queue_len(self, key: str) -> int:
        with _rdzv_store_errors("queue_len", [key]):
            return int(self._torch.queue_len(key))


def to_torch_store(store: Store) -> TorchStoreType:
    """A torch store for ``store``: the original torch store if ``store`` is a
    :class:`StoreFromTorch`, else a :class:`TorchStore`."""
    if isinstance(store, StoreFromTorch):
        return store.torch_store
    return TorchStore(store)


def from_torch_store(store: TorchStoreType) -> Store:
    """An rdzv store for ``store``: the original rdzv store if ``store`` is a
    :class:`TorchStore`, else a :class:`StoreFromTorch`."""
    if isinstance(store, TorchStore):
        return store.rdzv_store
    return StoreFromTorch(store)


# --------------------------------------------------------------------------- handlers
# rdzv error class -> torch error class; the first match wins, so subclasses come first.
_RDZV_TO_TORCH: list[tuple[type[Exception], type[Exception]]] = [
    (errors.RendezvousClosedError, torch_api.RendezvousClosedError),
    (errors.RendezvousGracefulExitError, torch_api.RendezvousGracefulExitError),
    (errors.RendezvousTimeoutError, torch_api.RendezvousTimeoutError),
    (errors.RendezvousConnectionError, torch_api.RendezvousConnectionError),
    (errors.RendezvousStateError, torch_api.RendezvousStateError),
    (errors.RendezvousError, torch_api.RendezvousError),
    (errors.StoreTimeoutError, torch_api.RendezvousTimeoutError),
    (errors.NetworkError, torch_api.RendezvousConnectionError),
]
_TORCH_TO_RDZV: list[tuple[type[Exception], type[Exception]]] = [
    (torch_cls, rdzv_cls) for rdzv_cls, torch_cls in _RDZV_TO_TORCH[:6]
]


@contextmanager
def _translated(table: list[tuple[type[Exception], type[Exception]]]) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for source, target in table:
            if isinstance(exc, source):
                raise target(*exc.args) from exc
        raise


class TorchRendezvousHandler(torch_api.RendezvousHandler):
    """An rdzv rendezvous handler presented as a torchelastic ``RendezvousHandler``.

    ``next_rendezvous()`` returns torch's ``RendezvousInfo`` whose ``store`` is a
    :class:`TorchStore` over the rdzv round store and whose ``bootstrap_store_info`` is the
    rdzv handler's. If the rdzv handler gives none, rank 0 hosts an rdzv TCPStore server on
    ``local_addr`` (or this host's FQDN) and an ephemeral port and publishes it through the
    round store (as torch's dynamic handler does), and :attr:`use_agent_store` is True.

    rdzv's rendezvous errors are raised as torch's classes with the same message
    (``RendezvousClosedError``, ``RendezvousGracefulExitError`` -- which torch's agent treats
    as a clean exit --, ``RendezvousTimeoutError``, ``RendezvousConnectionError``,
    ``RendezvousStateError``, ``RendezvousError``); a store timeout or network error while
    rendezvousing becomes ``RendezvousTimeoutError`` / ``RendezvousConnectionError``.

    Args:
        handler: the rdzv handler.
        backend: the name :meth:`get_backend` reports (torch checks it against the name the
            creator was registered under); default: the rdzv handler's.
        local_addr: address published for a self-hosted bootstrap store.
    """

    def __init__(
        self,
        handler: rdzv_api.RendezvousHandler,
        backend: str | None = None,
        local_addr: str | None = None,
    ) -> None:
        self._handler = handler
        self._backend = backend or handler.get_backend()
        self._local_addr = local_addr
        self._store: TorchStore | None = None  # keeps the Python half alive for torch
        self._server: Store | None = None
        self._bootstrap: rdzv_api.RendezvousStoreInfo | None = None

    def __repr__(self) -> str:
        return f"TorchRendezvousHandler({self._handler!r}, backend={self._backend!r})"

    @property
    def rdzv_handler(self) -> rdzv_api.RendezvousHandler:
        """The wrapped rdzv handler."""
        return self._handler

    def get_backend(self) -> str:
        return self._backend

    @property
    def use_agent_store(self) -> bool:
        return self._server is not None or self._handler.use_agent_store

    def next_rendezvous(self) -> torch_api.RendezvousInfo:
        with _translated(_RDZV_TO_TORCH):
            info = self._handler.next_rendezvous()
            bootstrap = info.bootstrap_store_info or self._self_hosted_bootstrap(info)
        # The agent and this handler hold Python references to the round's store: no need
        # for the global keep-alive (clones torch makes of it keep theirs).
        self._store = TorchStore(info.store)
        self._store.release()
        return torch_api.RendezvousInfo(
            self._store,
            info.rank,
            info.world_size,
            torch_api.RendezvousStoreInfo(bootstrap.master_addr, bootstrap.master_port),
        )

    def _self_hosted_bootstrap(self, info: rdzv_api.RendezvousInfo) -> rdzv_api.RendezvousStoreInfo:
        if self._bootstrap is None or (info.rank == 0 and self._server is None):
            port = None
            addr = self._local_addr or socket.getfqdn()
            if info.rank == 0:
                import rdzv

                self._server = rdzv.TCPStore(
                    addr, 0, None, True, wait_for_workers=False, multi_tenant=True
                )
                port = int(getattr(self._server, "port", 0))
            self._bootstrap = rdzv_api.RendezvousStoreInfo.build(
                info.rank, info.store, addr, server_port=port
            )
        return self._bootstrap

    def is_closed(self) -> bool:
        with _translated(_RDZV_TO_TORCH):
            return self._handler.is_closed()

    def set_closed(self) -> None:
        with _translated(_RDZV_TO_TORCH):
            self._handler.set_closed()

    def num_nodes_waiting(self) -> int:
        with _translated(_RDZV_TO_TORCH):
            return self._handler.num_nodes_waiting()

    def get_run_id(self) -> str:
        return self._handler.get_run_id()

    def shutdown(self) -> bool:
        with _translated(_RDZV_TO_TORCH):
            return self._handler.shutdown()


class RdzvHandlerFromTorch(rdzv_api.RendezvousHandler):
    """A torchelastic ``RendezvousHandler`` presented as an rdzv handler: torch's
    ``RendezvousInfo`` becomes rdzv's (the store through :func:`from_torch_store`) and
    torch's rendezvous errors become rdzv's classes with the same message."""

    def __init__(self, handler: torch_api.RendezvousHandler) -> None:
        self._handler = handler

    def __repr__(self) -> str:
        return f"RdzvHandlerFromTorch({self._handler!r})"

    @property
    def torch_handler(self) -> torch_api.RendezvousHandler:
        """The wrapped torch handler."""
        return self._handler

    def get_backend(self) -> str:
        return str(self._handler.get_backend())

    @property
    def use_agent_store(self) -> bool:
        return bool(self._handler.use_agent_store)

    def next_rendezvous(self) -> rdzv_api.RendezvousInfo:
        with _translated(_TORCH_TO_RDZV):
            info = self._handler.next_rendezvous()
        bootstrap = info.bootstrap_store_info
        return rdzv_api.RendezvousInfo(
            from_torch_store(info.store),
            int(info.rank),
            int(info.world_size),
            None
            if bootstrap is None
            else rdzv_api.RendezvousStoreInfo(bootstrap.master_addr, int(bootstrap.master_port)),
        )

    def is_closed(self) -> bool:
        with _translated(_TORCH_TO_RDZV):
            return bool(self._handler.is_closed())

    def set_closed(self) -> None:
        with _translated(_TORCH_TO_RDZV):
            self._handler.set_closed()  # type: ignore[no-untyped-call]

    def num_nodes_waiting(self) -> int:
        with _translated(_TORCH_TO_RDZV):
            return int(self._handler.num_nodes_waiting())

    def get_run_id(self) -> str:
        return str(self._handler.get_run_id())

    def shutdown(self) -> bool:
        with _translated(_TORCH_TO_RDZV):
            return bool(self._handler.shutdown())


def handler_to_torch(
    handler: rdzv_api.RendezvousHandler, backend: str | None = None
) -> torch_api.RendezvousHandler:
    """A torch handler for ``handler`` (unwraps a :class:`RdzvHandlerFromTorch`)."""
    if isinstance(handler, RdzvHandlerFromTorch):
        return handler.torch_handler
    return TorchRendezvousHandler(handler, backend)


def handler_from_torch(handler: Any) -> rdzv_api.RendezvousHandler:
    """An rdzv handler for the torch handler ``handler`` (unwraps a
    :class:`TorchRendezvousHandler`). Raises TypeError for anything else."""
    if isinstance(handler, TorchRendezvousHandler):
        return handler.rdzv_handler
    if isinstance(handler, rdzv_api.RendezvousHandler):
        return handler
    if not isinstance(handler, torch_api.RendezvousHandler):
        raise TypeError(
            f"expected a torch or rdzv RendezvousHandler, got {type(handler).__name__}: {handler!r}"
        )
    return RdzvHandlerFromTorch(handler)


def creator_from_torchrun(
    factory: Callable[[], Any], name: str
) -> rdzv_api.RendezvousHandlerCreator:
    """The rdzv creator of the ``torchrun.handlers`` entry point ``name`` whose loaded object
    is ``factory`` (the registry, :mod:`rdzv.rendezvous.registry`, calls this by name).

    torch's semantics: ``factory()`` returns the creator, which is called with torch's
    ``RendezvousParameters``; a torch handler it returns is adapted with
    :func:`handler_from_torch`. Raises TypeError when ``factory()`` is not callable.
    """
    creator = factory()
    if not callable(creator):
        raise TypeError(f"calling it returned {creator!r}, which is not a handler creator")

    def create(params: rdzv_api.RendezvousParameters) -> rdzv_api.RendezvousHandler:
        torch_params = torch_api.RendezvousParameters(
            params.backend,
            params.endpoint,
            params.run_id,
            params.min_nodes,
            params.max_nodes,
            params.local_addr,
            **params.config,
        )
        return handler_from_torch(creator(torch_params))

    create.__name__ = create.__qualname__ = f"torchrun_handler_{name}"
    create.__wrapped__ = creator  # type: ignore[attr-defined]
    return create


# --------------------------------------------------------------------------- torchrun plug-in
def create_torchrun_handler(params: torch_api.RendezvousParameters) -> TorchRendezvousHandler:
    """The creator torchrun calls for ``--rdzv-backend rdzv``.

    Builds rdzv :class:`~rdzv.rendezvous.api.RendezvousParameters` from torch's (same
    endpoint, run id, node bounds, local address and config), with the rdzv backend named by
    the ``rdzv_backend`` config option (default ``c10d``, rdzv's dynamic rendezvous), creates
    the handler from rdzv's registry and wraps it in a :class:`TorchRendezvousHandler` that
    reports torchrun's backend name.

    Raises ValueError for an ``rdzv_backend`` naming this plug-in itself, and what the rdzv
    backend's creator raises for bad parameters.
    """
    from rdzv.rendezvous.registry import get_rendezvous_handler

    config = dict(params.config)
    inner = str(config.pop(INNER_BACKEND_OPTION, _DEFAULT_INNER_BACKEND))
    if inner == params.backend:
        raise ValueError(
            f"--rdzv-conf {INNER_BACKEND_OPTION}={inner} names torchrun's '{params.backend}' "
            "backend itself; name an rdzv backend such as c10d or static"
        )
    rdzv_params = rdzv_api.RendezvousParameters(
        inner,
        params.endpoint,
        params.run_id,
        params.min_nodes,
        params.max_nodes,
        params.local_addr,
        **config,
    )
    handler = get_rendezvous_handler(rdzv_params)
    logger.info("torchrun backend %r uses rdzv backend %r: %r", params.backend, inner, handler)
    return TorchRendezvousHandler(handler, backend=params.backend, local_addr=params.local_addr)
