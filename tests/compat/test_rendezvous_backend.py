"""torch's RendezvousBackend API after an import swap: C10dRendezvousBackend (fencing
token), create_backend, DynamicRendezvousHandler.from_backend, create_handler(store,
backend, params), and torch's state-blob rendezvous on a backend written for torch."""

from __future__ import annotations

import os
import pickle
import tempfile
import threading
import time
import unittest
from base64 import b64encode
from datetime import timedelta
from typing import Any, ClassVar
from unittest import mock

from rdzv import FileStore, HashStore, TCPStore
from rdzv.errors import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousStateError,
    RendezvousTimeoutError,
)
from rdzv.rendezvous.api import RendezvousParameters
from rdzv.rendezvous.backend_state import BackendState, decode_state
from rdzv.rendezvous.c10d import C10dRendezvousBackend, create_backend
from rdzv.rendezvous.dynamic import (
    DynamicRendezvousHandler,
    RendezvousBackend,
    RendezvousTimeout,
    Token,
    create_handler,
)
from rdzv.store.base import Store
from tests.ports import reserved_port


class RendezvousBackendTestMixin:
    """torch's backend contract, run on every store below."""

    _backend: RendezvousBackend
    assertEqual: Any
    assertNotEqual: Any
    assertIsNone: Any
    assertIsNotNone: Any
    assertRaises: Any
    assertTrue: Any
    assertFalse: Any

    def _corrupt_state(self) -> None:
        raise NotImplementedError

    def _set_state(self, state: bytes, token: Any = None) -> tuple[bytes, Token, bool]:
        result = self._backend.set_state(state, token)
        self.assertIsNotNone(result)
        assert result is not None
        return result

    def test_get_state_returns_backend_state(self) -> None:
        self._backend.set_state(b"x")
        result = self._backend.get_state()
        self.assertIsNotNone(result)
        assert result is not None
        self.assertEqual(result[0], b"x")
        self.assertIsNotNone(result[1])

    def test_get_state_returns_none_if_backend_state_does_not_exist(self) -> None:
        self.assertIsNone(self._backend.get_state())

    def test_get_state_raises_error_if_backend_state_is_corrupt(self) -> None:
        self._corrupt_state()
        with self.assertRaises(RendezvousStateError):
            self._backend.get_state()

    def test_set_state_sets_backend_state_if_it_does_not_exist(self) -> None:
        state, token, has_set = self._set_state(b"x")
        self.assertEqual(state, b"x")
        self.assertIsNotNone(token)
        self.assertTrue(has_set)

    def test_set_state_sets_backend_state_if_token_is_current(self) -> None:
        _, token1, has_set1 = self._set_state(b"x")
        state2, token2, has_set2 = self._set_state(b"y", token1)
        self.assertEqual(state2, b"y")
        self.assertNotEqual(token1, token2)
        self.assertTrue(has_set1)
        self.assertTrue(has_set2)

    def test_set_state_returns_current_backend_state_if_token_is_old(self) -> None:
        _, token1, _ = self._set_state(b"x")
        state2, token2, _ = self._set_state(b"y", token1)
        state3, token3, has_set = self._set_state(b"z", token1)
        self.assertEqual(state2, state3)
        self.assertEqual(token2, token3)
        self.assertFalse(has_set)

    def test_set_state_returns_current_backend_state_if_token_is_none(self) -> None:
        state1, token1, _ = self._set_state(b"x")
        state2, token2, has_set = self._set_state(b"y")
        self.assertEqual(state1, state2)
        self.assertEqual(token1, token2)
        self.assertFalse(has_set)

    def test_set_state_returns_current_backend_state_if_token_is_invalid(self) -> None:
        state1, token1, _ = self._set_state(b"x")
        state2, token2, has_set = self._set_state(b"y", token="invalid")
        self.assertEqual(state1, state2)
        self.assertEqual(token1, token2)
        self.assertFalse(has_set)


class HashStoreBackendTest(unittest.TestCase, RendezvousBackendTestMixin):
    def setUp(self) -> None:
        self._store = HashStore()
        self._backend = C10dRendezvousBackend(self._store, "dummy_run_id")

    def _corrupt_state(self) -> None:
        self._store.set("torch.rendezvous.dummy_run_id", "non_base64")


