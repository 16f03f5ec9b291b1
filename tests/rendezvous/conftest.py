"""Fixtures of the dynamic rendezvous tests: store backends, thread nodes, process nodes.

``backend`` is parametrized over the stores the suite runs on: ``hash`` (threads of this
process sharing a HashStore), ``file`` (a FileStore on disk), ``tcp`` (rdzv's TCPStore
server on 127.0.0.1, a client connection per node) and ``etcd`` (an EtcdStore per node on
the session's etcd); ``process_backend`` over the ones other
processes can reach (``file``, ``tcp``). Each node gets its own handle from
:meth:`Backend.connect`.
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rdzv import HashStore
from rdzv.rendezvous.api import RendezvousInfo
from rdzv.rendezvous.dynamic import DynamicRendezvousHandler, RendezvousTimeout
from rdzv.store.base import Store
from rdzv.store.file import FileStore
from rdzv.store.tcp import TCPStore
from tests.conftest import subprocess_env

# Small liveness settings keep the failure tests fast: a node is dead after 0.6 s (short
# enough for fast tests, long enough that a loaded CI machine does not starve a heartbeat).
INTERVAL = 0.2
ATTEMPTS = 3
EXPIRY = INTERVAL * ATTEMPTS


@dataclass
class Backend:
    name: str
    connect: Callable[[], Store]
    #: How a subprocess reaches the store (None: threads only).
    spec: dict[str, Any] | None = None
    admin: Store = field(init=False)

    def __post_init__(self) -> None:
        self.admin = self.connect()


@contextlib.contextmanager
def _hash_backend(tmp_path: Path) -> Iterator[Backend]:
    store = HashStore(timeout=20)
    yield Backend("hash", lambda: store)


@contextlib.contextmanager
def _file_backend(tmp_path: Path) -> Iterator[Backend]:
    path = tmp_path / "rdzv.store"
    opened: list[FileStore] = []

    def connect() -> Store:
        store = FileStore(path, timeout=20)
        opened.append(store)
        return store

    try:
        yield Backend("file", connect, {"kind": "file", "path": str(path)})
    finally:
        quiesce()
        for store in opened:
            store.close()


@contextlib.contextmanager
def _tcp_backend(tmp_path: Path) -> Iterator[Backend]:
    server = TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=False, timeout=20)
    opened: list[TCPStore] = [server]

    def connect() -> Store:
        client = TCPStore("127.0.0.1", server.port, timeout=20)
        opened.append(client)
        return client

    try:
        yield Backend("tcp", connect, {"kind": "tcp", "host": "127.0.0.1", "port": server.port})
    finally:
        quiesce()
        for store in reversed(opened):
            store.close()


@contextlib.contextmanager
def _etcd_backend(tmp_path: Path) -> Iterator[Backend]:
    # The session's etcd member, a fresh prefix per test (heartbeat liveness: the suite's
    # 0.3 s expiry is below etcd's minimum lease TTL; tests/rendezvous/test_etcd.py covers
    # the lease liveness of the etcd backend).
    from rdzv.store.etcd import EtcdStore
    from tests.etcd_fixtures import fresh_prefix, shared_member

    endpoint, prefix = shared_member().endpoint, fresh_prefix()
    opened: list[EtcdStore] = []

    def connect() -> Store:
        store = EtcdStore(endpoint, prefix, timeout=20)
        opened.append(store)
        return store

    try:
        yield Backend("etcd", connect)
    finally:
        for store in opened:
            store.close()


THREAD_BACKENDS = {
    "hash": _hash_backend,
    "file": _file_backend,
    "tcp": _tcp_backend,
    "etcd": _etcd_backend,
}
PROCESS_BACKENDS = {"file": _file_backend, "tcp": _tcp_backend}


@pytest.fixture(params=sorted(THREAD_BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    with THREAD_BACKENDS[request.param](tmp_path) as b:
        yield b


@pytest.fixture(params=sorted(PROCESS_BACKENDS))
def process_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    with PROCESS_BACKENDS[request.param](tmp_path) as b:
        yield b


_created: list[DynamicRendezvousHandler] = []


def quiesce() -> None:
    """Stop the keep-alive threads of the handlers the test created and let clean-up threads
    finish, before the test's store goes away (no stray threads in the next test)."""
    while _created:
        keep_alive = _created.pop()._keep_alive
        if keep_alive is not None:
            keep_alive.stop()
    for thread in threading.enumerate():
        if thread.name.startswith("RendezvousCleanUp_"):
            thread.join(10)


@pytest.fixture(autouse=True)
def _quiesce_after_test() -> Iterator[None]:
    yield
    quiesce()


def make_handler(
    store: Store,
    min_nodes: int,
    max_nodes: int,
    *,
    index: int = 0,
    run_id: str = "job",
    join: float = 20.0,
    last_call: float = 0.3,
    close: float = 10.0,
    interval: float = INTERVAL,
    attempts: int = ATTEMPTS,
    **kwargs: Any,
) -> DynamicRendezvousHandler:
    kwargs.setdefault("master_endpoint", (f"127.0.0.{index + 1}", 29400 + index))
    handler = DynamicRendezvousHandler(
        run_id,
        store,
        min_nodes,
        max_nodes,
        local_addr=f"127.0.0.{index + 1}",
        timeout=RendezvousTimeout(join=join, last_call=last_call, close=close),
        keep_alive_interval=interval,
        keep_alive_max_attempt=attempts,
        **kwargs,
    )
    _created.append(handler)
    return handler


class Join:
    """``handler.next_rendezvous()`` in a thread; ``result()`` waits (bounded)."""

    def __init__(self, handler: DynamicRendezvousHandler) -> None:
        self.handler = handler
        self.started = time.monotonic()
        self.finished: float | None = None
        self._out: queue.Queue[tuple[RendezvousInfo | None, BaseException | None]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            info = self.handler.next_rendezvous()
        except BaseException as exc:  # handed to the test
            self.finished = time.monotonic()
            self._out.put((None, exc))
        else:
            self.finished = time.monotonic()
            self._out.put((info, None))

    def outcome(self, timeout: float = 30.0) -> tuple[RendezvousInfo | None, BaseException | None]:
        return self._out.get(timeout=timeout)

    def result(self, timeout: float = 30.0) -> RendezvousInfo:
        info, exc = self.outcome(timeout)
        if exc is not None:
            raise exc
        assert info is not None
        return info

    def done(self) -> bool:
        return self.finished is not None


def join_all(
    handlers: list[DynamicRendezvousHandler], timeout: float = 30.0
) -> list[RendezvousInfo]:
    joins = [Join(h) for h in handlers]
    return [j.result(timeout) for j in joins]


def eventually(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Wait (bounded) for ``predicate``; fails the test with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.01)


class ProcNode:
    """A node in its own process (tests/rendezvous/node_proc.py)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.rendezvous.node_proc", json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.log: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.expect("ready", timeout=30)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            self.log.append(msg)
            self.lines.put(msg)

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def expect(self, *kinds: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"process {self.proc.pid} sent no {kinds} in {timeout}s: {self.log}")
            try:
                msg = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if msg["event"] in kinds:
                return msg

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.send("exit")
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def proc_nodes() -> Iterator[list[ProcNode]]:
    nodes: list[ProcNode] = []
    yield nodes
    for node in nodes:
        node.close()
