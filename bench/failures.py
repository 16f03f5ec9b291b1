"""Failure attribution, hang detection and lost nodes: ``rdzv run`` next to ``torchrun``.

Two or three launchers on loopback (``--nnodes N --nproc-per-node P --rdzv-endpoint
127.0.0.1:PORT``, c10d backend, the rendezvous store hosted by a separate ``rdzv serve`` so
that any agent may die). Times are CLOCK_MONOTONIC, shared by every process of the machine.

Scenarios (``--scenario``):

* ``exit``: after a barrier, the last rank (on the last node) exits 3; the others block
  (rdzv workers in a store ``wait`` of ``rdzv.connect()``; torch workers in
  ``time.sleep``, which is what a rank blocked in a collective looks like to the launcher).
  Figures: seconds from that exit until each agent printed the root cause (``named``: it
  named the right rank, host and exit code) and until each agent exited, with its exit code.
* ``hang``: the last rank beats (``rdzv.heartbeat``) a few steps, then SIGSTOPs itself;
  ``--hang-timeout 5``. Figures: seconds from the stop until every agent named it; torchrun
  has no hang detection: it is given ``--cap`` seconds and reported as not detected.
* ``lost``: ``--nnodes 2:3`` with three agents; the last agent is SIGKILLed. Figure:
  seconds until the survivors' workers of the new (smaller) round start. ``--node-timeout``
  (rdzv) is 10 s as in the issue; the rendezvous keeps its default keep-alive (5 s x 3);
  ``last_call_timeout=1`` for both launchers (torch's default of 30 s would dominate).
* ``store``: the rendezvous store's process is SIGKILLed during the job. Figures: seconds
  until every agent exited and the number of console lines it printed meanwhile.
* ``heartbeat``: the cost of one ``rdzv.heartbeat(step)`` call in a worker (median of 5
  runs of 1,000,000 calls), and of the no-op outside ``rdzv run``.

Prints one JSON object (figures, workload, machine). The machine is shared: take the figures
as indications, repeat (``--repeat``) for spread.

    python bench/failures.py --scenario exit --repeat 3
    python bench/failures.py --scenario hang --launchers rdzv,torchrun
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WORKER = r"""
import os, signal, sys, time
out, scenario, launcher = sys.argv[1], sys.argv[2], sys.argv[3]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
with open(os.path.join(out, f"start-{world}-{rank}-{os.getpid()}"), "w") as f:
    f.write(repr(time.monotonic()))
if launcher == "rdzv":
    import rdzv
    store = rdzv.connect(timeout=300)
    beat = rdzv.heartbeat
else:
    from torch.distributed import TCPStore
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     use_libuv=True)
    beat = lambda step=None: None
key = "up-" + os.environ.get("RDZV_ATTEMPT_ID", os.environ.get("TORCHELASTIC_RESTART_COUNT"))
store.add(key, 1)
while int(store.add(key, 0)) < world:
    time.sleep(0.01)
last = rank == world - 1
if scenario == "exit" and last:
    with open(os.path.join(out, "event"), "w") as f:
        f.write(repr(time.monotonic()))
    sys.exit(3)
if scenario == "hang":
    for step in range(10):
        beat(step)
    if last:
        with open(os.path.join(out, "event"), "w") as f:
            f.write(repr(time.monotonic()))
        os.kill(os.getpid(), signal.SIGSTOP)
    if launcher == "rdzv":
        import threading
        def beating():
            for step in range(10, 100000):
                beat(step)
                time.sleep(0.1)
        threading.Thread(target=beating, daemon=True).start()
if scenario == "lost" and world == 2 * int(os.environ["LOCAL_WORLD_SIZE"]):
    sys.exit(0)  # the new, smaller round: done
if launcher == "rdzv" and scenario == "exit":
    store.wait(["never"])  # PeerFailedError when the root cause arrives
time.sleep(300)
"""

CAUSE = re.compile(r"root cause: rank (\d+) on node (\d+) \(([^)]*)\): exit code (\d+)")


class Agent:
    """One launcher process; its stderr/stdout lines are timestamped as they arrive."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[tuple[float, str]] = []
        self.exited_at: float | None = None
        self._threads = [
            threading.Thread(target=self._read, args=(s,), daemon=True)
            for s in (self.proc.stdout, self.proc.stderr)
        ]
        for t in self._threads:
            t.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self, deadline: float) -> int | None:
        try:
            code = self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None
        if self.exited_at is None:
            self.exited_at = time.monotonic()
        for t in self._threads:
            t.join(2)
        return code

    def first(self, pattern: str) -> tuple[float, str] | None:
        return next(((t, x) for t, x in self.lines if pattern in x), None)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def _alive_workers(out: Path, grace: float = 2.0) -> list[int]:
    """Worker pids (from their start files) still alive ``grace`` seconds from now."""
    pids = [int(p.name.rsplit("-", 1)[1]) for p in out.glob("start-*")]
    deadline = time.monotonic() + grace
    while True:
        alive = []
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_bytes()
            except OSError:
                continue
            if stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z":
                alive.append(pid)
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env.pop("RDZV_EVENTS", None)
    return env


