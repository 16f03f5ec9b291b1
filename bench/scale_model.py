"""A discrete-event model of the dynamic rendezvous on one ``rdzv serve`` (issue 11, item 3).

The nodes are the real decision core (:class:`rdzv.rendezvous.decision.RendezvousCore`, the
code every executor runs), one program per node, driven on a virtual clock: each store
operation it yields costs client CPU, half a network round trip, its turn at a single-threaded
server (a FIFO queue with a per-request CPU cost) and half a round trip back; a ``get``/``wait``
on a missing key parks on the server until a write creates it (each wake-up costs the server a
reply) or its timeout; heartbeats are the liveness backend's own ``keep_alive_program`` every
interval. Nothing is sent over a socket: the store is a dict with torch's semantics.

Two settings of the client side:

* ``harness``: what ``bench/scale.py`` measures here (N coroutine nodes in ``--procs`` client
  processes, the server and the clients sharing ``--cores`` CPUs): each client process is a
  FIFO CPU, and every CPU cost is stretched by (processes + 1) / cores. Used to check the model
  against the measured points.
* ``cluster``: a real job, one node per host (its client CPU is its own), a data-centre round
  trip; the server has a core of its own.

Scenarios: one round of N nodes released at once (min = max = N), and a re-rendezvous after a
node loss (min = N - 1: one node dies after a round, the others call ``next_rendezvous`` at
once; the time from the death to the last survivor's rank). Then the limits of one server
(descriptors, memory, CPU of heartbeats and of the workers' ``init_process_group`` storm) and
the node-local proxy that would lift them.

Usage (from the repository root; pure Python, seconds to a minute):

    python bench/scale_model.py                       # check (1K-16K) + 100,000 nodes
    python bench/scale_model.py --sizes 1024,4096 --mode harness
    python bench/scale_model.py --calibrate           # measure the server costs here

Prints one JSON document. The cost terms, each with its source, are in ``COSTS`` (and
docs/scale.md).
"""

from __future__ import annotations

import argparse
import functools
import heapq
import itertools
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from procstat import cpu_seconds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rdzv.errors import StoreTimeoutError
from rdzv.rendezvous.decision import (
    Bootstrap,
    RendezvousCore,
    RendezvousSettings,
    RendezvousTimeout,
    Track,
)
from rdzv.rendezvous.liveness import HeartbeatLiveness
from rdzv.rendezvous.ops import (
    Add,
    Check,
    CompareSet,
    DeleteKey,
    Effect,
    Get,
    MultiGet,
    MultiSet,
    Now,
    Op,
    Set,
    Wait,
)
from rdzv.rendezvous.state import RunKeys


@dataclass(frozen=True)
class Costs:
    """The cost terms (seconds, bytes). ``SOURCES`` says where each comes from."""

    #: Server CPU per request (parse, execute, reply) in a storm of small requests.
    server_request: float = 12e-6
    #: Server CPU per key beyond the first of a multi-key request (multi_get, multi_set, check).
    server_key: float = 0.3e-6
    #: Server CPU per parked waiter woken by a write (its reply).
    server_wake: float = 9e-6
    #: Server CPU per accepted connection (accept, handshake: VALIDATE + PING).
    server_accept: float = 115e-6
    #: Client CPU per store operation of a node (asyncio, the decision core, JSON records).
    client_op: float = 70e-6
    #: Network round trip (seconds): loopback / a data centre.
    rtt_loopback: float = 15e-6
    rtt_cluster: float = 100e-6
    #: Server memory per open connection (bytes) and per node's keys (bytes).
    rss_per_connection: float = 2.5 * 1024
    bytes_per_node_keys: float = 350.0
    #: Descriptors one process may hold here (hard limit 20,000, less the server's own).
    descriptors_here: int = 19_000


