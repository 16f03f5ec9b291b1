"""The global rendezvous backend registry: built-in backends and out-of-tree plug-ins.

Built-in backends (registered when :mod:`rdzv.rendezvous` is imported; each creator imports
its module only when called):

=========  ===============================================================================
``static``   :func:`rdzv.rendezvous.static.create_rdzv_handler`: fixed world, no elasticity
``c10d``     :func:`rdzv.rendezvous.c10d.create_c10d_handler`: the dynamic rendezvous over
             a TCPStore (torch's ``c10d`` backend)
``etcd``     :func:`rdzv.rendezvous.etcd.create_etcd_handler`: the dynamic rendezvous over
             etcd v3
=========  ===============================================================================

Out-of-tree backends are discovered from two entry-point groups by :func:`load_plugins`
(run on the first :func:`get_rendezvous_handler` and again whenever a backend name is
unknown, so packages added to ``sys.path`` later are found):

``rdzv.rendezvous_backends``
    rdzv's own group: the entry point's object **is** the creator
    (``RendezvousParameters -> RendezvousHandler``)::

        [project.entry-points."rdzv.rendezvous_backends"]
        mybackend = "mypkg.rdzv:create_handler"

``torchrun.handlers``
    torch's group, with torch's semantics: the loaded object is called with no argument and
    **returns** the creator. Such creators usually build torch handlers (subclasses of
    ``torch.distributed.elastic.rendezvous.RendezvousHandler``); rdzv adapts them with
    :mod:`rdzv.interop.torch` so that they return rdzv types. rdzv's own entry point in this
    group (``rdzv``, which exposes rdzv's backends *to torchrun*) is skipped.

A plug-in that fails to load, whose creator is not callable, or whose name is taken by
another creator is logged as a warning and ignored (as torch does), never fatal. Loading is
idempotent: an entry point already registered is not loaded again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from importlib import import_module
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from rdzv.rendezvous.api import (
    RendezvousHandler,
    RendezvousHandlerCreator,
    RendezvousParameters,
    rendezvous_handler_registry,
)

__all__ = [
    "RDZV_ENTRY_POINT_GROUP",
    "TORCHRUN_ENTRY_POINT_GROUP",
    "get_rendezvous_handler",
    "load_plugins",
    "register_default_handlers",
]

logger = logging.getLogger("rdzv.rendezvous.registry")

#: rdzv's entry-point group: name = backend, object = creator.
RDZV_ENTRY_POINT_GROUP = "rdzv.rendezvous_backends"
#: torch's entry-point group: name = backend, object() = creator.
TORCHRUN_ENTRY_POINT_GROUP = "torchrun.handlers"
# rdzv's own torchrun plug-in lives here; loading it into rdzv's registry would be circular.
_OWN_TORCHRUN_MODULE = "rdzv.interop.torch"
# "module:function" turning a loaded torchrun.handlers object into an rdzv creator (it adapts
# torch handlers to rdzv's types). Named, not imported: the core never imports interop, and
# the bridge (which imports torch) loads only when such a plug-in exists.
_TORCHRUN_BRIDGE = "rdzv.interop.torch:creator_from_torchrun"

_lock = threading.Lock()
# (group, name, value) of every entry point registered so far.
_loaded: set[tuple[str, str, str]] = set()
_plugins_scanned = False


def _lazy_creator(module: str, function: str, backend: str, hint: str) -> RendezvousHandlerCreator:
    """A creator that imports ``module`` on first call and delegates to ``module.function``.

    A missing module (the backend is not part of this installation) becomes a ValueError that
    says so; import errors inside the module propagate unchanged.
    """

    def create(params: RendezvousParameters) -> RendezvousHandler:
        try:
            mod = import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            raise ValueError(
                f"The rendezvous backend '{backend}' is not available: module {module} is "
                f"missing from this installation of rdzv. {hint}"
            ) from exc
        creator: Callable[[RendezvousParameters], RendezvousHandler] = getattr(mod, function)
        return creator(params)

    create.__name__ = create.__qualname__ = f"create_{backend.replace('-', '_')}_handler"
    create.__doc__ = f"Create a '{backend}' handler ({module}.{function}), imported lazily."
    return create


_DEFAULTS: dict[str, RendezvousHandlerCreator] = {
    "static": _lazy_creator(
        "rdzv.rendezvous.static",
        "create_rdzv_handler",
        "static",
        "",
    ),
    "c10d": _lazy_creator(
        "rdzv.rendezvous.c10d",
        "create_c10d_handler",
        "c10d",
        "Use the 'static' backend, or upgrade rdzv.",
    ),
    "etcd": _lazy_creator(
        "rdzv.rendezvous.etcd",
        "create_etcd_handler",
        "etcd",
        "Use the 'c10d' or 'static' backend, or upgrade rdzv.",
    ),
}


def register_default_handlers() -> None:
    """Register the built-in backends (``static``, ``c10d``, ``etcd``) in
    :data:`~rdzv.rendezvous.api.rendezvous_handler_registry`. Idempotent."""
    for name, creator in _DEFAULTS.items():
        rendezvous_handler_registry.register(name, creator)


def _torchrun_bridge() -> Callable[[Any, str], RendezvousHandlerCreator]:
    module, function = _TORCHRUN_BRIDGE.split(":")
    bridge: Callable[[Any, str], RendezvousHandlerCreator] = getattr(
        import_module(module), function
    )
    return bridge


def _register_entry_point(group: str, ep: EntryPoint) -> None:
    key = (group, ep.name, ep.value)
    if key in _loaded:
        return
    if group == TORCHRUN_ENTRY_POINT_GROUP and ep.module == _OWN_TORCHRUN_MODULE:
        return
    try:
        obj = ep.load()
        if group == TORCHRUN_ENTRY_POINT_GROUP:
            creator = _torchrun_bridge()(obj, ep.name)
        elif callable(obj):
            creator = obj
        else:
            raise TypeError(f"{obj!r} is not a handler creator")
        rendezvous_handler_registry.register(ep.name, creator)
    except Exception:
        logger.warning(
            "ignoring the out-of-tree rendezvous backend %r (entry point %s = %s in group %s)",
            ep.name,
            ep.name,
            ep.value,
            group,
            exc_info=True,
        )
        return
    _loaded.add(key)
    logger.debug("registered out-of-tree rendezvous backend %r from %s", ep.name, ep.value)


def load_plugins() -> None:
    """Register the out-of-tree backends of both entry-point groups (see the module
    docstring). Safe to call again, e.g. after extending ``sys.path``; never raises for a
    broken plug-in (it is logged and skipped)."""
    global _plugins_scanned
    with _lock:
        for group in (RDZV_ENTRY_POINT_GROUP, TORCHRUN_ENTRY_POINT_GROUP):
            for ep in entry_points(group=group):
                _register_entry_point(group, ep)
        _plugins_scanned = True


def get_rendezvous_handler(params: RendezvousParameters) -> RendezvousHandler:
    """Create the handler of ``params.backend`` from the global registry.

    Out-of-tree plug-ins are loaded on the first call, and again when the backend is not
    registered yet. Raises what the registry raises (ValueError naming the known backends
    for an unknown one, RuntimeError when the handler reports another backend name) and what
    the backend's creator raises (usually ValueError for bad parameters).
    """
    if not _plugins_scanned or params.backend not in rendezvous_handler_registry.backends():
        load_plugins()
    return rendezvous_handler_registry.create_handler(params)


register_default_handlers()
