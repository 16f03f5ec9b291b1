"""Helpers for end-to-end launcher tests: ``rdzv run`` agents as real processes."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import REPO, subprocess_env
from tests.launcher.procs import wait_for

#: A worker that records its environment, then behaves as ``argv[2]`` says.
WORKER = r"""
import json, os, sys, time
out, mode = sys.argv[1], sys.argv[2]
env = {k: v for k, v in os.environ.items()
       if k.startswith(("RANK", "LOCAL_", "WORLD_SIZE", "GROUP_", "ROLE_", "MASTER_",
                        "TORCHELASTIC_", "RDZV_"))}
env["pid"] = os.getpid()
env["agent_pid"] = os.getppid()
name = f"{env['RDZV_ATTEMPT_ID']}-{env['RANK']}.json"
with open(os.path.join(out, name + ".tmp"), "w") as f:
    json.dump(env, f)
os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
world = int(os.environ["WORLD_SIZE"])
want = int(sys.argv[3]) if len(sys.argv) > 3 else world

if mode in ("allgather", "allgather-crash-once"):
    import rdzv
    store = rdzv.connect(timeout=60)
    rank = int(os.environ["RANK"])
    store.set(f"v/{rank}", str(rank))
    if mode == "allgather-crash-once" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        store.add("crashes", 1)  # a key this attempt leaves behind
        if rank == 1:
            sys.exit(3)
        time.sleep(120)
    assert store.add("crashes", 0) == 0, "a previous attempt's keys leaked into this one"
    values = store.multi_get([f"v/{r}" for r in range(world)])
    store.barrier("done", world)
    print("gathered", sorted(int(v) for v in values), flush=True)
elif mode == "until-world":
    # Wait (to be restarted) until the world has the wanted size, then gather and exit.
    if world != want:
        time.sleep(120)
        sys.exit(9)
    import rdzv
    store = rdzv.connect(timeout=60)
    store.barrier("done", world)
    print("done at world", world, flush=True)
elif mode == "shrink":
    # Finish only in a world of 1 that follows a world of 2 (after losing a node).
    import glob
    seen = [json.load(open(p)) for p in glob.glob(os.path.join(out, "*.json"))]
    if world != 1 or not any(r["WORLD_SIZE"] == "2" for r in seen):
        time.sleep(120)
        sys.exit(9)
    print("done at world", world, flush=True)
"""


def rdzv_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rdzv", "run", *args]


def start_agent(*args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    """Start ``rdzv run ARGS`` with output captured as text."""
    return subprocess.Popen(
        rdzv_cmd(*args),
        env=subprocess_env(),
        cwd=str(cwd or REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_agent(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        rdzv_cmd(*args),
        env=subprocess_env(),
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def records(out: Path) -> list[dict[str, str]]:
    """Every environment record the workers wrote."""
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def attempts(out: Path) -> dict[str, list[dict[str, str]]]:
    """Records grouped by RDZV_ATTEMPT_ID."""
    grouped: dict[str, list[dict[str, str]]] = {}
    for record in records(out):
        grouped.setdefault(record["RDZV_ATTEMPT_ID"], []).append(record)
    return grouped


def wait_records(out: Path, predicate: object, timeout: float = 60, what: str = "records") -> None:
    assert callable(predicate)
    wait_for(lambda: bool(predicate(records(out))), timeout, what)


def finish(proc: subprocess.Popen[str], timeout: float = 90) -> tuple[int, str, str]:
    """Wait for an agent; kill it (and fail) if it does not end in time."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"agent did not finish in {timeout} s\nstdout:\n{out}\nstderr:\n{err}"
        ) from None
    return proc.returncode, out, err


@contextlib.contextmanager
def agents_cleanup(*procs: subprocess.Popen[str]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.communicate()


@contextlib.contextmanager
def store_server() -> Iterator[int]:
    """A TCPStore server on 127.0.0.1 (port from the kernel) for the agents' rendezvous; yields
    its port. Hosted outside the agents so that any agent may be killed."""
    from rdzv import TCPStore

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    try:
        yield int(server.port)
    finally:
        close = getattr(server, "close", None)
        if callable(close):
            close()


def write_worker(tmp_path: Path) -> Path:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    return script


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z":
            alive.append(pid)
    return alive
