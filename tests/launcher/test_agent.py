"""The agent in this process with a one-node in-memory rendezvous and real worker processes:
environment, restarts, failure summary, output handling, process-tree cleanup, events."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from rdzv import events
from rdzv.errors import NetworkError
from rdzv.launcher.agent import ElasticAgent, RunResult, WorkerState
from rdzv.launcher.config import LaunchConfig, Std
from rdzv.rendezvous.api import RendezvousInfo
from rdzv.store.hash import HashStore
from rdzv.store.prefix import PrefixStore
from tests.launcher.fakes import LocalHandler
from tests.launcher.procs import alive_with_marker, wait_for


class Console:
    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.lock = threading.Lock()

    def write_out(self, data: bytes) -> None:
        with self.lock:
            self.out += data

    def write_err(self, data: bytes) -> None:
        with self.lock:
            self.err += data


def run_agent(
    code: str, handler: LocalHandler | None = None, **config: Any
) -> tuple[RunResult, Console, LocalHandler]:
    handler = handler or LocalHandler()
    console = Console()
    config.setdefault("nproc_per_node", 2)
    agent = ElasticAgent(
        LaunchConfig(**config),
        [sys.executable, "-u", "-c", code],
        handler,
        stdout=console.write_out,
        stderr=console.write_err,
        what="job.py",
    )
    return agent.run(), console, handler


def test_workers_get_torchrun_environment(tmp_path: Path) -> None:
    code = f"""
import json, os
keys = [k for k in os.environ if k in {sorted(_ENV_KEYS)!r}]
with open(os.path.join({str(tmp_path)!r}, os.environ["RANK"]), "w") as f:
    json.dump({{k: os.environ[k] for k in keys}}, f)
"""
    result, _, handler = run_agent(code, nproc_per_node=3, max_restarts=2, role="trainer")
    assert result.state is WorkerState.SUCCEEDED and result.exit_code == 0
    envs = [json.loads((tmp_path / str(r)).read_text()) for r in range(3)]
    attempt = envs[0]["RDZV_ATTEMPT_ID"]
    for rank, env in enumerate(envs):
        assert set(env) == _ENV_KEYS
        assert env["RANK"] == env["LOCAL_RANK"] == env["ROLE_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == env["ROLE_WORLD_SIZE"] == "3"
        assert (env["GROUP_RANK"], env["GROUP_WORLD_SIZE"]) == ("0", "1")
        assert env["ROLE_NAME"] == "trainer"
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29999")
        assert env["TORCHELASTIC_RUN_ID"] == "test"
        assert env["TORCHELASTIC_RESTART_COUNT"] == "0"
        assert env["TORCHELASTIC_MAX_RESTARTS"] == "2"
        assert env["TORCHELASTIC_USE_AGENT_STORE"] == "True"
        assert env["RDZV_ATTEMPT_ID"] == attempt
        assert env["TORCHELASTIC_ERROR_FILE"].endswith(f"attempt_0/{rank}/error.json")
        if "OMP_NUM_THREADS" not in os.environ:
            assert env["OMP_NUM_THREADS"] == "1"
    assert handler.shutdowns == 1


_ENV_KEYS = {
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE",
    "OMP_NUM_THREADS",
    "RDZV_ATTEMPT_ID",
}


def test_crash_once_is_restarted_with_a_new_attempt(tmp_path: Path) -> None:
    code = f"""
import os, sys
log = os.path.join({str(tmp_path)!r}, "starts")
with open(log, "a") as f:
    f.write(os.environ["RANK"] + " " + os.environ["TORCHELASTIC_RESTART_COUNT"] + " "
            + os.environ["RDZV_ATTEMPT_ID"] + "\\n")
if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    sys.exit(7)
"""
    result, _, handler = run_agent(code, max_restarts=1)
    assert result.state is WorkerState.SUCCEEDED and result.exit_code == 0
    assert result.restarts == 1 and handler.rounds == 2
    starts = [line.split() for line in (tmp_path / "starts").read_text().splitlines()]
    by_count = {c: {a for _, cc, a in starts if cc == c} for _, c, _ in starts}
    assert sorted(r for r, c, _ in starts if c == "1") == ["0", "1"]
    assert len(by_count["0"]) == len(by_count["1"]) == 1
    assert by_count["0"] != by_count["1"]


def test_always_failing_worker_stops_after_max_restarts(tmp_path: Path) -> None:
    code = f"""
