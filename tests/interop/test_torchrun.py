"""A real ``torchrun`` (torch 2.13) with ``--rdzv-backend rdzv``: two agents on localhost
whose workers, started by torch's elastic agent, do a gloo all_reduce.

rdzv is found by torch through its ``torchrun.handlers`` entry point: the test generates a
dist-info directory for rdzv from pyproject.toml and puts it on the agents' PYTHONPATH (this
checkout's sources come from ``subprocess_env``), so it does not depend on how rdzv is
installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import subprocess_env
from tests.plugins import make_distribution, rdzv_entry_points
from tests.ports import reserved_port


def torchrun_command() -> list[str]:
    script = Path(sys.executable).parent / "torchrun"
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def run_agents(tmp_path: Path, per_agent_args: list[list[str]]) -> list[list[dict[str, Any]]]:
    """Start one torchrun per argument list; return each agent's worker JSON lines."""
    meta = make_distribution(tmp_path / "rdzv-meta", "rdzv", rdzv_entry_points())
    env = subprocess_env(LOGLEVEL="INFO")
    env["PYTHONPATH"] = os.pathsep.join([str(meta), env["PYTHONPATH"]])
    procs = [
        subprocess.Popen(
            [
                *torchrun_command(),
                "--rdzv-backend",
                "rdzv",
                "--nproc-per-node",
                "1",
                "--max-restarts",
                "0",
                "--monitor-interval",
                "0.1",
                *args,
                "-m",
                "tests.interop.torch_worker",
                "env",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in per_agent_args
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=100)
            assert proc.returncode == 0, err[-4000:]
            outputs.append([json.loads(line) for line in out.splitlines() if line.startswith("{")])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def test_torchrun_static_rdzv_backend(tmp_path: Path) -> None:
    with reserved_port() as port:
        endpoint = f"127.0.0.1:{port}"
        outputs = run_agents(
            tmp_path,
            [
                [
                    "--nnodes",
                    "2",
                    "--rdzv-endpoint",
                    endpoint,
                    "--rdzv-id",
                    "static-job",
                    "--rdzv-conf",
                    f"rdzv_backend=static,rank={rank},timeout=60",
                ]
                for rank in range(2)
            ],
        )
    workers = sorted((w for out in outputs for w in out), key=lambda w: w["rank"])
    assert [(w["rank"], w["world_size"], w["sum"]) for w in workers] == [(0, 2, 3.0), (1, 2, 3.0)]
    for worker in workers:
        # torch's agent advertised rdzv's store (the static endpoint) to its workers, which
        # connected to it with torch's own TCPStore client.
        assert worker["use_agent_store"] == "True"
        assert worker["master"] == endpoint
        assert worker["group_rank"] == str(worker["rank"])


def test_torchrun_dynamic_rdzv_backend(tmp_path: Path) -> None:
    # Two elastic agents (--nnodes 1:2) meet through rdzv's dynamic rendezvous: the first
    # agent on the endpoint serves it, the second connects; the round closes when both are in.
    with reserved_port() as port:
        endpoint = f"127.0.0.1:{port}"
        args = [
            "--nnodes",
            "1:2",
            "--rdzv-endpoint",
            endpoint,
            "--rdzv-id",
            "dynamic-job",
            "--rdzv-conf",
            "join_timeout=60,last_call_timeout=30",
        ]
        outputs = run_agents(tmp_path, [args, args])
    workers = sorted((w for out in outputs for w in out), key=lambda w: w["rank"])
    assert [(w["rank"], w["world_size"], w["sum"]) for w in workers] == [(0, 2, 3.0), (1, 2, 3.0)]
    assert sorted(w["group_rank"] for w in workers) == ["0", "1"]
    masters = {w["master"] for w in workers}
    assert len(masters) == 1
    for worker in workers:
        assert worker["use_agent_store"] == "True"
