"""``rdzv status`` against live agents: members, ranks, hosts, waiting spares, heartbeats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, subprocess_env
from tests.launcher.cluster import (
    agents_cleanup,
    records,
    start_agent,
    store_server,
    wait_records,
    write_worker,
)
from tests.launcher.procs import wait_for
from tests.launcher.test_run_e2e import FAST


def _status(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "rdzv",
            "status",
            "--endpoint",
            f"127.0.0.1:{port}",
            "--run-id",
            "watched",
            *extra,
        ],
        env=subprocess_env(),
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_status_shows_members_and_waiting_spare(tmp_path: Path) -> None:
    script = write_worker(tmp_path)
    out = tmp_path / "out"
    with store_server() as port:
        empty = _status(port, "--json", "--sample", "0")  # the run has not started yet
        assert empty.returncode == 1 and "no rendezvous with run id 'watched'" in empty.stderr
        args = [
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            "watched",
            "--rdzv-conf",
            FAST,
            "--local-addr",
            "127.0.0.1",
            str(script),
            str(out),
            "until-world",
            "99",
        ]
        a, b = start_agent(*args), start_agent(*args)
        with agents_cleanup(a, b):
            wait_records(out, lambda recs: len(recs) == 2, 60, "two workers")
            spare = start_agent(*args)  # max_nodes is 2: it waits as a spare
            with agents_cleanup(spare):

                def spare_waits() -> bool:
                    quick = _status(port, "--json", "--sample", "0")
                    return quick.returncode == 0 and bool(json.loads(quick.stdout)["waiting"])

                wait_for(spare_waits, 30, "the spare to join")
                proc = _status(port, "--json", "--sample", "5")
                assert proc.returncode == 0, proc.stderr
                status = json.loads(proc.stdout)
                agents = {int(r["GROUP_RANK"]): int(r["agent_pid"]) for r in records(out)}
                assert status["round"] is not None and status["closed"] is False
                assert status["world_size"] == 2 and status["workers"] == 2
                members = status["members"]
                assert [m["rank"] for m in members] == [0, 1]
                assert {m["rank"]: m["pid"] for m in members} == agents
                for member in members:
                    assert member["addr"] == "127.0.0.1" and member["state"] == "member"
                    assert member["nproc"] == 1 and member["role"] == "default"
                    assert isinstance(member["heartbeat"], int)
                    assert 0 <= member["heartbeat_age"] < 5  # keep-alive every 0.5 s
                waiting = status["waiting"]
                assert [w["pid"] for w in waiting] == [spare.pid]
                table = _status(port, "--sample", "0")
                assert table.returncode == 0, table.stderr
                assert "RANK  SLOT  ADDR" in table.stdout
                assert f"{spare.pid}" in table.stdout
                assert "waiting for round" in table.stdout


def test_status_reports_an_unreachable_endpoint() -> None:
    with store_server() as port:
        pass  # the port is free again now
    proc = _status(port, "--timeout", "1")
    assert proc.returncode == 1
    assert f"127.0.0.1:{port}" in proc.stderr


def test_status_of_an_unknown_run_id_fails_and_names_the_runs_there() -> None:
    from rdzv.store.tcp import TCPStore

    with store_server() as port, TCPStore("127.0.0.1", port, timeout=5) as store:
        store.set("rdzv/other-job/round", b"1")
        proc = _status(port, "--sample", "0")
    assert proc.returncode == 1
    assert "no rendezvous with run id 'watched'" in proc.stderr
    assert "'other-job'" in proc.stderr