import os, sys, time
if os.environ["LOCAL_RANK"] == "1":
    with open(os.path.join({str(tmp_path)!r}, "starts"), "a") as f:
        f.write("x\\n")
    print("first line", file=sys.stderr)
    print("RuntimeError: the disk is on fire", file=sys.stderr)
    sys.exit(3)
time.sleep(60)
"""
    result, console, _ = run_agent(code, max_restarts=2)
    assert result.state is WorkerState.FAILED
    assert result.exit_code == 3 and result.restarts == 2
    assert (tmp_path / "starts").read_text().count("x") == 3  # 3 attempts of the failing rank
    assert [f.rank for f in result.failures] == [1]
    summary = result.summary or ""
    assert "job.py FAILED after 2 restart(s) (max_restarts=2)" in summary
    assert "rank       : 1 (local_rank 1" in summary
    assert "exit code 3" in summary
    assert "| RuntimeError: the disk is on fire" in summary
    assert b"[1]: RuntimeError: the disk is on fire\n" in console.err


def test_signal_death_and_error_file_in_summary() -> None:
    code = """
import json, os, signal
if os.environ["LOCAL_RANK"] == "0":
    with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
        json.dump({"message": {"message": "ValueError: bad batch", "extraInfo": {}}}, f)
    os.kill(os.getpid(), signal.SIGKILL)
import time; time.sleep(60)
"""
    result, _, _ = run_agent(code)
    assert result.state is WorkerState.FAILED
    assert result.exit_code == 128 + signal.SIGKILL
    summary = result.summary or ""
    assert "signal SIGKILL (9)" in summary
    assert "error      : ValueError: bad batch" in summary
    assert "stderr     : (empty)" in summary


def test_first_failure_in_time_is_the_root_cause() -> None:
    code = """
import os, sys, time
rank = int(os.environ["RANK"])
if rank == 0:
    time.sleep(0.5); sys.exit(4)   # later, lower rank
if rank == 2:
    sys.exit(5)
time.sleep(60)
"""
    result, _, _ = run_agent(code, nproc_per_node=3)
    assert result.failures[0].rank == 2
    assert result.exit_code == 5


def test_waiting_nodes_restart_without_using_a_restart(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    code = f"""
import os, time
path = {str(marker)!r}
open(path, "a").write(os.environ["RDZV_ATTEMPT_ID"] + "\\n")
if len(open(path).read().split()) <= 2:  # the first attempt waits to be restarted
    time.sleep(60)
"""
    handler = LocalHandler()

    def scale_up() -> None:
        wait_for(lambda: marker.exists() and len(marker.read_text().split()) >= 2, 30)
        handler.waiting = 1

    thread = threading.Thread(target=scale_up)
    thread.start()
    result, _, _ = run_agent(code, handler=handler, max_restarts=0)
    thread.join()
    assert result.state is WorkerState.SUCCEEDED
    assert handler.rounds == 2 and result.restarts == 0
    assert len(set(marker.read_text().split())) == 2


def test_redirects_tee_and_filter(tmp_path: Path) -> None:
    code = """
import os, sys
print("out of", os.environ["LOCAL_RANK"])
print("err of", os.environ["LOCAL_RANK"], file=sys.stderr)
sys.stdout.write("no newline")
"""
    result, console, _ = run_agent(
        code,
        nproc_per_node=3,
        log_dir=str(tmp_path),
        redirects={0: Std.ALL},
        tee={1: Std.OUT},
        local_ranks_filter=frozenset({0, 1}),
    )
    assert result.state is WorkerState.SUCCEEDED
    (job,) = tmp_path.iterdir()
    assert job.name.startswith("none_")
    attempt = job / "attempt_0"
    assert (attempt / "0" / "stdout.log").read_text() == "out of 0\nno newline"
    assert (attempt / "0" / "stderr.log").read_text() == "err of 0\n"
    assert (attempt / "1" / "stdout.log").read_text() == "out of 1\nno newline"
    assert not (attempt / "1" / "stderr.log").exists()
    out = console.out.decode()
    err = console.err.decode()
    assert "out of 0" not in out and "err of 0" not in err  # redirected only
    assert "[1]: out of 1\n" in out and "[1]: no newline\n" in out
    assert "[1]: err of 1\n" in err
    assert "of 2" not in out + err  # filtered from the console


def test_stop_kills_the_whole_tree_and_escalates(tmp_path: Path) -> None:
    marker = f"rdzv-test-tree-{os.getpid()}-{time.monotonic_ns()}"
    code = f"""
