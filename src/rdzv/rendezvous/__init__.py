"""Rendezvous: URL rendezvous (tcp://, file://, env://) and elastic rendezvous handlers.

``rdzv.rendezvous`` is both this package and, as in torch (``torch.distributed.rendezvous``),
the URL rendezvous function: calling the package calls :func:`rdzv.rendezvous.url.rendezvous`,
so ``rdzv.rendezvous("tcp://...")`` works whichever of the two the attribute currently holds.
Importing the package registers the built-in elastic backends (``static``, ``c10d``,
``etcd``) in :data:`~rdzv.rendezvous.api.rendezvous_handler_registry`.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from typing import Any

from rdzv.rendezvous import registry as _registry  # noqa: F401  (registers the defaults)
from rdzv.rendezvous.url import RendezvousResult, register_rendezvous_handler, rendezvous

__all__ = ["register_rendezvous_handler", "rendezvous"]


class _CallableModule(types.ModuleType):
    """This package's module type: calling it runs :func:`rendezvous`."""

    def __call__(
        self, url: str | bytes, rank: int = -1, world_size: int = -1, **kwargs: Any
    ) -> Iterator[RendezvousResult]:
        return rendezvous(url, rank, world_size, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
