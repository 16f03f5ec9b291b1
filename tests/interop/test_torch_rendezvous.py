"""rdzv.interop.torch handler adapters and the torchrun plug-in, with real torch."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from torch.distributed.elastic.rendezvous import api as torch_api

from rdzv import HashStore, errors
from rdzv.interop.torch import (
    INNER_BACKEND_OPTION,
    RdzvHandlerFromTorch,
    TorchRendezvousHandler,
    TorchStore,
    create_torchrun_handler,
    handler_from_torch,
    handler_to_torch,
    torchrun_handler,
)
from rdzv.rendezvous.api import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
    rendezvous_handler_registry,
)
from rdzv.rendezvous.static import StaticTCPRendezvous
from tests.conftest import subprocess_env
from tests.plugins import make_distribution, rdzv_entry_points

BOOTSTRAP = RendezvousStoreInfo("10.0.0.1", 4242)


class FakeHandler(RendezvousHandler):
    """An rdzv handler with scripted answers."""

    def __init__(
        self,
        bootstrap: RendezvousStoreInfo | None = BOOTSTRAP,
        rank: int = 0,
        error: Exception | None = None,
    ) -> None:
        self.store = HashStore(timeout=5)
        self.bootstrap = bootstrap
        self.rank = rank
        self.error = error
        self.agent_store = True
        self.closed = False

    def get_backend(self) -> str:
        return "fake"

    @property
    def use_agent_store(self) -> bool:
        return self.agent_store

    def _maybe_fail(self) -> None:
        if self.error is not None:
            raise self.error

    def next_rendezvous(self) -> RendezvousInfo:
        self._maybe_fail()
        return RendezvousInfo(self.store, self.rank, 2, self.bootstrap)

    def is_closed(self) -> bool:
        self._maybe_fail()
        return self.closed

    def set_closed(self) -> None:
        self._maybe_fail()
        self.closed = True

    def num_nodes_waiting(self) -> int:
        self._maybe_fail()
        return 5

    def get_run_id(self) -> str:
        return "run9"

    def shutdown(self) -> bool:
        self._maybe_fail()
        return True


def test_torch_handler_returns_torch_types() -> None:
    fake = FakeHandler()
    handler = TorchRendezvousHandler(fake, backend="rdzv")
    assert isinstance(handler, torch_api.RendezvousHandler)
    assert handler.get_backend() == "rdzv"
    assert TorchRendezvousHandler(fake).get_backend() == "fake"
    info = handler.next_rendezvous()
    assert isinstance(info, torch_api.RendezvousInfo)
    assert isinstance(info.store, TorchStore) and isinstance(info.store, dist.Store)
    info.store.set("k", "v")
    assert fake.store.get("k") == b"v"
    assert (info.rank, info.world_size) == (0, 2)
    assert isinstance(info.bootstrap_store_info, torch_api.RendezvousStoreInfo)
    assert (info.bootstrap_store_info.master_addr, info.bootstrap_store_info.master_port) == (
        "10.0.0.1",
        4242,
    )
    assert handler.use_agent_store is True
    fake.agent_store = False
    assert handler.use_agent_store is False
    assert handler.num_nodes_waiting() == 5
    assert handler.get_run_id() == "run9"
    assert handler.is_closed() is False
    handler.set_closed()
    assert handler.is_closed() is True and fake.closed
    assert handler.shutdown() is True


def test_torch_agent_helpers_work_on_the_round_store() -> None:
    # What torch's agent does with the store: store_util.barrier and synchronize.
    from torch.distributed.elastic.utils import store as store_util

    info = TorchRendezvousHandler(FakeHandler()).next_rendezvous()
    store_util.barrier(info.store, 1, key_prefix="torchelastic/agent/terminal_state")
    assert store_util.synchronize(info.store, b"data", 0, 1, "sync/") == [b"data"]
    assert info.store.timeout == timedelta(seconds=5)


@pytest.mark.parametrize(
    ("error", "torch_class"),
    [
        (errors.RendezvousClosedError("c"), torch_api.RendezvousClosedError),
        (errors.RendezvousGracefulExitError("g"), torch_api.RendezvousGracefulExitError),
        (errors.RendezvousTimeoutError("t"), torch_api.RendezvousTimeoutError),
        (errors.RendezvousConnectionError("n"), torch_api.RendezvousConnectionError),
        (errors.RendezvousStateError("s"), torch_api.RendezvousStateError),
        (errors.RendezvousError("e"), torch_api.RendezvousError),
        (errors.StoreTimeoutError("st"), torch_api.RendezvousTimeoutError),
        (errors.NetworkError("ne"), torch_api.RendezvousConnectionError),
    ],
)
def test_rdzv_errors_become_torch_errors(error: Exception, torch_class: type[Exception]) -> None:
    handler = TorchRendezvousHandler(FakeHandler(error=error))
    for call in (
        handler.next_rendezvous,
        handler.is_closed,
        handler.set_closed,
        handler.num_nodes_waiting,
        handler.shutdown,
    ):
        with pytest.raises(torch_class) as caught:
            call()
        assert type(caught.value) is torch_class
        assert str(caught.value) == str(error)
        assert caught.value.__cause__ is error


def test_other_errors_pass_through() -> None:
    error = ValueError("bad config")
    with pytest.raises(ValueError, match="bad config") as caught:
        TorchRendezvousHandler(FakeHandler(error=error)).next_rendezvous()
    assert caught.value is error


def test_torch_errors_become_rdzv_errors() -> None:
    class TorchFailing(torch_api.RendezvousHandler):
        def get_backend(self) -> str:
            return "t"

        def next_rendezvous(self) -> Any:
            raise torch_api.RendezvousGracefulExitError("not admitted")

        def is_closed(self) -> bool:
            raise torch_api.RendezvousTimeoutError()

        def set_closed(self) -> None:
            pass

        def num_nodes_waiting(self) -> int:
            return 0

        def get_run_id(self) -> str:
            return "r"

        def shutdown(self) -> bool:
            return True

    handler = handler_from_torch(TorchFailing())
    assert isinstance(handler, RdzvHandlerFromTorch)
    with pytest.raises(errors.RendezvousGracefulExitError, match="not admitted"):
        handler.next_rendezvous()
    with pytest.raises(errors.RendezvousTimeoutError):
        handler.is_closed()


def test_handler_wrappers_unwrap() -> None:
    fake = FakeHandler()
    torch_handler = handler_to_torch(fake, "rdzv")
    assert isinstance(torch_handler, TorchRendezvousHandler)
    assert handler_from_torch(torch_handler) is fake
    assert handler_from_torch(fake) is fake
    assert handler_to_torch(RdzvHandlerFromTorch(torch_handler)) is torch_handler
    with pytest.raises(TypeError, match="expected a torch or rdzv RendezvousHandler"):
        handler_from_torch(object())


def test_self_hosted_bootstrap_store_is_native_for_torch() -> None:
    # An rdzv handler without bootstrap info: rank 0 hosts an rdzv TCPStore server, which
    # a torch TCPStore client (what torch workers use) talks to natively.
    fake = FakeHandler(bootstrap=None)
    handler = TorchRendezvousHandler(fake, local_addr="127.0.0.1")
    info = handler.next_rendezvous()
    bootstrap = info.bootstrap_store_info
    assert bootstrap.master_addr == "127.0.0.1" and bootstrap.master_port > 0
    assert fake.store.get("MASTER_PORT") == str(bootstrap.master_port).encode()
    assert handler.use_agent_store is True
    worker = dist.TCPStore("127.0.0.1", bootstrap.master_port, None, False, timedelta(seconds=10))
    worker.set("from-torch", "1")
    assert worker.add("counter", 2) == 2
    assert worker.get("from-torch") == b"1"
    # A later round reuses the same server.
    assert handler.next_rendezvous().bootstrap_store_info.master_port == bootstrap.master_port


# --------------------------------------------------------------------------- torchrun plug-in
def torch_params(backend: str = "rdzv", **config: Any) -> torch_api.RendezvousParameters:
    return torch_api.RendezvousParameters(backend, "127.0.0.1:29999", "job", 1, 1, None, **config)


def test_torchrun_handler_returns_the_creator() -> None:
    creator = torchrun_handler()
    assert callable(creator)
    handler = creator(torch_params(rdzv_backend="static", rank="0"))
    assert isinstance(handler, TorchRendezvousHandler)


def test_create_torchrun_handler_uses_the_named_rdzv_backend() -> None:
    handler = create_torchrun_handler(
        torch_params("my-rdzv", **{INNER_BACKEND_OPTION: "static", "rank": "0", "timeout": "9"})
    )
    assert handler.get_backend() == "my-rdzv"
    inner = handler.rdzv_handler
    assert isinstance(inner, StaticTCPRendezvous)
    assert inner.timeout == timedelta(seconds=9) and inner.get_run_id() == "job"


def test_create_torchrun_handler_defaults_to_c10d(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[RendezvousParameters] = []

    def fake_c10d(params: RendezvousParameters) -> RendezvousHandler:
        seen.append(params)
        handler = FakeHandler()
        handler.get_backend = lambda: "c10d"  # type: ignore[method-assign]
        return handler

    monkeypatch.setitem(rendezvous_handler_registry._registry, "c10d", fake_c10d)
    handler = create_torchrun_handler(torch_params(join_timeout="30"))
    assert handler.get_backend() == "rdzv"
    (params,) = seen
    assert isinstance(params, RendezvousParameters)
    assert (params.backend, params.endpoint, params.run_id) == ("c10d", "127.0.0.1:29999", "job")
    assert params.config == {"join_timeout": "30"}


def test_create_torchrun_handler_refuses_itself() -> None:
    with pytest.raises(
        ValueError, match=r"rdzv_backend=rdzv names torchrun's 'rdzv' backend itself"
    ):
        create_torchrun_handler(torch_params(rdzv_backend="rdzv"))


def test_pyproject_declares_the_entry_point() -> None:
    assert rdzv_entry_points()["torchrun.handlers"] == {
        "rdzv": "rdzv.interop.torch:torchrun_handler"
    }


def rdzv_metadata_dir(tmp_path: Path) -> Path:
    """A directory holding only rdzv's dist-info (the sources come from subprocess_env)."""
    return make_distribution(tmp_path / "rdzv-meta", "rdzv", rdzv_entry_points())