import os, signal, subprocess, sys, time
if os.environ["LOCAL_RANK"] == "0":
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", {marker!r}]
    subprocess.Popen(sleeper)                            # same process group
    subprocess.Popen(sleeper, start_new_session=True)   # escaped into its own session
    signal.signal(signal.SIGTERM, signal.SIG_IGN)        # ignores the polite request
    open(os.path.join({str(tmp_path)!r}, "ready"), "w").close()
    time.sleep(60)
else:
    while not os.path.exists(os.path.join({str(tmp_path)!r}, "ready")):
        time.sleep(0.01)
    wait = time.monotonic() + 10
    while len([p for p in os.listdir("/proc") if p.isdigit()]) and time.monotonic() < wait:
        found = 0
        for p in os.listdir("/proc"):
            try:
                found += {marker!r}.encode() in open(f"/proc/{{p}}/cmdline", "rb").read()
            except OSError:
                pass
        if found >= 2:
            break
        time.sleep(0.01)
    sys.exit(1)
"""
    started = time.monotonic()
    result, _, _ = run_agent(code, shutdown_timeout=0.5)
    assert result.state is WorkerState.FAILED and result.failures[0].local_rank == 1
    assert time.monotonic() - started < 20
    assert alive_with_marker(marker) == []


def test_events_record_worker_status_with_durations() -> None:
    seen: list[events.Event] = []

    def listen(event: Any) -> None:
        if isinstance(event, events.Event):
            seen.append(event)

    remove = events.add_callback(listen)
    try:
        result, _, _ = run_agent("import time; time.sleep(0.2)")
    finally:
        remove()
    assert result.state is WorkerState.SUCCEEDED
    names = [e.name for e in seen]
    assert names.count("torchelastic.worker.status.HEALTHY") == 2
    succeeded = [e for e in seen if e.name == "torchelastic.worker.status.SUCCEEDED"]
    workers = [e for e in succeeded if e.source is events.EventSource.WORKER]
    assert sorted(e.metadata["global_rank"] for e in workers) == [0, 1]  # type: ignore[type-var]
    for event in workers:
        duration = event.metadata["duration_ms"]
        assert isinstance(duration, float) and duration >= 200
        assert event.metadata["run_id"] == "test" and event.metadata["rdzv_backend"] == "local"
    assert [e.source for e in succeeded].count(events.EventSource.AGENT) == 1
    rendezvous = [e for e in seen if e.name == "torchelastic.worker.status.RENDEZVOUS"]
    assert len(rendezvous) == 1 and rendezvous[0].metadata["duration_ms"] is not None


def test_command_not_found_is_an_agent_failure() -> None:
    agent = ElasticAgent(LaunchConfig(), ["/nonexistent/rdzv-worker"], LocalHandler())
    result = agent.run()
    assert result.state is WorkerState.FAILED and result.exit_code == 1
    assert "/nonexistent/rdzv-worker" in (result.message or "")


def test_sigterm_to_the_agent_is_forwarded(tmp_path: Path) -> None:
    code = f"""