class TCPStoreBackendTest(unittest.TestCase, RendezvousBackendTestMixin):
    _store: ClassVar[TCPStore]

    @classmethod
    def setUpClass(cls) -> None:
        cls._store = TCPStore("127.0.0.1", 0, is_master=True)

    @classmethod
    def tearDownClass(cls) -> None:
        cls._store.close()

    def setUp(self) -> None:
        self._store.delete_key("torch.rendezvous.dummy_run_id")
        self._backend = C10dRendezvousBackend(self._store, "dummy_run_id")

    def _corrupt_state(self) -> None:
        self._store.set("torch.rendezvous.dummy_run_id", "non_base64")


class FileStoreBackendTest(unittest.TestCase, RendezvousBackendTestMixin):
    def setUp(self) -> None:
        fd, self._path = tempfile.mkstemp()
        os.close(fd)
        self._store = FileStore(self._path)
        self._backend = C10dRendezvousBackend(self._store, "dummy_run_id")

    def tearDown(self) -> None:
        self._store.close()
        if os.path.exists(self._path):
            os.remove(self._path)

    def _corrupt_state(self) -> None:
        self._store.set("torch.rendezvous.dummy_run_id", "non_base64")


class CreateBackendTest(unittest.TestCase):
    def setUp(self) -> None:
        self._reserved = reserved_port()
        self._port = self._reserved.__enter__()
        self._params = RendezvousParameters(
            backend="dummy_backend",
            endpoint=f"127.0.0.1:{self._port}",
            run_id="dummy_run_id",
            min_nodes=1,
            max_nodes=1,
            is_host="true",
            store_type="tCp",
            read_timeout="10",
        )
        fd, self._path = tempfile.mkstemp()
        os.close(fd)
        self._file_params = RendezvousParameters(
            backend="dummy_backend",
            endpoint=self._path,
            run_id="dummy_run_id",
            min_nodes=1,
            max_nodes=1,
            store_type="fIlE",
            read_timeout="10",
        )

    def tearDown(self) -> None:
        self._reserved.__exit__(None, None, None)
        if os.path.exists(self._path):
            os.remove(self._path)

    def _assert_backend(
        self, params: RendezvousParameters, store_type: type, timeout: int
    ) -> Store:
        backend, store = create_backend(params)
        self.assertEqual(backend.name, "c10d")
        self.assertIsInstance(store, store_type)
        self.assertEqual(store.timeout, timedelta(seconds=timeout))
        backend.set_state(b"dummy_state")
        self.assertEqual(store.get("torch.rendezvous.dummy_run_id"), b64encode(b"dummy_state"))
        return store

    def test_create_backend_returns_backend(self) -> None:
        store = self._assert_backend(self._params, TCPStore, 10)
        assert isinstance(store, TCPStore)
        self.assertEqual((store.host, store.port), ("127.0.0.1", self._port))
        # FileStore: torch's default timeout (300 s), not the read timeout.
        file_store = self._assert_backend(self._file_params, FileStore, 300)
        assert isinstance(file_store, FileStore)
        self.assertEqual(file_store.path, self._path)
        file_store.close()

    def test_create_backend_returns_backend_if_is_host_is_false(self) -> None:
        server = TCPStore("127.0.0.1", self._port, is_master=True)
        self._params.config["is_host"] = "false"
        self._assert_backend(self._params, TCPStore, 10)
        server.close()

    def test_create_backend_returns_backend_if_read_timeout_is_not_specified(self) -> None:
        del self._params.config["read_timeout"]
        self._assert_backend(self._params, TCPStore, 60)

    def test_create_backend_returns_backend_if_endpoint_port_is_not_specified(self) -> None:
        with mock.patch("rdzv.rendezvous.c10d.DEFAULT_PORT", self._port):
            self._params.endpoint = "127.0.0.1"
            store = self._assert_backend(self._params, TCPStore, 10)
        assert isinstance(store, TCPStore)
        self.assertEqual(store.port, self._port)

    def test_create_backend_returns_backend_if_endpoint_file_is_not_specified(self) -> None:
        self._file_params.endpoint = ""
        store = self._assert_backend(self._file_params, FileStore, 300)
        assert isinstance(store, FileStore)
        self.assertTrue(str(store.path).startswith(tempfile.gettempdir()))
        store.close()
        os.remove(store.path)

    def test_create_backend_raises_error_if_store_is_unreachable(self) -> None:
        self._params.config["is_host"] = "false"
        self._params.config["read_timeout"] = "1"
        with self.assertRaisesRegex(
            RendezvousConnectionError,
            r"^The connection to the C10d store has failed. See inner exception for details.$",
        ):
            create_backend(self._params)

    def test_create_backend_raises_error_if_store_type_is_invalid(self) -> None:
        self._params.config["store_type"] = "dummy_store_type"
        with self.assertRaisesRegex(
            ValueError, r"^Invalid store type given. Currently only supports file and tcp.$"
        ):
            create_backend(self._params)

    def test_create_backend_raises_error_if_read_timeout_is_invalid(self) -> None:
        for read_timeout in ["0", "-10"]:
            with self.subTest(read_timeout=read_timeout):
                self._params.config["read_timeout"] = read_timeout
                with self.assertRaisesRegex(
                    ValueError, r"^The read timeout must be a positive integer.$"
                ):
                    create_backend(self._params)

    @mock.patch("tempfile.mkstemp")
    def test_create_backend_raises_error_if_tempfile_creation_fails(self, mkstemp: Any) -> None:
        mkstemp.side_effect = OSError("test error")
        self._file_params.endpoint = ""
        with self.assertRaisesRegex(
            RendezvousError,
            r"The file creation for C10d store has failed. See inner exception for details.",
        ):
            create_backend(self._file_params)

    @mock.patch("rdzv.rendezvous.c10d.FileStore")
    def test_create_backend_raises_error_if_file_path_is_invalid(self, file_store: Any) -> None:
        file_store.side_effect = RuntimeError("test error")
        self._file_params.endpoint = "bad file path"
        with self.assertRaisesRegex(
            RendezvousConnectionError,
            r"^The connection to the C10d store has failed. See inner exception for details.$",
        ):
            create_backend(self._file_params)