def _cmd(launcher: str, args: argparse.Namespace, port: int, nnodes: str) -> list[str]:
    common = [
        "--nnodes",
        nnodes,
        "--nproc-per-node",
        str(args.nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        f"bench{port}",
        "--max-restarts",
        "0",
        "--monitor-interval",
        "0.1",
    ]
    if launcher == "rdzv":
        extra = ["--rdzv-conf", "is_host=false,last_call_timeout=1", "--local-addr", "127.0.0.1"]
        extra += ["--node-timeout", str(args.node_timeout)]
        if args.scenario == "hang":
            extra += ["--hang-timeout", str(args.hang_timeout)]
        return [sys.executable, "-m", "rdzv", "run", *common, *extra]
    torch_extra = ["--rdzv-conf", "last_call_timeout=1", "--local-addr", "127.0.0.1"]
    return [sys.executable, "-m", "torch.distributed.run", *common, *torch_extra]


def _serve(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdzv", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    from rdzv import TCPStore

    TCPStore("127.0.0.1", port, timeout=20, wait_for_workers=False).close()  # it is up
    return proc


def run_once(launcher: str, args: argparse.Namespace) -> dict[str, object]:
    env = _env()
    port = _free_port()
    server = _serve(port, env)
    nodes = 3 if args.scenario == "lost" else 2
    nnodes = "2:3" if args.scenario == "lost" else "2"
    with tempfile.TemporaryDirectory(prefix="rdzv-bench-failures-") as tmp:
        out = Path(tmp)
        script = out / "worker.py"
        script.write_text(WORKER)
        cmd = [*_cmd(launcher, args, port, nnodes), str(script), str(out), args.scenario, launcher]
        agents = [Agent(cmd, env) for _ in range(nodes)]
        world = nodes * args.nproc
        try:
            deadline = time.monotonic() + 120
            while len(list(out.glob(f"start-{world}-*"))) < world:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{launcher}: the workers did not start")
                time.sleep(0.02)
            result: dict[str, object] = {"launcher": launcher}
            if args.scenario in ("exit", "hang"):
                result |= _exit_or_hang(agents, out, args, launcher)
            elif args.scenario == "lost":
                result |= _lost(agents, out, args)
            else:
                result |= _store(agents, server, args)
            return result
        finally:
            for agent in agents:
                agent.kill()
            # Workers left behind once every agent is gone (rdzv's watchdog kills them;
            # torchrun has none): counted, then killed so the benchmark leaves nothing.
            leftover = _alive_workers(out)
            if "result" in locals():
                result["orphans_after_agents_gone"] = len(leftover)
            for pid in leftover:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if os.environ.get("BENCH_DEBUG"):
                for i, agent in enumerate(agents):
                    for t, line in agent.lines:
                        print(f"agent{i} {t:.3f} {line}", file=sys.stderr)
            server.kill()
            server.wait()


def _exit_or_hang(
    agents: list[Agent], out: Path, args: argparse.Namespace, launcher: str
) -> dict[str, object]:
    deadline = time.monotonic() + args.cap
    codes = [a.wait(deadline) for a in agents]
    event = float((out / "event").read_text()) if (out / "event").exists() else None
    per_agent = []
    for agent, code in zip(agents, codes, strict=True):
        named = agent.first("root cause:")
        entry: dict[str, object] = {"exit_code": code}
        if event is not None:
            entry["named_s"] = None if named is None else round(named[0] - event, 3)
            entry["exited_s"] = (
                None if agent.exited_at is None else round(agent.exited_at - event, 3)
            )
        if named is not None:
            m = CAUSE.search(named[1])
            rank = str(len(agents) * args.nproc - 1)
            entry["named_right"] = (
                bool(m and m.group(1) == rank and m.group(4) == "3")
                if args.scenario == "exit"
                else f"rank {rank} on node {len(agents) - 1}" in named[1]
            )
        else:
            text = "\n".join(x for _, x in agent.lines)
            entry["named_right"] = False
            entry["mentions_exitcode_3"] = "exitcode  : 3" in text or "exitcode: 3" in text
            summary = agent.first("exitcode")
            if summary is not None and event is not None:
                entry["failure_summary_s"] = round(summary[0] - event, 3)
        per_agent.append(entry)
    return {"agents": per_agent}


def _lost(agents: list[Agent], out: Path, args: argparse.Namespace) -> dict[str, object]:
    victim = agents[-1]
    killed = time.monotonic()
    victim.kill()
    smaller = 2 * args.nproc
    deadline = killed + args.cap
    while len(list(out.glob(f"start-{smaller}-*"))) < smaller:
        if time.monotonic() > deadline:
            return {"new_round_s": None, "note": f"no new round within {args.cap} s"}
        time.sleep(0.02)
    starts = [float(p.read_text()) for p in out.glob(f"start-{smaller}-*")]
    named = [a.first("root cause: node") for a in agents[:-1]]
    return {
        "new_round_s": round(max(starts) - killed, 3),
        "named_lost_s": [None if n is None else round(n[0] - killed, 3) for n in named],
    }


def _store(
    agents: list[Agent], server: subprocess.Popen[bytes], args: argparse.Namespace
) -> dict[str, object]:
    time.sleep(1.0)
    before = [len(a.lines) for a in agents]
    killed = time.monotonic()
    server.kill()
    deadline = killed + args.cap
    codes = [a.wait(deadline) for a in agents]
    return {
        "agents": [
            {
                "exit_code": code,
                "exited_s": None if a.exited_at is None else round(a.exited_at - killed, 3),
                "lines_after": len(a.lines) - b,
                "last_line": a.lines[-1][1][:200] if a.lines else None,
            }
            for a, code, b in zip(agents, codes, before, strict=True)
        ]
    }


HEARTBEAT = r"""
import os, sys, time
import rdzv
n = int(sys.argv[1])
heartbeat = rdzv.heartbeat
heartbeat(0)
best = []
for _ in range(5):
    t = time.perf_counter()
    for step in range(n):
        heartbeat(step)
    best.append((time.perf_counter() - t) / n)
best.sort()
print(best[len(best) // 2] * 1e9)
"""


def heartbeat_cost(calls: int) -> dict[str, object]:
    """ns per call under rdzv run (a heartbeat file is set) and outside (no-op)."""
    env = _env()
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="rdzv-bench-hb-") as tmp:
        path = Path(tmp) / "heartbeat"
        path.write_bytes(bytes(16))
        for name, extra in (
            ("under_rdzv_run_ns", {"RDZV_HEARTBEAT_FILE": str(path)}),
            ("outside_ns", {}),
        ):
            run_env = {k: v for k, v in env.items() if k != "RDZV_HEARTBEAT_FILE"} | extra
            done = subprocess.run(
                [sys.executable, "-c", HEARTBEAT, str(calls)],
                env=run_env,
                capture_output=True,
                text=True,
                check=True,
            )
            out[name] = round(float(done.stdout), 1)
        count = int.from_bytes(path.read_bytes()[:8], "little")
        out["beats_seen_in_file"] = count
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--scenario", choices=["exit", "hang", "lost", "store", "heartbeat"], default="exit"
    )
    p.add_argument("--launchers", default="rdzv,torchrun")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--hang-timeout", type=float, default=5.0)
    p.add_argument("--node-timeout", type=float, default=10.0)
    p.add_argument("--cap", type=float, default=40.0, help="seconds before giving up a run")
    args = p.parse_args()
    if args.scenario == "heartbeat":
        figures = heartbeat_cost(1_000_000)
        print(
            json.dumps(
                {
                    "figure": "failures/heartbeat",
                    "summary": figures,
                    "machine": {
                        "python": platform.python_version(),
                        "platform": platform.platform(),
                        "cpus": os.cpu_count(),
                    },
                },
                indent=1,
            )
        )
        return
    runs = []
    for _ in range(args.repeat):
        for launcher in args.launchers.split(","):
            runs.append(run_once(launcher, args))
    summary: dict[str, object] = {}
    for launcher in args.launchers.split(","):
        mine = [r for r in runs if r["launcher"] == launcher]
        if args.scenario in ("exit", "hang"):
            named = [
                a["named_s"]
                for r in mine
                for a in r["agents"]  # type: ignore[attr-defined]
                if a.get("named_s") is not None
            ]
            summary[launcher] = {
                "named_s_median": statistics.median(named) if named else None,
                "named_s_max": max(named) if named else None,
            }
        elif args.scenario == "lost":
            rounds = [r["new_round_s"] for r in mine if r.get("new_round_s") is not None]
            summary[launcher] = {"new_round_s_max": max(rounds) if rounds else None}
    print(
        json.dumps(
            {
                "figure": f"failures/{args.scenario}",
                "summary": summary,
                "runs": runs,
                "workload": {
                    "scenario": args.scenario,
                    "nodes": 3 if args.scenario == "lost" else 2,
                    "nproc_per_node": args.nproc,
                    "hang_timeout": args.hang_timeout,
                    "node_timeout": args.node_timeout,
                    "repeat": args.repeat,
                },
                "machine": {
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
