"""Property test: several FileStore handles on one file against the model of the HashStore
property test. Each step runs on one of the handles, and handles are closed and reopened
(a new handle replays the whole log), so every handle's incremental replay must agree with
the model after any interleaving of writers."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from rdzv.store.file import FileStore
from tests.store.test_hash_model import HashStoreVsModel


class FileStoreVsModel(HashStoreVsModel):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="rdzv-model-"))
        self.path = self.dir / "store"
        self.handles = [FileStore(self.path, timeout=0) for _ in range(3)]
        self.store = self.handles[0]
        self.internal_keys = 1  # refcount/

    @rule(which=st.integers(min_value=0, max_value=2))
    def switch_handle(self, which: int) -> None:
        self.store = self.handles[which]

    @rule(which=st.integers(min_value=0, max_value=2))
    def reopen_handle(self, which: int) -> None:
        self.handles[which].close()
        self.internal_keys = 2  # refcount/ and, after a close, cleanup/
        self.handles[which] = FileStore(self.path, timeout=0)
        self.store = self.handles[which]

    def teardown(self) -> None:
        for handle in self.handles:
            handle.close()
        shutil.rmtree(self.dir, ignore_errors=True)


FileStoreVsModel.TestCase.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None
)
TestFileStoreVsModel = FileStoreVsModel.TestCase