_CALIBRATED = (
    "python bench/scale_model.py --calibrate (2,000 connections to rdzv serve, its /proc CPU"
)
SOURCES = {
    "server_request": _CALIBRATED + ", 20,000 adds; 11-14 us in 4 runs); bench/scale.py's 46-59 us "
    "of server CPU per node (~4 requests, 1 wake-up, the closer's share) agrees",
    "server_key": _CALIBRATED + ", multi_get of 1,000 keys; 0.19-0.39 us in 4 runs)",
    "server_wake": _CALIBRATED + ", 1,999 parked gets woken by one set; 6-10 us in 4 runs)",
    "server_accept": _CALIBRATED + ", connect + VALIDATE + PING; 100-135 us in 4 runs)",
    "client_op": "bench/scale.py: clients' CPU 0.26-0.30 ms per node over ~4.0 ops per node",
    "rtt_loopback": "docs/performance.md: one client's p50 request latency on loopback, 14.7-17 us "
    "(round trip and server work together)",
    "rtt_cluster": "assumed: a data-centre TCP round trip (not measured here)",
    "rss_per_connection": "bench/scale.py: server RSS per connection 1.5-2.5 KB (1K-16K)",
    "bytes_per_node_keys": "bench/rendezvous.py: ~348 bytes per node per round",
    "descriptors_here": "this machine: RLIMIT_NOFILE hard limit 20,000 per process",
}


# ---------------------------------------------------------------------------- the simulation
class _Node:
    __slots__ = (
        "beat",
        "beat_key",
        "dead",
        "done_at",
        "index",
        "liveness",
        "ops",
        "proc",
        "program",
        "result",
    )

    def __init__(self, index: int, proc: int, beat: bool = False) -> None:
        self.index = index
        #: A heartbeat's program (not counted as a node's call).
        self.beat = beat
        self.proc = proc
        self.program: Any = None
        self.beat_key: str | None = None
        self.dead = False
        self.done_at: float | None = None
        self.result: Any = None
        self.ops = 0
        #: The node's own liveness backend (it remembers the last value of its key).
        self.liveness: Any = None


