"""The global backend registry: built-ins, lazy creators and out-of-tree plug-ins installed
for real (a dist-info directory put on sys.path, found by importlib.metadata)."""

from __future__ import annotations

import logging
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from rdzv.rendezvous import registry
from rdzv.rendezvous.api import (
    RendezvousHandler,
    RendezvousParameters,
    rendezvous_handler_registry,
)
from rdzv.rendezvous.static import StaticTCPRendezvous
from tests.etcd_fixtures import EtcdMember, fresh_prefix
from tests.plugins import make_distribution
from tests.ports import reserved_port

# A plug-in module: an rdzv handler whose backend name is given by the creator.
HANDLER_MODULE = textwrap.dedent(
    """
    from rdzv import HashStore
    from rdzv.rendezvous.api import RendezvousHandler, RendezvousInfo

    class Handler(RendezvousHandler):
        def __init__(self, params):
            self.params = params
        def get_backend(self):
            return self.params.backend
        def next_rendezvous(self):
            return RendezvousInfo(HashStore(), 0, 1, None)
        def is_closed(self):
            return False
        def set_closed(self):
            pass
        def num_nodes_waiting(self):
            return 0
        def get_run_id(self):
            return self.params.run_id
        def shutdown(self):
            return True

    def create(params):
        return Handler(params)

    def torch_style():
        return create

    def returns_string():
        return ""
    """
)


@pytest.fixture(autouse=True)
def _restore_registry() -> Iterator[None]:
    saved = dict(rendezvous_handler_registry._registry)
    saved_loaded = set(registry._loaded)
    yield
    rendezvous_handler_registry._registry.clear()
    rendezvous_handler_registry._registry.update(saved)
    registry._loaded.clear()
    registry._loaded.update(saved_loaded)


def params(backend: str, endpoint: str = "localhost:1", **config: object) -> RendezvousParameters:
    return RendezvousParameters(backend, endpoint, "run1", 1, 1, **config)


def install(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    entry_points: dict[str, dict[str, str]],
    modules: dict[str, str] | None = None,
) -> Path:
    root = make_distribution(tmp_path / name, name, entry_points, modules)
    monkeypatch.syspath_prepend(str(root))
    return root


# --------------------------------------------------------------------------- built-ins
def test_default_backends_are_registered() -> None:
    assert {"static", "c10d", "etcd"} <= set(rendezvous_handler_registry.backends())
    registry.register_default_handlers()  # idempotent


def test_static_through_the_registry() -> None:
    handler = registry.get_rendezvous_handler(params("static", "127.0.0.1:29999", rank=0))
    assert isinstance(handler, StaticTCPRendezvous)
    assert handler.get_backend() == "static"


def test_lazy_creator_reports_a_missing_backend_module() -> None:
    creator = registry._lazy_creator(
        "rdzv.rendezvous.not_here", "create", "ghost", "Use the 'static' backend."
    )
    with pytest.raises(
        ValueError,
        match=r"The rendezvous backend 'ghost' is not available: module rdzv.rendezvous.not_here "
        r"is missing from this installation of rdzv. Use the 'static' backend.",
    ):
        creator(params("ghost"))


def test_lazy_creator_keeps_errors_of_the_backend_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The module exists but one of its own imports is missing: that error must surface.
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "brokenbackend.py").write_text("import a_dependency_that_is_not_installed\n")
    creator = registry._lazy_creator("brokenbackend", "create", "broken", "")
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed"):
        creator(params("broken"))


def test_unknown_backend_lists_known_ones() -> None:
    with pytest.raises(ValueError) as info:
        registry.get_rendezvous_handler(params("nope"))
    # torch's sentence, anchored (what unittest's assertRaisesRegex sees: str(exc)).
    assert re.match(
        r"^The rendezvous backend 'nope' is not registered. Did you forget to call "
        r"`register`\?$",
        str(info.value),
    )
    notes = getattr(info.value, "__notes__", [])
    assert sys.version_info < (3, 11) or any(
        "Known backends:" in n and "c10d" in n and "static" in n for n in notes
    )