class InMemoryBackend(RendezvousBackend):
    """A backend written for torch: one blob, a version number as the fencing token."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: bytes | None = None
        self._version = 0
        self.writes = 0

    @property
    def name(self) -> str:
        return "in_memory"

    def get_state(self) -> tuple[bytes, Token] | None:
        with self._lock:
            return None if self._state is None else (self._state, self._version)

    def set_state(
        self, state: bytes, token: Token | None = None
    ) -> tuple[bytes, Token, bool] | None:
        with self._lock:
            if (self._state is None and token is None) or token == self._version:
                self._state = state
                self._version += 1
                self.writes += 1
                return state, self._version, True
            assert self._state is not None
            return self._state, self._version, False


class DynamicRendezvousHandlerFromBackendTest(unittest.TestCase):
    def setUp(self) -> None:
        self._store = HashStore()
        self._backend = InMemoryBackend()
        self._min_nodes = 3
        self._max_nodes = 6
        self._timeout: RendezvousTimeout | None = RendezvousTimeout()

    def _create_handler(self) -> DynamicRendezvousHandler:
        return DynamicRendezvousHandler.from_backend(
            run_id="dummy_run_id",
            store=self._store,
            backend=self._backend,
            min_nodes=self._min_nodes,
            max_nodes=self._max_nodes,
            timeout=self._timeout,
        )

    def test_init_initializes_handler(self) -> None:
        handler = self._create_handler()
        self.assertIsInstance(handler, DynamicRendezvousHandler)
        self.assertEqual(handler.get_backend(), "in_memory")
        self.assertEqual(handler.get_run_id(), "dummy_run_id")
        self.assertEqual(handler.settings.min_nodes, self._min_nodes)
        self.assertEqual(handler.settings.max_nodes, self._max_nodes)
        if self._timeout is None:
            self.assertEqual(handler.settings.timeout.join, timedelta(seconds=600))
        else:
            self.assertIs(handler.settings.timeout, self._timeout)
        self.assertEqual(self._backend.writes, 0)  # constructing touches nothing

    def test_init_initializes_handler_if_timeout_is_not_specified(self) -> None:
        self._timeout = None
        self.test_init_initializes_handler()

    def test_init_raises_error_if_min_nodes_is_not_positive(self) -> None:
        for num in [0, -10]:
            with self.subTest(min_nodes=num):
                self._min_nodes = num
                with self.assertRaisesRegex(
                    ValueError,
                    rf"^The minimum number of nodes \({num}\) must be greater than zero.$",
                ):
                    self._create_handler()

    def test_init_raises_error_if_max_nodes_is_less_than_min(self) -> None:
        self._min_nodes, self._max_nodes = 3, 2
        with self.assertRaisesRegex(
            ValueError,
            r"^The maximum number of nodes \(2\) must be greater than or equal to the minimum "
            r"number of nodes \(3\).$",
        ):
            self._create_handler()


class CreateHandlerTest(unittest.TestCase):
    def setUp(self) -> None:
        self._store = HashStore()
        self._backend = InMemoryBackend()
        self._params = RendezvousParameters(
            backend=self._backend.name,
            endpoint="dummy_endpoint",
            run_id="dummy_run_id",
            min_nodes=3,
            max_nodes=6,
            join_timeout="50",
            last_call_timeout="60",
            close_timeout="70",
        )

    def test_create_handler_returns_handler(self) -> None:
        handler = create_handler(self._store, self._backend, self._params)
        self.assertEqual(handler.get_backend(), "in_memory")
        self.assertEqual(handler.get_run_id(), "dummy_run_id")
        self.assertEqual(handler.settings.timeout.join, timedelta(seconds=50))
        self.assertEqual(handler.settings.timeout.last_call, timedelta(seconds=60))
        self.assertEqual(handler.settings.timeout.close, timedelta(seconds=70))

    def test_create_handler_records_and_raises_exceptions(self) -> None:
        with mock.patch.object(DynamicRendezvousHandler, "from_backend") as from_backend:
            from_backend.side_effect = RendezvousError("test error")
            with mock.patch("rdzv.rendezvous.dynamic.record_rdzv_event_fields") as record:
                with self.assertRaises(RendezvousError):
                    create_handler(self._store, self._backend, self._params)
                record.assert_called_once()

    def test_create_handler_rdzv_local_addr(self) -> None:
        params = RendezvousParameters(
            "in_memory", "dummy_endpoint", "run", 1, 1, local_addr="127.0.0.2"
        )
        handler = create_handler(self._store, self._backend, params)
        info = handler.next_rendezvous()
        assert info.bootstrap_store_info is not None
        self.assertEqual(info.bootstrap_store_info.master_addr, "127.0.0.2")
        self.assertEqual((info.rank, info.world_size), (0, 1))
        handler.shutdown()


class IntegrationTest(unittest.TestCase):
    """Real threads, torch's semantics on a backend: completion, the round store, dead nodes,
    the redundancy and wait lists, closing."""

    def setUp(self) -> None:
        self._store = HashStore()
        self._backend = InMemoryBackend()
        self._handlers: list[DynamicRendezvousHandler] = []
        # Poll the state 10 times a second instead of torch's once (same semantics, faster).
        poll = mock.patch("rdzv.rendezvous.backend_state.POLL_INTERVAL", 0.1)
        poll.start()
        self.addCleanup(poll.stop)

    def tearDown(self) -> None:
        for handler in self._handlers:
            handler.shutdown()

    def _handler(
        self, min_nodes: int, max_nodes: int, last_call: float = 0.5, **kwargs: Any
    ) -> DynamicRendezvousHandler:
        handler = DynamicRendezvousHandler.from_backend(
            "run",
            self._store,
            self._backend,
            min_nodes,
            max_nodes,
            local_addr=f"127.0.0.{len(self._handlers) + 1}",
            timeout=RendezvousTimeout(join=20, last_call=last_call),
            **kwargs,
        )
        self._handlers.append(handler)
        return handler

    def _state(self) -> BackendState:
        got = self._backend.get_state()
        assert got is not None
        return decode_state(got[0], "in_memory")

    def _start(self, handler: DynamicRendezvousHandler) -> tuple[threading.Thread, list[Any]]:
        box: list[Any] = []

        def run() -> None:
            try:
                box.append(handler.next_rendezvous())
            except Exception as exc:  # handed to the test
                box.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        return thread, box

    def test_all_nodes_join_rendezvous(self) -> None:
        runs = [self._start(self._handler(2, 2)) for _ in range(2)]
        infos = []
        for thread, box in runs:
            thread.join(30)
            infos.append(box[0])
        self.assertEqual(sorted(i.rank for i in infos), [0, 1])
        self.assertEqual({i.world_size for i in infos}, {2})
        self.assertIs(infos[0].store.underlying_store, self._store)
        self.assertEqual(infos[0].store.prefix, "torch.rendezvous.run.0")
        infos[0].store.set("k", b"v")
        self.assertEqual(infos[1].store.get("k"), b"v")
        bootstraps = {
            (i.bootstrap_store_info.master_addr, i.bootstrap_store_info.master_port) for i in infos
        }
        self.assertEqual(len(bootstraps), 1)  # rank 0's server, read by everyone
        state = self._state()
        self.assertTrue(state.complete)
        self.assertEqual(sorted(state.participants.values()), [0, 1])

    def test_last_call_completes_below_max_nodes(self) -> None:
        thread, box = self._start(self._handler(1, 3))
        thread.join(30)
        self.assertEqual((box[0].rank, box[0].world_size), (0, 1))

    def test_late_node_waits_and_is_counted(self) -> None:
        first = self._handler(1, 2, last_call=2)
        info = first.next_rendezvous()
        self.assertEqual(info.world_size, 1)
        thread, box = self._start(self._handler(1, 2, last_call=2))
        deadline = time.monotonic() + 10
        while first.num_nodes_waiting() == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(first.num_nodes_waiting(), 1)
        # The agent re-rendezvouses to admit it: both land in round 1.
        again = first.next_rendezvous()
        thread.join(30)
        self.assertEqual((again.world_size, box[0].world_size), (2, 2))
        self.assertEqual(self._state().round, 1)

    def test_dead_participant_is_dropped_and_spare_joins(self) -> None:
        # A full round (max 1) whose participant never beats again: the new node is a spare
        # (redundancy list, no timeout), then takes the next round once the dead one expires.
        ghost = BackendState(
            complete=True, participants={"10.0.0.9_1_0": 0}, heartbeats={"10.0.0.9_1_0": 1}
        )
        self._backend.set_state(ghost.encode())
        handler = self._handler(1, 1, keep_alive_interval=0.2, keep_alive_max_attempt=2)
        thread, box = self._start(handler)
        deadline = time.monotonic() + 10
        while not box and time.monotonic() < deadline:
            time.sleep(0.05)
        thread.join(30)
        self.assertEqual((box[0].rank, box[0].world_size), (0, 1))
        state = self._state()
        self.assertEqual(state.round, 1)
        self.assertNotIn("10.0.0.9_1_0", state.participants)

    def test_set_closed(self) -> None:
        handler = self._handler(2, 2)
        self.assertFalse(handler.is_closed())
        handler.set_closed()
        handler.set_closed()  # idempotent
        self.assertTrue(self._state().closed)
        with self.assertRaises(RendezvousClosedError):
            self._handler(2, 2).next_rendezvous()

    def test_join_timeout(self) -> None:
        handler = DynamicRendezvousHandler.from_backend(
            "run",
            self._store,
            self._backend,
            2,
            2,
            local_addr="127.0.0.1",
            timeout=RendezvousTimeout(join=0.5),
        )
        with self.assertRaises(RendezvousTimeoutError):
            handler.next_rendezvous()
        self.assertEqual(self._state().participants, {})  # rolled back

    def test_state_is_json_never_pickle(self) -> None:
        thread, box = self._start(self._handler(1, 1))
        thread.join(30)
        self.assertEqual(box[0].world_size, 1)
        got = self._backend.get_state()
        assert got is not None
        self.assertTrue(got[0].startswith(b"{"))

    def test_pickled_torch_state_is_refused_not_unpickled(self) -> None:
        self._backend.set_state(pickle.dumps(_Tripwire()))
        _Tripwire.fired = False
        with self.assertRaisesRegex(RendezvousStateError, "pickled torch state"):
            self._handler(1, 1).next_rendezvous()
        self.assertFalse(_Tripwire.fired)

    def test_keep_alive_thread_started_and_stopped(self) -> None:
        handler = self._handler(1, 1)
        handler.next_rendezvous()
        names = {t.name for t in threading.enumerate()}
        self.assertTrue(any(n.startswith("RendezvousKeepAliveTimer_") for n in names))
        name = next(n for n in names if n.startswith("RendezvousKeepAliveTimer_"))
        self.assertTrue(handler.shutdown())
        self.assertNotIn(name, {t.name for t in threading.enumerate()})


def _trip() -> None:
    _Tripwire.fired = True


class _Tripwire:
    fired = False

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_trip, ())