class Simulation:
    """One server, N nodes, a virtual clock. CPU costs are stretched by ``stretch``; client CPU
    is queued per client process in ``procs`` processes (0: each node has its own CPU)."""

    def __init__(
        self,
        costs: Costs,
        rtt: float,
        procs: int,
        stretch: float,
        interval: float,
        attempts: int,
    ) -> None:
        self.c = costs
        self.rtt = rtt
        self.stretch = stretch
        self.interval = interval
        self.attempts = attempts
        self.clock = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.data: dict[str, bytes] = {}
        self.parked: dict[str, list[tuple[_Node, Op, list[bool]]]] = {}
        self.server_free = 0.0
        self.server_busy = 0.0
        self.proc_free = [0.0] * max(procs, 1)
        self.per_proc = procs > 0
        self.requests = 0
        #: Nodes' calls (not heartbeats) finished so far.
        self.finished = 0
        #: Store operations per node of the last round (set by _round).
        self.ops_per_node = 0.0

    # ---- events
    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn))

    def run(self, until: Callable[[], bool], horizon: float) -> None:
        while self._events and not until():
            t, _, fn = heapq.heappop(self._events)
            if t > horizon:
                raise RuntimeError(f"the model did not finish within {horizon} s")
            self.clock = t
            fn()

    # ---- costs
    def _client(self, node: _Node) -> float:
        """When this node's client CPU for one operation is done."""
        cost = self.c.client_op * self.stretch
        if not self.per_proc:
            return self.clock + cost
        start = max(self.clock, self.proc_free[node.proc])
        self.proc_free[node.proc] = start + cost
        return start + cost

    def _serve(self, cost: float) -> float:
        """Queue ``cost`` seconds of server CPU; when it is done."""
        cost *= self.stretch
        start = max(self.clock, self.server_free)
        self.server_free = start + cost
        self.server_busy += cost
        return self.server_free

    def _cost(self, op: Op) -> float:
        keys = len(op.keys) if isinstance(op, (MultiGet, MultiSet, Check, Wait)) else 1
        return self.c.server_request + self.c.server_key * max(0, keys - 1)

    # ---- the store (torch's semantics)
    def _missing(self, op: Op) -> list[str]:
        if isinstance(op, Get):
            return [] if op.key in self.data else [op.key]
        if isinstance(op, (Wait, MultiGet)):
            return [k for k in op.keys if k not in self.data]
        return []

    def _perform(self, op: Op) -> Any:
        d = self.data
        written: list[str] = []
        result: Any = None
        if isinstance(op, Add):
            result = int(d.get(op.key, b"0")) + op.amount
            d[op.key] = str(result).encode()
            written = [op.key]
        elif isinstance(op, CompareSet):
            current = d.get(op.key)
            if (current is None and op.expected == b"") or current == op.expected:
                d[op.key] = op.desired
                result, written = op.desired, [op.key]
            else:
                result = op.expected if current is None else current
        elif isinstance(op, Check):
            result = all(k in d for k in op.keys)
        elif isinstance(op, MultiGet):
            result = [d[k] for k in op.keys]
        elif isinstance(op, MultiSet):
            d.update(zip(op.keys, op.values, strict=True))
            written = list(op.keys)
        elif isinstance(op, Set):
            d[op.key] = op.value
            written = [op.key]
        elif isinstance(op, DeleteKey):
            result = d.pop(op.key, None) is not None
        elif isinstance(op, Get):
            result = d[op.key]
        elif isinstance(op, Wait):
            result = None
        else:
            raise TypeError(f"the model has no store operation {op!r}")
        for key in written:
            for waiter in self.parked.pop(key, ()):
                self._wake(*waiter)
        return result

    def _wake(self, node: _Node, op: Op, live: list[bool]) -> None:
        if not live[0] or self._missing(op):
            if live[0]:  # still missing another key: park again on it
                self.parked.setdefault(self._missing(op)[0], []).append((node, op, live))
            return
        live[0] = False
        done = self._serve(self.c.server_wake)
        self.at(done + self.rtt / 2, lambda: self._resume(node, self._perform(op), None))

    # ---- a node's program
    def start(self, node: _Node, program: Any) -> None:
        node.program = program
        self._resume(node, None, None)

    def _resume(self, node: _Node, value: Any, error: Exception | None) -> None:
        """Advance the node's program to its next store operation (or its end)."""
        if node.dead:
            return
        program = node.program
        while True:
            try:
                op = program.throw(error) if error is not None else program.send(value)
            except StopIteration as stop:
                node.done_at, node.result = self.clock, stop.value
                self.finished += not node.beat
                return
            except Exception as exc:  # the node's call fails: reported by _round
                node.done_at, node.result = self.clock, exc
                self.finished += not node.beat
                return
            error = value = None
            if isinstance(op, Now):
                value = self.clock
            elif isinstance(op, Effect):
                if isinstance(op, Track):
                    self._track(node, op.key)
                elif isinstance(op, Bootstrap):
                    value = ("10.0.0.1", 29500)
            else:
                break
        node.ops += 1
        sent = self._client(node) + self.rtt / 2
        self.at(sent, lambda: self._arrive(node, op))

    def _arrive(self, node: _Node, op: Op) -> None:
        self.requests += 1
        done = self._serve(self._cost(op))
        self.at(done, lambda: self._execute(node, op))

    def _execute(self, node: _Node, op: Op) -> None:
        missing = self._missing(op)
        if missing:
            live = [True]
            self.parked.setdefault(missing[0], []).append((node, op, live))
            timeout = getattr(op, "timeout", None)
            self.at(
                self.clock + (600.0 if timeout is None else timeout),
                lambda: self._expire(node, op, live),
            )
            return
        result = self._perform(op)
        self.at(self.clock + self.rtt / 2, lambda: self._resume(node, result, None))

    def _expire(self, node: _Node, op: Op, live: list[bool]) -> None:
        if live[0]:
            live[0] = False
            error = StoreTimeoutError(f"timeout waiting for {self._missing(op)}")
            self.at(self.clock + self.rtt / 2, lambda: self._resume(node, None, error))

    # ---- heartbeats: the liveness backend's own keep-alive program, every interval
    def _track(self, node: _Node, key: str | None) -> None:
        first = node.beat_key is None
        node.beat_key = key
        if first and key is not None:
            self.at(self.clock + self.interval, lambda: self._beat(node))

    def _beat(self, node: _Node) -> None:
        if node.dead or node.beat_key is None:
            return
        beat = _Node(node.index, node.proc, beat=True)
        self.start(beat, node.liveness.keep_alive_program(node.beat_key))
        self.at(self.clock + self.interval, lambda: self._beat(node))


