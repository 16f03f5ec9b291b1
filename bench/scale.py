"""Benchmark: the dynamic rendezvous at 1,000 to 16,000 nodes against a real ``rdzv serve``.

Each node is an :class:`~rdzv.rendezvous.async_node.AsyncRendezvousNode` (the decision core of
the handler, run by the asyncio executor) with its own connection to the server; the nodes
are spread over worker processes (one process holds at most ~19,000 descriptors here), and
the heartbeats of one process share one connection (a node-local agent's). The server is
``python -m rdzv serve`` in its own process, so its CPU seconds and peak RSS are its own.

    python bench/scale.py [--sizes 1024,4096,10000] [--procs 4] [--repeat 1]
        [--loss 4096] [--interval 1] [--attempts 3] [--profile DIR]

Figures per N (min = max = N, all nodes connected first, then released at once):
``seconds`` from the release to the last node holding its rank; ``ops_per_node`` store
operations (rendezvous and heartbeats); ``clients_cpu_s`` the CPU seconds of all worker
processes during the round (the harness and the nodes' own work); ``server_cpu_s_per_node``
the server's CPU seconds (user + system, per-thread schedstat, ns) in the round over N;
``server_rss_per_conn_bytes`` the server's RSS growth from idle to all connected, per
connection; ``server_peak_rss_mb``; ``last_slot_taken_s`` when the last node held its slot
(the join phase; the rest is closing the round and delivering the ranks).

``--loss N``: N nodes with min = N - 1, max = N complete a round; one node then dies (its
heartbeats stop, its connection closes) and the others call ``next_rendezvous`` at once:
``seconds`` from the death to the last survivor holding its rank in the new round, to set
against the detection time (keep-alive interval x attempts).

Profiling: ``RDZV_BENCH_LOG=1`` logs the rendezvous (who declared whom dead, when each round
closed), the victim's death and every worker's event-loop lag, with wall-clock times that
compare across processes; ``--profile DIR`` writes each worker's cProfile from the release on.

Prints one JSON document (machine, load, workload, results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from children import listening_port, receive
from procstat import cpu_ns, memory_bytes

_REPO = Path(__file__).resolve().parent.parent
for _p in (str(_REPO / "src"), str(_REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

HOST = "127.0.0.1"


# ---------------------------------------------------------------------------- the server
class Server:
    """``rdzv serve`` in a child process, with its CPU seconds and memory from /proc."""

    def __init__(self, extra: list[str]) -> None:
        env = dict(os.environ, PYTHONPATH=str(_REPO / "src"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rdzv", "serve", "--host", HOST, "--port", "0", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.port = listening_port(self.proc, "rdzv serve")

    def cpu(self) -> float:
        """CPU seconds of the server so far, at nanosecond resolution (a 1,024-node round
        costs the server ~0.04 s: clock ticks of 10 ms would be a 25 % error)."""
        return cpu_ns(self.proc.pid) / 1e9

    def mem(self, field: str) -> int:
        """``VmRSS`` or ``VmHWM`` in bytes."""
        return memory_bytes(self.proc.pid, field)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


# ---------------------------------------------------------------------------- worker process
async def _watch_loop_lag(period: float = 0.2, report: float = 0.1) -> None:
    """Log when this worker's event loop ran ``report`` seconds or more late, with the CPU
    seconds the process had meanwhile: late with little CPU means the process was not
    scheduled (the machine is shared), late with CPU means its own work (``RDZV_BENCH_LOG``)."""
    loop = asyncio.get_running_loop()
    log = logging.getLogger("rdzv.bench")
    while True:
        started, cpu = loop.time(), time.process_time()
        await asyncio.sleep(period)
        late = loop.time() - started - period
        if late >= report:
            log.info("loop %.3fs late, process CPU %.3fs", late, time.process_time() - cpu)


async def _worker_main(
    port: int, count: int, n: int, min_nodes: int, run_id: str, args: dict[str, Any], pipe: Any
) -> None:
    from rdzv.rendezvous.async_node import AsyncRendezvousNode
    from rdzv.rendezvous.decision import RendezvousTimeout
    from rdzv.store.async_tcp import AsyncTCPStore

    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(128)

    async def connect() -> AsyncTCPStore:
        async with gate:
            return await AsyncTCPStore(HOST, port, timeout=120, wait_for_workers=False).connect()

    shared = await connect()
    stores = await asyncio.gather(*(connect() for _ in range(count)))
    timeout = RendezvousTimeout(join=args["budget"], last_call=args["last_call"])
    nodes = [
        AsyncRendezvousNode(
            run_id,
            store,
            min_nodes,
            n,
            timeout=timeout,
            keep_alive_interval=args["interval"],
            keep_alive_max_attempt=args["attempts"],
            master_endpoint=(HOST, port),
            keep_alive_store=shared,
        )
        for store in stores
    ]
    recv = lambda: loop.run_in_executor(None, pipe.recv)  # noqa: E731 - keeps the loop running

    joined_at: list[float] = []

    def timed(node: AsyncRendezvousNode) -> None:
        effect = node._effect

        def record(op: Any) -> Any:
            if getattr(op, "key", None):
                joined_at.append(time.monotonic())  # the node holds a slot: Track(its key)
            return effect(op)

        node._effect = record  # type: ignore[method-assign]

    for node in nodes:
        timed(node)

    async def one(node: AsyncRendezvousNode) -> tuple[float, int | str]:
        try:
            done = await node.next_rendezvous()
        except Exception as exc:  # reported, not raised: the parent counts them
            return time.monotonic(), f"{type(exc).__name__}: {exc}"
        return time.monotonic(), done.rank

    async def round_(members: list[AsyncRendezvousNode]) -> dict[str, Any]:
        before = sum(node.ops[0] for node in nodes)
        joined_at.clear()
        cpu = time.process_time()
        results = await asyncio.gather(*(one(node) for node in members))
        return {
            "cpu": time.process_time() - cpu,
            "last_joined": max(joined_at, default=0.0),
            "done": [t for t, r in results if isinstance(r, int)],
            "ranks": [r for _, r in results if isinstance(r, int)],
            "errors": [r for _, r in results if isinstance(r, str)][:3],
            "n_errors": sum(1 for _, r in results if isinstance(r, str)),
            "ops": sum(node.ops[0] for node in nodes) - before,
        }

    lag = loop.create_task(_watch_loop_lag()) if os.environ.get("RDZV_BENCH_LOG") else None
    profile = None
    if args["profile"]:  # the worker's Python profile from the release on (see --profile)
        import cProfile

        profile = cProfile.Profile()
    pipe.send("ready")
    assert await recv() == "go"
    if profile is not None:
        profile.enable()
    pipe.send(await round_(nodes))
    command = await recv()
    if command == "loss":
        survivors = nodes
        if args["victim"]:
            victim, survivors = nodes[0], nodes[1:]
            victim.stop()
            logging.getLogger("rdzv.bench").info("the victim %s stopped", victim.node)
            await victim._store.close()
            pipe.send(time.monotonic())
        pipe.send(await round_(survivors))
        await recv()
    if lag is not None:
        lag.cancel()
    if profile is not None:
        profile.disable()
        profile.dump_stats(os.path.join(args["profile"], f"worker-{os.getpid()}.prof"))
    os._exit(0)  # no orderly goodbye for thousands of connections


def _worker(
    port: int, count: int, n: int, min_nodes: int, run_id: str, args: dict[str, Any], pipe: Any
) -> None:
    if os.environ.get("RDZV_BENCH_LOG"):  # the rendezvous' own log, wall-clock times
        logging.basicConfig(
            level=logging.INFO, format="%(created).3f %(process)d %(name)s %(message)s"
        )
    else:
        logging.disable(logging.CRITICAL)
    if args["uvloop"]:
        import uvloop

        uvloop.install()
    try:
        asyncio.run(_worker_main(port, count, n, min_nodes, run_id, args, pipe))
    except BaseException as exc:  # reported to the parent, which fails the trial with it
        pipe.send({"error": f"{type(exc).__name__}: {exc}"})
        raise


# ---------------------------------------------------------------------------- one trial
def trial(n: int, procs: int, args: dict[str, Any], loss: bool = False) -> dict[str, Any]:
    server = Server(args["server_args"])
    try:
        return _trial(server, n, procs, args, loss)
    except RuntimeError as exc:
        return {"seconds": None, "failed": str(exc)}
    finally:
        server.stop()


def _trial(server: Server, n: int, procs: int, args: dict[str, Any], loss: bool) -> dict[str, Any]:
    run_id = f"scale-{n}-{os.getpid()}-{time.monotonic_ns()}"
    ctx = mp.get_context("spawn")
    k = max(1, min(procs, n))
    shares = [n // k + (1 if i < n % k else 0) for i in range(k)]
    min_nodes = n - 1 if loss else n
    rss_idle = server.mem("VmRSS")
    pipes: list[Connection] = []
    workers = []
    for i, share in enumerate(shares):
        parent, child = ctx.Pipe()
        wargs = dict(args, victim=loss and i == 0)
        proc = ctx.Process(
            target=_worker, args=(server.port, share, n, min_nodes, run_id, wargs, child)
        )
        proc.start()
        pipes.append(parent)
        workers.append(proc)
    try:
        wait = args["budget"] + 60
        for pipe in pipes:
            assert receive(pipe, wait) == "ready"
        connections = n + k
        rss_connected = server.mem("VmRSS")
        cpu0 = server.cpu()
        start = time.monotonic()
        for pipe in pipes:
            pipe.send("go")
        first = [receive(pipe, wait) for pipe in pipes]
        cpu1 = server.cpu()
        result = _summary(first, start, n, cpu1 - cpu0)
        result.update(
            server_rss_per_conn_bytes=round((rss_connected - rss_idle) / connections),
            connections=connections,
        )
        if loss:
            for pipe in pipes:
                pipe.send("loss")
            death = receive(pipes[0], wait)
            cpu2 = server.cpu()
            second = [receive(pipe, wait) for pipe in pipes]
            result["loss"] = _summary(second, death, n - 1, server.cpu() - cpu2)
            result["loss"]["detection_s"] = args["interval"] * args["attempts"]
            for pipe in pipes:
                pipe.send("end")
        else:
            for pipe in pipes:
                pipe.send("end")
        result["server_peak_rss_mb"] = round(server.mem("VmHWM") / 2**20, 1)
        return result
    finally:
        for proc in workers:
            proc.join(30)
            if proc.is_alive():
                proc.kill()


def _summary(reports: list[dict[str, Any]], start: float, n: int, cpu: float) -> dict[str, Any]:
    done = [t for r in reports for t in r["done"]]
    ranks = sorted(x for r in reports for x in r["ranks"])
    complete = len(done) == n and ranks == list(range(n))
    return {
        "seconds": round(max(done) - start, 4) if complete else None,
        "last_slot_taken_s": round(max(r["last_joined"] for r in reports) - start, 4),
        "complete": complete,
        "completed": len(done),
        "errors": sum(r["n_errors"] for r in reports),
        "error_samples": [e for r in reports for e in r["errors"]][:3],
        "ops_per_node": round(sum(r["ops"] for r in reports) / n, 2),
        "server_cpu_s": round(cpu, 4),
        "clients_cpu_s": round(sum(r["cpu"] for r in reports), 3),
        "server_cpu_s_per_node": round(cpu / n, 7),
    }


def _load() -> dict[str, Any]:
    one, five, _ = os.getloadavg()
    return {"loadavg_1m": round(one, 2), "loadavg_5m": round(five, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,4096,10000")
    parser.add_argument("--procs", type=int, default=4, help="worker processes per trial")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--budget", type=float, default=120.0, help="join timeout, seconds")
    parser.add_argument("--interval", type=float, default=1.0, help="keep-alive interval, s")
    parser.add_argument("--attempts", type=int, default=3, help="keep-alive max attempts")
    parser.add_argument("--last-call", type=float, default=0.1, help="last call, seconds")
    parser.add_argument("--loss", type=int, default=0, help="N of the node-loss scenario")
    parser.add_argument("--no-uvloop", action="store_true", help="asyncio's loop in workers")
    parser.add_argument("--server-arg", action="append", default=[], help="for rdzv serve")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="write each worker's cProfile (from the release on) to DIR/worker-<pid>.prof",
    )
    opts = parser.parse_args()
    args = {
        "budget": opts.budget,
        "interval": opts.interval,
        "attempts": opts.attempts,
        "last_call": opts.last_call,
        "uvloop": not opts.no_uvloop,
        "server_args": opts.server_arg,
        "profile": opts.profile,
    }
    results: dict[str, Any] = {}
    sizes = [int(s) for s in opts.sizes.split(",") if s]
    for n in sizes:
        runs = []
        for _ in range(opts.repeat):
            runs.append(dict(trial(n, opts.procs, args), load_after=_load()))
            print(json.dumps({"n": n, **runs[-1]}), file=sys.stderr, flush=True)
        secs = sorted(r["seconds"] for r in runs if r["seconds"] is not None)
        results[str(n)] = {"median_seconds": secs[len(secs) // 2] if secs else None, "runs": runs}
    if opts.loss:
        results[f"loss_{opts.loss}"] = trial(opts.loss, opts.procs, args, loss=True)
    ratios = {}
    if "1024" in results and "4096" in results:
        a, b = results["1024"]["median_seconds"], results["4096"]["median_seconds"]
        if a and b:
            ratios["time_4096_over_1024"] = round(b / a, 2)
    doc = {
        "benchmark": "dynamic rendezvous at scale (asyncio nodes, rdzv serve)",
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "shared": "2 cores shared with other engineers' work",
            "load_before": _load(),
        },
        "workload": {
            "procs": opts.procs,
            "keep_alive_interval_s": opts.interval,
            "keep_alive_max_attempt": opts.attempts,
            "last_call_s": opts.last_call,
            "client_loop": "uvloop" if args["uvloop"] else "asyncio",
            "server_args": opts.server_arg,
        },
        "results": results,
        "ratios": ratios,
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
