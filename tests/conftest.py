"""Shared test helpers: subprocess environments pointing at this checkout's sources."""

from __future__ import annotations

import os
import subprocess
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


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with ``python -c`` in a child process over this checkout's sources
    (output captured as text); raises subprocess.TimeoutExpired after ``timeout`` seconds."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def python() -> str:
    """The interpreter running the tests, for subprocesses."""
    return sys.executable