# --------------------------------------------------------------------------- plug-ins
def test_rdzv_group_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry.load_plugins()
    assert "mybackend" not in rendezvous_handler_registry.backends()
    install(
        tmp_path,
        monkeypatch,
        "rdzv-plugin",
        {registry.RDZV_ENTRY_POINT_GROUP: {"mybackend": "rdzvplugin:create"}},
        {"rdzvplugin.py": HANDLER_MODULE},
    )
    # get_rendezvous_handler loads plug-ins when the backend is unknown.
    handler = registry.get_rendezvous_handler(params("mybackend", k="v"))
    assert type(handler).__module__ == "rdzvplugin"
    assert handler.get_backend() == "mybackend"
    assert handler.params.config == {"k": "v"}  # type: ignore[attr-defined]


def test_torchrun_group_plugin_torch_semantics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(
        tmp_path,
        monkeypatch,
        "torch-style-plugin",
        {registry.TORCHRUN_ENTRY_POINT_GROUP: {"tsbackend": "tsplugin:torch_style"}},
        {"tsplugin.py": HANDLER_MODULE},
    )
    registry.load_plugins()
    assert "tsbackend" in rendezvous_handler_registry.backends()
    handler = registry.get_rendezvous_handler(params("tsbackend", k="v"))
    assert isinstance(handler, RendezvousHandler)
    # The torch-style creator received torch's RendezvousParameters.
    received = handler.params  # type: ignore[attr-defined]
    assert type(received).__module__.startswith("torch.distributed.elastic.rendezvous")
    assert (received.backend, received.run_id, received.config) == ("tsbackend", "run1", {"k": "v"})


def test_torchrun_plugin_returning_a_torch_handler_is_adapted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = textwrap.dedent(
        """
        import torch.distributed as dist
        from torch.distributed.elastic.rendezvous import api

        class TorchHandler(api.RendezvousHandler):
            def __init__(self, params):
                self.params = params
                self.store = dist.HashStore()
            def get_backend(self):
                return self.params.backend
            def next_rendezvous(self):
                return api.RendezvousInfo(
                    self.store, 0, 1, api.RendezvousStoreInfo("127.0.0.1", 1234))
            def is_closed(self):
                raise api.RendezvousClosedError("closed for good")
            def set_closed(self):
                pass
            def num_nodes_waiting(self):
                return 3
            def get_run_id(self):
                return self.params.run_id
            def shutdown(self):
                return True

        def factory():
            return TorchHandler
        """
    )
    install(
        tmp_path,
        monkeypatch,
        "torch-handler-plugin",
        {registry.TORCHRUN_ENTRY_POINT_GROUP: {"torchy": "torchyplugin:factory"}},
        {"torchyplugin.py": module},
    )
    from rdzv.errors import RendezvousClosedError
    from rdzv.interop.torch import RdzvHandlerFromTorch, StoreFromTorch

    handler = registry.get_rendezvous_handler(params("torchy"))
    assert isinstance(handler, RdzvHandlerFromTorch)
    info = handler.next_rendezvous()
    assert isinstance(info.store, StoreFromTorch)
    info.store.set("k", b"v")
    assert handler.torch_handler.store.get("k") == b"v"  # type: ignore[attr-defined]
    assert (info.rank, info.world_size) == (0, 1)
    assert info.bootstrap_store_info is not None
    assert (info.bootstrap_store_info.master_addr, info.bootstrap_store_info.master_port) == (
        "127.0.0.1",
        1234,
    )
    assert handler.num_nodes_waiting() == 3
    with pytest.raises(RendezvousClosedError, match="closed for good"):
        handler.is_closed()


def test_broken_plugins_are_logged_and_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    install(
        tmp_path,
        monkeypatch,
        "mixed-plugins",
        {
            registry.RDZV_ENTRY_POINT_GROUP: {
                "good": "goodplugin:create",
                "importfails": "no_such_module_here:create",
                "notcallable": "goodplugin:NOT_CALLABLE",
                "static": "goodplugin:create",  # taken by the built-in
            },
            # torch's own test package does this: the factory returns "".
            registry.TORCHRUN_ENTRY_POINT_GROUP: {"testbackend": "goodplugin:returns_string"},
        },
        {"goodplugin.py": HANDLER_MODULE + "\nNOT_CALLABLE = 42\n"},
    )
    static_creator = rendezvous_handler_registry._registry["static"]
    with caplog.at_level(logging.WARNING, logger="rdzv.rendezvous.registry"):
        registry.load_plugins()
    backends = rendezvous_handler_registry.backends()
    assert "good" in backends
    assert not {"importfails", "notcallable", "testbackend"} & set(backends)
    assert rendezvous_handler_registry._registry["static"] is static_creator
    warned = {r.getMessage().split("'")[1] for r in caplog.records}
    assert warned == {"importfails", "notcallable", "static", "testbackend"}
    assert all(r.exc_info for r in caplog.records)