# ---------------------------------------------------------------------------- scenarios
def _cores(n: int, min_nodes: int, interval: float, attempts: int) -> list[RendezvousCore]:
    settings = RendezvousSettings.checked(
        "model", min_nodes, n, RendezvousTimeout(join=600, last_call=0.1), interval, attempts
    )
    return [
        RendezvousCore(
            settings,
            RunKeys("rdzv/model/"),
            HeartbeatLiveness(interval, attempts),
            addr=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
            pid=100,
            local_id=i,
            nonce=f"n{i}",
        )
        for i in range(n)
    ]


def _round(sim: Simulation, nodes: list[_Node], cores: list[RendezvousCore]) -> float:
    """Release ``nodes`` at once; seconds until the last holds its rank."""
    start = sim.clock
    ops_before = sum(node.ops for node in nodes)
    for node in nodes:
        node.done_at = None
        node.liveness = cores[node.index].liveness
        # Each node offers its bootstrap endpoint (as rdzv run and bench/scale.py do).
        program = cores[node.index].next_rendezvous(("10.0.0.1", 29500))
        sim.at(start, functools.partial(sim.start, node, program))
    goal = sim.finished + len(nodes)
    sim.run(lambda: sim.finished >= goal, horizon=start + 3600)
    failed = [n.result for n in nodes if not hasattr(n.result, "rank")]
    if failed:
        raise RuntimeError(f"{len(failed)} nodes did not get a rank: {failed[:3]}")
    sim.ops_per_node = (sum(node.ops for node in nodes) - ops_before) / len(nodes)
    return max(n.done_at for n in nodes if n.done_at is not None) - start


def _setting(
    n: int, mode: str, costs: Costs, procs: int, cores: float, interval: float, attempts: int
) -> tuple[Simulation, list[_Node]]:
    """A simulation in ``mode`` (harness: ``procs`` client processes sharing ``cores`` CPUs
    with the server; cluster: a CPU per node) and its ``n`` nodes."""
    harness = mode == "harness"
    sim = Simulation(
        costs,
        costs.rtt_loopback if harness else costs.rtt_cluster,
        procs if harness else 0,
        max((procs + 1) / cores, 1.0) if harness else 1.0,
        interval,
        attempts,
    )
    return sim, [_Node(i, i % procs if harness else 0) for i in range(n)]


def simulate(
    n: int, mode: str, costs: Costs, procs: int, cores: float, interval: float, attempts: int
) -> dict[str, Any]:
    """One round of ``n`` nodes; JSON-ready figures."""
    sim, nodes = _setting(n, mode, costs, procs, cores, interval, attempts)
    t0 = time.perf_counter()
    seconds = _round(sim, nodes, _cores(n, n, interval, attempts))
    cpu = sim.server_busy / sim.stretch  # CPU seconds, not stretched wall seconds
    return {
        "nodes": n,
        "round_s": round(seconds, 3),
        "ops_per_node": round(sim.ops_per_node, 2),
        "server_cpu_s": round(cpu, 3),
        "server_cpu_per_node_us": round(cpu / n * 1e6, 1),
        "server_busy_fraction": round(sim.server_busy / seconds, 2),
        "model_runtime_s": round(time.perf_counter() - t0, 1),
    }


def simulate_loss(
    n: int, mode: str, costs: Costs, procs: int, cores: float, interval: float, attempts: int
) -> dict[str, Any]:
    """A round of ``n`` nodes (min n - 1), node 0 dies, the others re-rendezvous at once."""
    sim, nodes = _setting(n, mode, costs, procs, cores, interval, attempts)
    cores_ = _cores(n, n - 1, interval, attempts)
    first = _round(sim, nodes, cores_)
    nodes[0].dead = True
    survivors = nodes[1:]
    after = _round(sim, survivors, cores_)
    return {
        "nodes": n,
        "first_round_s": round(first, 3),
        "detection_s": interval * attempts,
        "death_to_new_round_s": round(after, 3),
        "over_detection_s": round(after - interval * attempts, 3),
    }