import os, signal, sys, time
def bye(signum, frame):
    open(os.path.join({str(tmp_path)!r}, "term" + os.environ["RANK"]), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
open(os.path.join({str(tmp_path)!r}, "up" + os.environ["RANK"]), "w").close()
time.sleep(60)
"""

    def terminate() -> None:
        wait_for(lambda: (tmp_path / "up0").exists() and (tmp_path / "up1").exists(), 30)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=terminate)
    thread.start()
    result, _, handler = run_agent(code)
    thread.join()
    assert signal.getsignal(signal.SIGTERM) is before
    assert result.state is WorkerState.STOPPED
    assert result.exit_code == 128 + signal.SIGTERM and result.signal == signal.SIGTERM
    assert (tmp_path / "term0").exists() and (tmp_path / "term1").exists()
    assert handler.shutdowns == 0  # torch's rule: a signalled agent does not close the round


@pytest.mark.parametrize("nproc", [1, 4])
def test_nproc_workers_start(nproc: int) -> None:
    result, console, _ = run_agent(
        "import os; print('rank', os.environ['RANK'])", nproc_per_node=nproc
    )
    assert result.state is WorkerState.SUCCEEDED
    lines = sorted(console.out.decode().splitlines())
    assert lines == sorted(f"[{r}]: rank {r}" for r in range(nproc))


class _NoStoreHandler(LocalHandler):
    """A handler that offers no store for the workers: node 0's agent hosts one."""

    def next_rendezvous(self) -> RendezvousInfo:
        info = super().next_rendezvous()
        return RendezvousInfo(info.store, 0, 1, None)


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    ("config", "advertised", "warned"),
    [
        ({}, "127.0.0.1", False),  # one node: loopback only
        ({"max_nodes": 2, "local_addr": "127.0.0.1"}, "127.0.0.1", True),
        (
            {"max_nodes": 2, "rdzv_backend": "static", "rdzv_endpoint": "127.0.0.1:0"},
            "127.0.0.1",
            True,
        ),
    ],
)
def test_the_agents_own_store_binds_only_the_advertised_address(
    config: dict[str, Any],
    advertised: str,
    warned: bool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("RDZV_TOKEN", raising=False)
    caplog.set_level(logging.WARNING, logger="rdzv.launcher.agent")
    handler = _NoStoreHandler()
    agent = ElasticAgent(LaunchConfig(nproc_per_node=1, **config), ["x"], handler)
    try:
        addr, port, _ = agent._workers_store(handler.next_rendezvous())
        assert addr == advertised
        assert _reachable("127.0.0.1", port)
        assert not _reachable("127.0.0.2", port)  # not every interface, as torch's is
        text = caplog.text
        assert (
            "the workers' store on 127.0.0.1:" in text and "is unauthenticated" in text
        ) is warned
        if warned:
            assert "export RDZV_TOKEN=" in text
    finally:
        agent._cleanup()


def test_the_agents_own_store_takes_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from rdzv.errors import AuthError
    from rdzv.store.tcp import TCPStore

    token = "agent-store-token-0123456789abcdef"
    monkeypatch.setenv("RDZV_TOKEN", token)
    handler = _NoStoreHandler()
    agent = ElasticAgent(
        LaunchConfig(nproc_per_node=1, max_nodes=2, local_addr="127.0.0.1"), ["x"], handler
    )
    try:
        _, port, _ = agent._workers_store(handler.next_rendezvous())
        with TCPStore("127.0.0.1", port, token=token, timeout=5) as store:
            store.set("k", b"v")
        monkeypatch.delenv("RDZV_TOKEN")
        with pytest.raises(AuthError, match="requires authentication"):
            TCPStore("127.0.0.1", port, timeout=5)
    finally:
        agent._cleanup()


class _GoneStore(HashStore):
    """A round store whose host is gone for every write of the failure record."""

    def _compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        raise NetworkError("TCPStore(127.0.0.1:29400): connection refused (the store is gone)")


class _GoneHandler(LocalHandler):
    def next_rendezvous(self) -> RendezvousInfo:
        info = super().next_rendezvous()
        return RendezvousInfo(PrefixStore("gone", _GoneStore()), 0, 1, info.bootstrap_store_info)


def test_a_cause_that_cannot_be_published_still_reaches_the_local_console() -> None:
    code = "import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(7)\ntime.sleep(60)\n"
    result, console, _ = run_agent(code, _GoneHandler())
    assert result.exit_code == 7
    err = console.err.decode()
    assert "[rdzv run] root cause: rank 1 on node 0 (" in err and "exit code 7" in err


def test_an_early_clean_exit_is_no_failure_and_a_silent_worker_is_never_hung() -> None:
    # Rank 0 exits 0 at once; rank 1 never calls rdzv.heartbeat() and works for 1.5 s, ten
    # times the hang timeout.
    code = "import os, time\nif os.environ['RANK'] == '1':\n    time.sleep(1.5)\n"
    result, console, _ = run_agent(code, hang_timeout=0.15, monitor_interval=0.05)
    assert result.state is WorkerState.SUCCEEDED and result.exit_code == 0
    assert b"root cause" not in console.err
