"""rdzv.connect(): errors without a launcher, scoping, and use under torchrun itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import rdzv
from rdzv import PrefixStore, TCPStore
from rdzv.launcher.connect import worker_store_prefix
from tests.conftest import REPO, subprocess_env


def test_missing_environment_is_explained() -> None:
    with pytest.raises(RuntimeError, match=r"MASTER_ADDR is not set.*rdzv run"):
        rdzv.connect(env={})
    with pytest.raises(RuntimeError, match="MASTER_PORT='x' is not an integer"):
        rdzv.connect(env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "x"})


def test_scoped_and_raw_clients_of_the_agent_store() -> None:
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(server.port),
        "RANK": "1",
        "WORLD_SIZE": "2",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RUN_ID": "job",
        "RDZV_ATTEMPT_ID": "a1",
    }
    scoped = rdzv.connect(timeout=5, env=env)
    assert isinstance(scoped, PrefixStore)
    assert scoped.prefix == worker_store_prefix(env) == "rdzv.worker/job/a1"
    scoped.set("k", "v")
    raw = rdzv.connect(timeout=5, scoped=False, env=env)
    assert raw.get("rdzv.worker/job/a1/k") == b"v"
    later = rdzv.connect(timeout=5, env={**env, "RDZV_ATTEMPT_ID": "a2"})
    assert not later.check(["k"])  # another attempt does not see it
    torch_env = {k: v for k, v in env.items() if k != "RDZV_ATTEMPT_ID"}
    torch_env["TORCHELASTIC_RESTART_COUNT"] = "3"
    assert worker_store_prefix(torch_env) == "rdzv.worker/job/restart3"


def test_connect_under_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "gather.py"
    script.write_text(
        "import os, rdzv\n"
        "store = rdzv.connect(timeout=60)\n"
        "rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])\n"
        "store.set(f'v/{rank}', str(rank * 10))\n"
        "values = sorted(int(v) for v in store.multi_get([f'v/{r}' for r in range(world)]))\n"
        "store.barrier('done', world)\n"
        # one write: torchrun does not keep the workers' lines whole
        "os.write(1, f'torchrun worker {rank} gathered {values}\\n'.encode())\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
        ],
        env=subprocess_env(),
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "torchrun worker 0 gathered [0, 10]" in proc.stdout
    assert "torchrun worker 1 gathered [0, 10]" in proc.stdout