@pytest.mark.parametrize("first", ["torch", "rdzv"])
def test_torch_registers_the_plugin_without_warnings(tmp_path: Path, first: str) -> None:
    # Import orders: torch's rendezvous package first (what torchrun does), or rdzv's
    # module first (torch then loads the entry point while rdzv.interop.torch is importing).
    imports = {
        "torch": "import torch.distributed.elastic.rendezvous as r\nimport rdzv.interop.torch\n",
        "rdzv": "import rdzv.interop.torch\nimport torch.distributed.elastic.rendezvous as r\n",
    }[first]
    code = imports + (
        "from torch.distributed.elastic.rendezvous import registry\n"
        "creator = r.rendezvous_handler_registry._registry['rdzv']\n"
        "params = r.RendezvousParameters('rdzv', '127.0.0.1:1', 'j', 1, 1, "
        "rdzv_backend='static', rank='0')\n"
        "handler = registry.get_rendezvous_handler(params)\n"
        "print(type(handler).__name__, handler.get_backend())\n"
    )
    env = subprocess_env()
    env["PYTHONPATH"] = f"{rdzv_metadata_dir(tmp_path)}:{env['PYTHONPATH']}"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["TorchRendezvousHandler", "rdzv"]
    assert "out of tree plugin" not in out.stderr