# ---------------------------------------------------------------------------- limits
def limits(costs: Costs, n_nodes: int, ranks_per_node: int, interval: float) -> dict[str, Any]:
    """What one server holds and spends at ``n_nodes`` nodes of ``ranks_per_node`` ranks, and
    what a node-local proxy in ``rdzv run`` (its workers' store traffic over the agent's one
    upstream connection, identical waits answered once) changes.

    The ranks' store traffic after the round is torch's ``init_process_group`` on the rank-0
    store: per rank a connection (VALIDATE + PING), an ``add`` on a shared counter, the last
    one ``set``s the id, a ``wait`` for it (woken once) and a ``get``. Through the proxy the
    server sees per node one ``add`` of ``ranks_per_node`` (the proxy hands its workers the
    values in between), one ``wait`` (woken once) and one ``get``, on a connection that is
    already open (the agent's).
    """
    ranks = n_nodes * ranks_per_node
    direct_per_rank = costs.server_accept + 3 * costs.server_request + costs.server_wake
    proxied_per_node = 3 * costs.server_request + costs.server_wake
    set_id = costs.server_request
    heartbeats = n_nodes / interval * costs.server_request
    return {
        "nodes": n_nodes,
        "ranks": ranks,
        "descriptors": {
            "rendezvous": n_nodes,
            "ranks_direct": ranks + n_nodes,
            "ranks_with_node_proxy": n_nodes,
            "limit_here": costs.descriptors_here,
            "servers_needed_here_direct": -(-(ranks + n_nodes) // costs.descriptors_here),
        },
        "memory_mb": {
            "rendezvous": round(
                n_nodes * (costs.rss_per_connection + costs.bytes_per_node_keys) / 2**20, 1
            ),
            "ranks_direct": round((ranks + n_nodes) * costs.rss_per_connection / 2**20, 1),
        },
        "server_cpu_s": {
            "heartbeats_per_second": round(heartbeats, 3),
            "init_storm_direct": round(ranks * direct_per_rank + set_id, 2),
            "init_storm_with_node_proxy": round(n_nodes * proxied_per_node + set_id, 2),
        },
    }


# ---------------------------------------------------------------------------- calibration
def calibrate(connections: int = 2000, repeat: int = 10) -> dict[str, float]:
    """Measure the server's CPU per request, per extra key, per wake-up and per connection
    against a real ``rdzv serve`` (its /proc CPU seconds; seconds per unit)."""
    import asyncio
    import subprocess

    from rdzv.store.async_tcp import AsyncTCPStore

    proc = subprocess.Popen(
        [sys.executable, "-m", "rdzv", "serve", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src")),
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline().rsplit(":", 1)[1])

    def cpu() -> float:
        return cpu_seconds(proc.pid)

    async def main() -> dict[str, float]:
        out: dict[str, float] = {}
        before = cpu()
        stores = [
            await AsyncTCPStore("127.0.0.1", port, timeout=60).connect() for _ in range(connections)
        ]
        out["server_accept"] = (cpu() - before) / connections

        async def phase(name: str, units: int, make: Callable[[int], Any]) -> None:
            before = cpu()
            for r in range(repeat):
                await asyncio.gather(*(make(i + r * connections) for i in range(connections)))
            out[name] = (cpu() - before) / (units * repeat)

        await phase("server_request", connections, lambda i: stores[i % connections].add("c", 1))
        keys = [f"k{i}" for i in range(1000)]
        await stores[0].multi_set(keys, [b"x" * 64] * len(keys))
        before = cpu()
        for _ in range(repeat * 5):
            await stores[0].multi_get(keys)
        per_multi = (cpu() - before) / (repeat * 5)
        out["server_key"] = max(0.0, per_multi - out["server_request"]) / (len(keys) - 1)
        spent = 0.0
        for r in range(repeat):
            waits = [asyncio.ensure_future(s.get(f"w{r}")) for s in stores[1:]]
            await asyncio.sleep(0.2)  # the waits are parked (their requests are not counted)
            before = cpu()
            await stores[0].set(f"w{r}", b"1")
            await asyncio.gather(*waits)
            spent += cpu() - before
        woken = (connections - 1) * repeat
        out["server_wake"] = spent / woken
        for s in stores:
            await s.close()
        return out

    try:
        return asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(10)


# ---------------------------------------------------------------------------- main
MEASURED = {  # bench/scale.py, docs/performance.md (harness: 4 processes, 2 shared cores)
    1024: 0.23,
    4096: 1.00,
    10000: 2.13,
    16000: 4.20,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default="1024,4096,10000,16000",
        help="N to check against the measured points (harness mode)",
    )
    parser.add_argument(
        "--extrapolate", default="100000,125000", help="N to model as a real job (cluster mode)"
    )
    parser.add_argument("--mode", choices=("harness", "cluster", "both"), default="both")
    parser.add_argument("--procs", type=int, default=4, help="client processes (harness)")
    parser.add_argument("--cores", type=float, default=2.0, help="CPUs they share (harness)")
    parser.add_argument("--interval", type=float, default=5.0, help="keep-alive interval (s)")
    parser.add_argument("--attempts", type=int, default=3, help="keep-alive attempts")
    parser.add_argument(
        "--loss",
        default="4096",
        help="N of the node-loss scenario, comma-separated ('' none; harness mode up to 16,000)",
    )
    parser.add_argument(
        "--calibrate", action="store_true", help="measure the server costs against rdzv serve first"
    )
    opts = parser.parse_args()
    logging.getLogger("rdzv").setLevel(logging.ERROR)  # the simulated nodes' own warnings
    costs = Costs()
    result: dict[str, Any] = {
        "workload": "issue 11 discrete-event model",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    if opts.calibrate:
        measured = calibrate()
        result["calibration"] = {k: round(v * 1e6, 2) for k, v in measured.items()}
        costs = replace(
            costs,
            server_accept=measured["server_accept"],
            server_request=measured["server_request"],
            server_key=measured["server_key"],
            server_wake=measured["server_wake"],
        )
    result["costs"] = {k: {"value": v, "source": SOURCES[k]} for k, v in asdict(costs).items()}
    args = (costs, opts.procs, opts.cores, opts.interval, opts.attempts)
    sizes = [int(s) for s in opts.sizes.split(",") if s]
    if opts.mode in ("harness", "both"):
        rows = []
        for n in sizes:
            row = simulate(n, "harness", *args)
            if n in MEASURED:
                row["measured_s"] = MEASURED[n]
                row["model_over_measured"] = round(row["round_s"] / MEASURED[n], 2)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        result["harness"] = rows
    if opts.mode in ("cluster", "both"):
        rows = []
        for n in [int(s) for s in opts.extrapolate.split(",") if s]:
            rows.append(simulate(n, "cluster", *args))
            print(json.dumps(rows[-1]), file=sys.stderr)
        result["cluster"] = rows
    result["loss"] = []
    for n in [int(x) for x in opts.loss.split(",") if x]:
        row = {"cluster": simulate_loss(n, "cluster", *args)}
        if n <= 16_000 and opts.mode != "cluster":
            row["harness"] = simulate_loss(n, "harness", *args)
        print(json.dumps(row), file=sys.stderr)
        result["loss"].append(row)
    per_node = min(
        (row["server_cpu_per_node_us"] * 1e-6 for row in result.get("cluster", [])),
        default=4 * costs.server_request + costs.server_wake,
    )
    # A round is server-bound from ~20,000 nodes on (busy fraction 1.0): its time is then
    # N x the server's CPU per node.
    result["nodes_for_a_10s_round_server_bound"] = int(10 / per_node)
    result["limits"] = {
        "100000_nodes": limits(costs, 100_000, 8, opts.interval),
        "1000000_ranks": limits(costs, 125_000, 8, opts.interval),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
