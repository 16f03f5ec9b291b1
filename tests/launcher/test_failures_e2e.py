"""Failure attribution across nodes, end to end: real agents, workers and store."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.launcher.cluster import (
    agents_cleanup,
    finish,
    pids_alive,
    start_agent,
    store_server,
)
from tests.launcher.procs import wait_for
from tests.launcher.test_run_e2e import _c10d
from tests.launcher.test_status_e2e import _status

#: Rank 3 (node 1, local rank 1) exits 3 once every rank is connected; the others block in
#: a store wait that nobody will satisfy and report what the wait raised.
BLOCKED = r"""
import os, sys, time
import rdzv
store = rdzv.connect(timeout=60)
rank = int(os.environ["RANK"])
store.barrier("up", int(os.environ["WORLD_SIZE"]))
if rank == 3:
    sys.stderr.write("rank 3 gives up\n")
    sys.exit(3)
started = time.monotonic()
try:
    store.wait(["never"])
except rdzv.errors.PeerFailedError as exc:
    print(f"rank {rank} PeerFailedError after {time.monotonic() - started:.2f} s: {exc}",
          flush=True)
    sys.exit(1)
"""


def test_every_node_names_the_root_cause_and_workers_stop_waiting(tmp_path: Path) -> None:
    script = tmp_path / "blocked.py"
    script.write_text(BLOCKED)
    with store_server() as port:
        args = [*_c10d(port, "watched", "2", 2, "--max-restarts", "0"), str(script)]
        a, b = start_agent(*args), start_agent(*args)
        with agents_cleanup(a, b):
            started = time.monotonic()
            (code_a, out_a, err_a), (code_b, out_b, err_b) = finish(a), finish(b)
        # rdzv status shows the failures of the round (root cause first).
        status = _status(port, "--json", "--sample", "0")
        table = _status(port, "--sample", "0")
    assert time.monotonic() - started < 60
    assert status.returncode == 0, status.stderr
    failures = json.loads(status.stdout)["failures"]
    assert (failures[0]["rank"], failures[0]["kind"], failures[0]["exit_code"]) == (3, "exit", 3)
    assert len(failures) == 1  # the others' exits after PeerFailedError are no new cause
    assert "failures in round 0 (first = root cause):" in table.stdout
    assert "exit code 3" in table.stdout
    # Both agents exit with the root cause's exit code and name it, on their console and in
    # the summary.
    assert (code_a, code_b) == (3, 3), (err_a, err_b)
    for err in (err_a, err_b):
        line = next(x for x in err.splitlines() if "] root cause:" in x)
        assert "root cause: rank 3 on node 1 (" in line and ": exit code 3 (pid " in line
        assert "local rank 1" in line and "rank 3 gives up" in line
        assert "FAILED after 0 restart(s)" in err
    # The three blocked workers got PeerFailedError naming rank 3 (not their 60 s timeout).
    blocked = [x for x in (out_a + out_b).splitlines() if "PeerFailedError after" in x]
    assert len(blocked) == 3, (out_a, out_b)
    for line in blocked:
        assert "rank 3 on node 1" in line and "exit code 3" in line
        assert float(line.split(" after ")[1].split(" s")[0]) < 10


#: Every rank beats; rank 3 stops (SIGSTOP) inside ``stuck()`` after step 5; the others keep
#: beating while they block in a store wait.
HANGS = r"""
import os, signal, sys, threading, time
import rdzv
store = rdzv.connect(timeout=60)
rank = int(os.environ["RANK"])
store.barrier("up", int(os.environ["WORLD_SIZE"]))
def stuck():
    os.kill(os.getpid(), signal.SIGSTOP)
for step in range(6):
    rdzv.heartbeat(step)
if rank == 3:
    stuck()
def beat():
    for step in range(6, 1000):
        rdzv.heartbeat(step)
        time.sleep(0.05)
threading.Thread(target=beat, daemon=True).start()
try:
    store.wait(["never"])
