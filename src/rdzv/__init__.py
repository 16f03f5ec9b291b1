"""rdzv: distributed key-value stores and rendezvous for multi-process jobs.

The public names are importable from the top-level package; modules with heavier imports
(the TCP client and server, etcd, rendezvous) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from rdzv import errors
from rdzv.errors import (
    AuthError,
    ConnectionLimitError,
    CounterError,
    NetworkError,
    ProtocolError,
    QueueEmptyError,
    RdzvError,
    StoreError,
    StoreTimeoutError,
)
from rdzv.store.base import Store
from rdzv.store.hash import HashStore
from rdzv.store.prefix import PrefixStore

__version__ = "0.1.0"

# name -> module that defines it, imported lazily by __getattr__.
_LAZY = {
    "FileStore": "rdzv.store.file",
    "TCPStore": "rdzv.store.tcp",
    "AsyncTCPStore": "rdzv.store.async_tcp",
    "TLSConfig": "rdzv.tls",
    "EtcdStore": "rdzv.store.etcd",
    "register_rendezvous_handler": "rdzv.rendezvous.url",
    "connect": "rdzv.launcher.connect",
    "heartbeat": "rdzv.launcher.heartbeat",
}

__all__ = [
    "AuthError",
    "ConnectionLimitError",
    "CounterError",
    "HashStore",
    "NetworkError",
    "PrefixStore",
    "ProtocolError",
    "QueueEmptyError",
    "RdzvError",
    "Store",
    "StoreError",
    "StoreTimeoutError",
    "__version__",
    "errors",
    "rendezvous",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name == "rendezvous":
        # The subpackage, which is callable as the URL rendezvous function (the import system
        # binds it here anyway as soon as any rdzv.rendezvous module is imported).
        return importlib.import_module("rdzv.rendezvous")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rdzv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