def test_loading_is_rerunnable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    install(
        tmp_path,
        monkeypatch,
        "rerun-plugin",
        {
            registry.RDZV_ENTRY_POINT_GROUP: {"rerun1": "rerunplugin:create"},
            registry.TORCHRUN_ENTRY_POINT_GROUP: {"rerun2": "rerunplugin:torch_style"},
        },
        {"rerunplugin.py": HANDLER_MODULE},
    )
    registry.load_plugins()
    creators = {n: rendezvous_handler_registry._registry[n] for n in ("rerun1", "rerun2")}
    with caplog.at_level(logging.WARNING, logger="rdzv.rendezvous.registry"):
        registry.load_plugins()
        registry.load_plugins()
    assert caplog.records == []
    assert {n: rendezvous_handler_registry._registry[n] for n in creators} == creators


def test_plugin_added_to_the_path_later_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch's out_of_tree_rendezvous_test: absent until its directory is on sys.path.
    registry.load_plugins()
    assert "testbackend2" not in rendezvous_handler_registry.backends()
    install(
        tmp_path,
        monkeypatch,
        "late-plugin",
        {registry.RDZV_ENTRY_POINT_GROUP: {"testbackend2": "lateplugin:create"}},
        {"lateplugin.py": HANDLER_MODULE},
    )
    registry.load_plugins()
    assert "testbackend2" in rendezvous_handler_registry.backends()


def test_own_torchrun_entry_point_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # rdzv's "rdzv" entry point exposes rdzv to torchrun; loading it into rdzv's own registry
    # would be circular.
    install(
        tmp_path,
        monkeypatch,
        "rdzv-copy",
        {registry.TORCHRUN_ENTRY_POINT_GROUP: {"rdzv": "rdzv.interop.torch:torchrun_handler"}},
    )
    registry.load_plugins()
    assert "rdzv" not in rendezvous_handler_registry.backends()


def test_handler_reporting_another_backend_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = HANDLER_MODULE + textwrap.dedent(
        """
        def liar(params):
            handler = Handler(params)
            handler.get_backend = lambda: "other"
            return handler
        """
    )
    install(
        tmp_path,
        monkeypatch,
        "liar-plugin",
        {registry.RDZV_ENTRY_POINT_GROUP: {"liar": "liarplugin:liar"}},
        {"liarplugin.py": module},
    )
    with pytest.raises(
        RuntimeError,
        match=r"^The rendezvous backend 'other' does not match the requested backend 'liar'.$",
    ):
        registry.get_rendezvous_handler(params("liar"))


# --------------------------------------------------------------------------- real backends
def test_c10d_through_the_registry() -> None:
    with reserved_port() as port:
        handler = registry.get_rendezvous_handler(
            RendezvousParameters("c10d", f"127.0.0.1:{port}", "reg-c10d", 1, 1, last_call_timeout=1)
        )
        try:
            assert handler.get_backend() == "c10d"
            info = handler.next_rendezvous()
            assert (info.rank, info.world_size) == (0, 1)
            info.store.set("k", b"v")
            assert info.store.get("k") == b"v"
        finally:
            assert handler.shutdown() is True


def test_etcd_through_the_registry(etcd_member: EtcdMember) -> None:
    handler = registry.get_rendezvous_handler(
        RendezvousParameters(
            "etcd",
            etcd_member.endpoint,
            "reg-etcd",
            1,
            1,
            prefix=fresh_prefix(),
            last_call_timeout=1,
        )
    )
    try:
        assert handler.get_backend() == "etcd"
        info = handler.next_rendezvous()
        assert (info.rank, info.world_size) == (0, 1)
    finally:
        assert handler.shutdown() is True
