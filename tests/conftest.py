"""Shared test helpers: subprocess environments pointing at this checkout's sources."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.etcd_fixtures import _etcd_session_cleanup, etcd_cluster, etcd_member  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"


def subprocess_env(**extra: str) -> dict[str, str]:
    """The current environment with this checkout's ``src`` first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


@pytest.fixture
def python() -> str:
    """The interpreter running the tests, for subprocesses."""
    return sys.executable
