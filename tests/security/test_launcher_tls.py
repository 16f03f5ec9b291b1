"""``rdzv run`` on a TLS + token store: the agent and its workers (``rdzv.connect()``) all
speak TLS and authenticate, with settings given once in ``--rdzv-conf``."""

from __future__ import annotations

import sys
from pathlib import Path

from rdzv.launcher.api import launch
from rdzv.launcher.config import LaunchConfig
from rdzv.launcher.worker import security_env
from rdzv.server import ServerThread
from rdzv.tls import server_context
from tests.conftest import subprocess_env
from tests.launcher.cluster import run_agent
from tests.security.certs import Certs

TOKEN = b"launcher-token-0123456789abcdef"


def test_security_env_carries_file_names_only() -> None:
    env = security_env({"tls_ca": "/ca.pem", "token_file": "/tok", "join_timeout": "5"})
    assert env == {"RDZV_TLS_CA": "/ca.pem", "RDZV_TOKEN_FILE": "/tok"}


def test_rdzv_run_on_a_tls_store_with_a_token(certs: Certs, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN)
    server = ServerThread(
        ssl=server_context(certs.server.cert, certs.server.key), token=TOKEN
    ).start()
    try:
        conf = f"tls_ca={certs.ca},token_file={token_file}"
        args = ["--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d"]
        args += ["--rdzv-endpoint", f"127.0.0.1:{server.port}", "--rdzv-id", "tls-job"]
        proc = run_agent(*args, "--rdzv-conf", conf, "examples/allgather_sum.py")
        assert proc.returncode == 0, proc.stderr
        assert "[0]: sum of ranks: 1 (expected 1)" in proc.stdout
        # Without the token the same job is refused, with an error that says so.
        bad = run_agent(*args, "--rdzv-conf", f"tls_ca={certs.ca}", "examples/allgather_sum.py")
        assert bad.returncode != 0
        assert "token" in bad.stderr.lower()
    finally:
        server.stop()


def test_launch_from_python_passes_the_store_security_to_workers(tmp_path: Path) -> None:
    """``launch()`` called from Python (not the CLI) hands the token settings of
    ``rdzv_configs`` to its workers, so ``rdzv.connect()`` works against a secured store."""
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN)
    server = ServerThread(token=TOKEN).start()
    out: list[bytes] = []
    err: list[bytes] = []
    try:
        config = LaunchConfig(
            nproc_per_node=2,
            run_id="py-token-job",
            rdzv_backend="c10d",
            rdzv_endpoint=f"127.0.0.1:{server.port}",
            rdzv_configs={"token_file": str(token_file)},
            env={"PYTHONPATH": subprocess_env()["PYTHONPATH"]},
        )
        result = launch(
            config,
            [sys.executable, "examples/allgather_sum.py"],
            stdout=out.append,
            stderr=err.append,
        )
        stderr = b"".join(err).decode(errors="replace")
        assert result.exit_code == 0, (result.summary, stderr)
        assert "[0]: sum of ranks: 1 (expected 1)" in b"".join(out).decode()
    finally:
        server.stop()
