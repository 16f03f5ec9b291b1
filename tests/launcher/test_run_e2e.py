"""``rdzv run`` end to end: real agents, real workers, real TCPStore, real rendezvous."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from subprocess import Popen

import pytest

from tests.etcd_fixtures import EtcdMember
from tests.launcher.cluster import (
    agents_cleanup,
    attempts,
    finish,
    pids_alive,
    records,
    run_agent,
    start_agent,
    store_server,
    wait_records,
    write_worker,
)
from tests.launcher.procs import alive_with_marker, wait_for

# Short rendezvous windows so elastic tests take seconds, not minutes.
FAST = (
    "last_call_timeout=1,join_timeout=60,is_host=false,keep_alive_interval=0.5,"
    "keep_alive_max_attempt=2"
)


def _c10d(port: int, run_id: str, nnodes: str, nproc: int = 2, *extra: str) -> list[str]:
    return [
        "--nnodes",
        nnodes,
        "--nproc-per-node",
        str(nproc),
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        run_id,
        "--rdzv-conf",
        FAST,
        "--local-addr",
        "127.0.0.1",
        "--monitor-interval",
        "0.1",
        *extra,
    ]


def test_standalone_four_workers_allgather_example() -> None:
    proc = run_agent("--standalone", "--nproc-per-node", "4", "examples/allgather_sum.py")
    assert proc.returncode == 0, proc.stderr
    assert "[0]: sum of ranks: 6 (expected 6)" in proc.stdout
    assert "[0]: all-gather over 4 ranks: rank 0 pid" in proc.stdout
    assert "[1]:" not in proc.stdout  # only rank 0 prints


def test_standalone_env_and_connect(tmp_path: Path) -> None:
    script = write_worker(tmp_path)
    out = tmp_path / "out"
    proc = run_agent("--standalone", "--nproc-per-node", "4", str(script), str(out), "allgather")
    assert proc.returncode == 0, proc.stderr
    recs = records(out)
    assert sorted(int(r["RANK"]) for r in recs) == [0, 1, 2, 3]
    assert {r["WORLD_SIZE"] for r in recs} == {"4"}
    assert {r["MASTER_ADDR"] for r in recs} == {"127.0.0.1"}
    assert {r["TORCHELASTIC_USE_AGENT_STORE"] for r in recs} == {"True"}
    assert len({r["TORCHELASTIC_RUN_ID"] for r in recs}) == 1
    for rank in range(4):
        assert f"[{rank}]: gathered [0, 1, 2, 3]" in proc.stdout


def test_torch_gloo_example() -> None:
    proc = run_agent(
        "--standalone", "--nproc-per-node", "2", "examples/torch_allreduce.py", timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "[0]: rank 0/2: all_reduce sum = 3 (expected 3)" in proc.stdout
    assert "[1]: rank 1/2: all_reduce sum = 3 (expected 3)" in proc.stdout


def test_static_backend_one_node_with_a_restart(tmp_path: Path) -> None:
    script = write_worker(tmp_path)
    out = tmp_path / "out"
    proc = run_agent(
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        "0",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        str(script),
        str(out),
        "allgather-crash-once",
    )
    assert proc.returncode == 0, proc.stderr
    groups = attempts(out)
    assert len(groups) == 2
    final = next(g for g in groups.values() if g[0]["TORCHELASTIC_RESTART_COUNT"] == "1")
    assert sorted(int(r["RANK"]) for r in final) == [0, 1]
    assert {r["MASTER_ADDR"] for r in final} == {"127.0.0.1"}
    assert "0" not in {r["MASTER_PORT"] for r in final}
    assert proc.stdout.count("gathered [0, 1]") == 2


def _two_agents_gather(tmp_path: Path, *options: str) -> list[dict[str, str]]:
    """Two agents with ``options`` and 2 workers each all-gather; returns the records after
    checking that both succeeded as one world of 4."""
    script = write_worker(tmp_path)
    out = tmp_path / "out"
    args = [*options, str(script), str(out), "allgather"]
    a, b = start_agent(*args), start_agent(*args)
    with agents_cleanup(a, b):
        (code_a, out_a, err_a), (code_b, out_b, err_b) = finish(a), finish(b)
    assert code_a == 0, err_a
    assert code_b == 0, err_b
    recs = records(out)
    assert sorted(int(r["RANK"]) for r in recs) == [0, 1, 2, 3]
    assert {r["WORLD_SIZE"] for r in recs} == {"4"}
    assert len({r["RDZV_ATTEMPT_ID"] for r in recs}) == 1
    assert out_a.count("gathered [0, 1, 2, 3]") + out_b.count("gathered [0, 1, 2, 3]") == 4
    return recs


def test_two_agents_form_one_world(tmp_path: Path) -> None:
    with store_server() as port:
        recs = _two_agents_gather(tmp_path, *_c10d(port, "two", "2"))
    assert {r["GROUP_WORLD_SIZE"] for r in recs} == {"2"}
    for r in recs:  # RANK = GROUP_RANK * nproc + LOCAL_RANK
        assert int(r["RANK"]) == int(r["GROUP_RANK"]) * 2 + int(r["LOCAL_RANK"])
    assert len({r["agent_pid"] for r in recs}) == 2


def test_two_agents_on_the_etcd_backend(tmp_path: Path, etcd_member: EtcdMember) -> None:
    run_id = f"etcd-{uuid.uuid4().hex[:8]}"
    recs = _two_agents_gather(
        tmp_path,
        *("--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "etcd"),
        *("--rdzv-endpoint", etcd_member.endpoint, "--rdzv-id", run_id),
        *("--rdzv-conf", "last_call_timeout=1,keep_alive_interval=0.5"),
        *("--local-addr", "127.0.0.1"),
    )
    assert {r["TORCHELASTIC_RUN_ID"] for r in recs} == {run_id}


def test_nodes_with_different_worker_counts_and_roles(tmp_path: Path) -> None:
    script = write_worker(tmp_path)
    out = tmp_path / "out"
    with store_server() as port:
        tail = [str(script), str(out), "allgather"]
        a = start_agent(*_c10d(port, "mixed", "2", 2, "--role", "trainer"), *tail)
        b = start_agent(*_c10d(port, "mixed", "2", 1, "--role", "reader"), *tail)
        with agents_cleanup(a, b):
            (code_a, _, err_a), (code_b, _, err_b) = finish(a), finish(b)
    assert code_a == 0, err_a
    assert code_b == 0, err_b
    recs = records(out)
    assert sorted(int(r["RANK"]) for r in recs) == [0, 1, 2]
    assert {r["WORLD_SIZE"] for r in recs} == {"3"}
    trainers = [r for r in recs if r["ROLE_NAME"] == "trainer"]
    readers = [r for r in recs if r["ROLE_NAME"] == "reader"]
    assert sorted(r["ROLE_RANK"] for r in trainers) == ["0", "1"]
    assert {r["ROLE_WORLD_SIZE"] for r in trainers} == {"2"}
    assert [(r["ROLE_RANK"], r["ROLE_WORLD_SIZE"]) for r in readers] == [("0", "1")]
    for r in recs:  # ranks are contiguous per node, nodes in GROUP_RANK order
        base = (
            0 if r["GROUP_RANK"] == "0" else int(recs[0]["WORLD_SIZE"]) - int(r["LOCAL_WORLD_SIZE"])
        )
        assert int(r["RANK"]) == base + int(r["LOCAL_RANK"])


def test_failure_on_one_node_stops_both(tmp_path: Path) -> None:
    script = tmp_path / "rank0_fails.py"
    script.write_text(
        "import os, sys, time\n"
        "if os.environ['RANK'] == '0':\n"
        "    sys.exit('rank 0 cannot go on')\n"
        "time.sleep(120)\n"
    )
    started = time.monotonic()
    with store_server() as port:
        args = [*_c10d(port, "doomed", "2", 1, "--max-restarts", "1"), str(script)]
        a, b = start_agent(*args), start_agent(*args)
        with agents_cleanup(a, b):
            (code_a, _, err_a), (code_b, _, err_b) = finish(a), finish(b)
    assert time.monotonic() - started < 60
    assert code_a != 0 and code_b != 0
    summaries = [e for e in (err_a, err_b) if "FAILED after 1 restart(s)" in e]
    assert len(summaries) >= 1
    assert "| rank 0 cannot go on" in summaries[0]


def test_crash_once_then_success(tmp_path: Path) -> None:
    script = tmp_path / "flaky.py"
    script.write_text(
        "import os, sys\n"
        "import rdzv\n"
        "store = rdzv.connect(timeout=30)\n"
        "if os.environ['RANK'] == '1' and os.environ['TORCHELASTIC_RESTART_COUNT'] == '0':\n"
        "    sys.exit('rank 1 crashes on the first attempt')\n"
        "store.barrier('ok', int(os.environ['WORLD_SIZE']))\n"
        "print('attempt', os.environ['TORCHELASTIC_RESTART_COUNT'], 'ok')\n"
    )
    proc = run_agent("--standalone", "--nproc-per-node", "2", "--max-restarts", "1", str(script))
    assert proc.returncode == 0, proc.stderr
    assert "[0]: attempt 1 ok" in proc.stdout and "[1]: attempt 1 ok" in proc.stdout
    assert "[1]: rank 1 crashes on the first attempt" in proc.stderr
    assert "FAILED" not in proc.stderr


def test_always_failing_stops_after_max_restarts(tmp_path: Path) -> None:
    script = tmp_path / "bad.py"
    script.write_text(
        "import os, sys, time\n"
        "if os.environ['LOCAL_RANK'] == '1':\n"
        "    raise RuntimeError('attempt ' + os.environ['TORCHELASTIC_RESTART_COUNT'] + ' broke')\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    proc = run_agent("--standalone", "--nproc-per-node", "2", "--max-restarts", "2", str(script))
    assert time.monotonic() - started < 60
    assert proc.returncode == 1, proc.stderr
    summary = proc.stderr[proc.stderr.index("=" * 72) :]
    assert "FAILED after 2 restart(s) (max_restarts=2)" in summary
    assert "rank       : 1 (local_rank 1" in summary
    assert "exit code 1" in summary
    assert "| RuntimeError: attempt 2 broke" in summary
    assert proc.stderr.count("restarting the worker group") == 2


def test_scale_up_from_one_to_two_nodes(tmp_path: Path) -> None:
    script = write_worker(tmp_path)
    out = tmp_path / "out"
    with store_server() as port:
        args = [*_c10d(port, "grow", "1:2"), str(script), str(out), "until-world", "4"]
        a = start_agent(*args)
        with agents_cleanup(a):
            # Node A runs alone first (world 2)...
            wait_records(out, lambda recs: len(recs) == 2, 60, "node A's two workers")
            assert {r["WORLD_SIZE"] for r in records(out)} == {"2"}
            b = start_agent(*args)
            with agents_cleanup(b):
                (code_a, _, err_a), (code_b, _, err_b) = finish(a), finish(b)
    assert code_a == 0, err_a
    assert code_b == 0, err_b
    grown = [g for g in attempts(out).values() if {r["WORLD_SIZE"] for r in g} == {"4"}]
    assert len(grown) == 1
    assert sorted(int(r["RANK"]) for r in grown[0]) == [0, 1, 2, 3]
    assert "new nodes are waiting" in err_a
    # Scaling is not a failure: no restart was used up.
    assert {r["TORCHELASTIC_RESTART_COUNT"] for r in grown[0]} == {"0"}


@pytest.mark.parametrize("victim_group_rank", ["0", "1"])
def test_losing_one_of_two_agents_continues_at_world_one(
    tmp_path: Path, victim_group_rank: str
) -> None:
    script = write_worker(tmp_path)
    out = tmp_path / "out"
    with store_server() as port:
        args = [
            *_c10d(port, "shrink", "1:2", 1, "--node-timeout", "2"),
            str(script),
            str(out),
            "shrink",
        ]
        a = start_agent(*args)
        with agents_cleanup(a):
            wait_records(out, lambda recs: len(recs) >= 1, 60, "node A's worker")
            b = start_agent(*args)
            with agents_cleanup(b):
                wait_records(
                    out,
                    lambda recs: (
                        any(r["WORLD_SIZE"] == "2" for r in recs)
                        and sum(r["WORLD_SIZE"] == "2" for r in recs) == 2
                    ),
                    60,
                    "a world of two",
                )
                pair = [r for r in records(out) if r["WORLD_SIZE"] == "2"]
                victim = next(r for r in pair if r["GROUP_RANK"] == victim_group_rank)
                survivor_pid = next(r for r in pair if r is not victim)["agent_pid"]
                victim_proc = a if victim["agent_pid"] == a.pid else b
                survivor = b if victim_proc is a else a
                assert survivor.pid == survivor_pid
                victim_proc.send_signal(signal.SIGKILL)
                victim_proc.communicate()
                # The victim's worker dies with its agent (parent-death signal).
                wait_for(lambda: pids_alive([int(victim["pid"])]) == [], 10, "victim worker")
                code, stdout, err = finish(survivor)
    assert code == 0, err
    assert "was lost" in err or "another node restarts" in err
    # The survivor watched the victim: it names it, as a lost node, on its console.
    assert "root cause: node " in err and "node lost (its agent stopped heartbeating)" in err
    assert "done at world 1" in stdout


def _start_tree(tmp_path: Path, spawn: str, per_worker: int) -> tuple[Popen[str], str]:
    """A standalone agent with 2 workers, each running ``spawn`` (code that starts
    ``per_worker`` sleepers whose command line carries the marker), once all are up."""
    marker = f"rdzv-e2e-tree-{os.getpid()}-{time.monotonic_ns()}"
    script = tmp_path / "tree.py"
    script.write_text(
        "import os, subprocess, sys, time\n"
        f"marker = {marker!r}\n"
        "sleeper = [sys.executable, '-c', 'import time; time.sleep(120)', marker]\n"
        + spawn
        + f"open(os.path.join({str(tmp_path)!r}, 'ready' + os.environ['RANK']), 'w').close()\n"
        "time.sleep(120)\n"
    )
    agent = start_agent("--standalone", "--nproc-per-node", "2", str(script), marker)
    wait_for(
        lambda: (
            # the agent and the workers carry the marker too
            len(alive_with_marker(marker)) == 1 + 2 + 2 * per_worker
            and all((tmp_path / f"ready{r}").exists() for r in range(2))
        ),
        60,
        "workers and their children",
    )
    return agent, marker


def test_sigterm_to_the_agent_leaves_no_process(tmp_path: Path) -> None:
    agent, marker = _start_tree(
        tmp_path,
        "subprocess.Popen(sleeper)\n"
        "subprocess.Popen(sleeper, start_new_session=True)\n"
        "if os.fork() == 0:\n"  # a daemon: its parent exits, it is orphaned
        "    subprocess.Popen(sleeper, start_new_session=True)\n"
        "    os._exit(0)\n",
        3,
    )
    with agents_cleanup(agent):
        agent.send_signal(signal.SIGTERM)
        code, _, err = finish(agent, 60)
    assert code == 128 + signal.SIGTERM, err
    assert alive_with_marker(marker) == []


def test_sigkill_to_the_agent_kills_its_workers_and_their_children(tmp_path: Path) -> None:
    agent, marker = _start_tree(tmp_path, "subprocess.Popen(sleeper)\n", 1)
    with agents_cleanup(agent):
        agent.send_signal(signal.SIGKILL)
        agent.communicate()
        # The agent's watchdog kills the workers' process groups.
        wait_for(lambda: alive_with_marker(marker) == [], 10, "workers and children to die")