except rdzv.errors.PeerFailedError as exc:
    print(f"rank {rank}: {exc}", flush=True)
    sys.exit(1)
"""


def test_a_hung_rank_is_named_with_its_stack_on_every_node(tmp_path: Path) -> None:
    script = tmp_path / "hangs.py"
    script.write_text(HANGS)
    logs = tmp_path / "logs"
    with store_server() as port:
        args = [
            *_c10d(port, "hang", "2", 2, "--max-restarts", "0", "--hang-timeout", "2"),
            "--log-dir",
            str(logs),
            str(script),
        ]
        a, b = start_agent(*args), start_agent(*args)
        with agents_cleanup(a, b):
            (code_a, out_a, err_a), (code_b, out_b, err_b) = finish(a), finish(b)
    assert (code_a, code_b) == (124, 124), (err_a, err_b)
    for err in (err_a, err_b):
        line = next(x for x in err.splitlines() if "] root cause:" in x)
        assert "root cause: rank 3 on node 1 (" in line
        assert "hung (no heartbeat; last step 5) in stuck (" in line and "hangs.py:" in line
        # The stopped worker was killed, not left behind.
        hung_pid = int(line.split("(pid ")[1].split(",")[0])
        assert pids_alive([hung_pid]) == []
    stacks = sorted(logs.glob("*/stacks-hang-rank3-*.txt"))
    assert len(stacks) == 1
    text = stacks[0].read_text()
    assert "=== rank 3 (local rank 1" in text and "stuck (" in text
    # The node without the hung rank dumped its own workers' stacks too.
    assert len(sorted(logs.glob("*/stacks-peer-hang-rank3-*.txt"))) == 1
    assert "rank 3 on node 1" in out_a + out_b  # PeerFailedError in the waiting ranks


def test_the_rendezvous_store_dying_ends_every_agent_in_one_line(tmp_path: Path) -> None:
    from rdzv import TCPStore

    script = tmp_path / "sleeps.py"
    script.write_text(
        "import os, time\n"
        "open(os.path.join(os.path.dirname(__file__), 'up' + os.environ['RANK']), 'w').close()\n"
        "time.sleep(120)\n"
    )
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    args = [*_c10d(int(server.port), "gone", "2", 1, "--node-timeout", "2"), str(script)]
    a, b = start_agent(*args), start_agent(*args)
    with agents_cleanup(a, b):
        wait_for(lambda: all((tmp_path / f"up{r}").exists() for r in range(2)), 60, "workers")
        server.close()
        killed = time.monotonic()
        (code_a, _, err_a), (code_b, _, err_b) = finish(a, 30), finish(b, 30)
    assert time.monotonic() - killed < 20
    for code, err in ((code_a, err_a), (code_b, err_b)):
        assert code == 1, err
        assert err.count("has been unreachable for 2 s (its host is down or cut off)") == 1, err
        assert "cannot be used" not in err


def test_exit_barrier_timeout_names_the_missing_node(tmp_path: Path) -> None:
    script = tmp_path / "slow.py"
    script.write_text("import os, time\nif os.environ['RANK'] == '1':\n    time.sleep(6)\n")
    with store_server() as port:
        args = [
            *_c10d(port, "exitb", "2", 1, "--exit-barrier-timeout", "2", "--node-timeout", "8"),
            str(script),
        ]
        a, b = start_agent(*args), start_agent(*args)
        with agents_cleanup(a, b):
            (code_a, _, err_a), (code_b, _, err_b) = finish(a), finish(b)
    assert (code_a, code_b) == (0, 0), (err_a, err_b)
    warned = [(err, other) for err, other in ((err_a, b), (err_b, a)) if "exit barrier" in err]
    assert len(warned) == 1, (err_a, err_b)
    err, other = warned[0]
    line = next(x for x in err.splitlines() if "did not reach the exit barrier" in x)
    assert "1 node(s) did not reach the exit barrier within 2 s: node 1 (host " in line
    assert f"pid {other.pid}, last heartbeat " in line and " s ago)" in line
