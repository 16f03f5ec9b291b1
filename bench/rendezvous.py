"""Benchmark: time for N nodes to all hold a rank, rdzv's dynamic rendezvous vs torch's.

Each node is a thread with its own store connection; the nodes are spread over a few worker
processes; the store server runs in the parent process. Both sides run min = max = N (a round
that completes when the last node arrives), so the figure is the pure cost of the algorithm:
from the moment every node is connected and released, to the moment the last node holds its
rank. Store operations are counted per node with a wrapping store on both sides.

    python bench/rendezvous.py [--sizes 8,64,256,1024] [--procs 4] [--repeat 3]
        [--torch-budget 60] [--impls ours,torch] [--store tcp|hash]

torch's rendezvous at large N may take very long: each torch trial has a time budget (its
join timeout); when some nodes have no rank by then, the JSON reports the budget as a lower
bound (``"lower_bound": true``) with the number of nodes that completed.

Prints one JSON document: machine info, workload, per-N results and ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent
for _p in (str(_REPO / "src"), str(_REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench.counting import CountingStore, OpCounter  # noqa: E402
from bench.release import NodeThreads  # noqa: E402

HOST = "127.0.0.1"


# ---------------------------------------------------------------------------- node factories
def _ours_nodes(
    port: int, count: int, n: int, run_id: str, budget: float
) -> tuple[list[Any], OpCounter, OpCounter]:
    from rdzv.rendezvous.dynamic import DynamicRendezvousHandler, RendezvousTimeout
    from rdzv.store.tcp import TCPStore

    counter, background = OpCounter(), OpCounter()
    handlers = []
    for _ in range(count):
        client = TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=budget + 30))
        handlers.append(
            DynamicRendezvousHandler(
                run_id,
                CountingStore(client, counter, background),
                n,
                n,
                backend_name="c10d",
                local_addr=HOST,
                timeout=RendezvousTimeout(join=budget),
                master_endpoint=(HOST, port),
            )
        )
    return handlers, counter, background


class _TorchCounter:
    """Counts calls made by torch's rendezvous through a Python ``dist.Store`` subclass."""

    def __init__(self) -> None:
        self.counter = OpCounter()

    def wrap(self, inner: Any) -> Any:
        import torch.distributed as dist

        counter = self.counter

        class Counting(dist.Store):  # type: ignore[misc]
            def __init__(self, store: Any) -> None:
                super().__init__()
                self._inner = store

            def set(self, key: str, value: bytes) -> None:
                counter.bump("set", len(value))
                self._inner.set(key, value)

            def get(self, key: str) -> bytes:
                value = bytes(self._inner.get(key))
                counter.bump("get", len(value))
                return value

            def add(self, key: str, amount: int) -> int:
                counter.bump("add")
                return int(self._inner.add(key, amount))

            def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
                current = bytes(self._inner.compare_set(key, expected, desired))
                counter.bump("compare_set", len(expected) + len(desired) + len(current))
                return current

            def check(self, keys: list[str]) -> bool:
                counter.bump("check")
                return bool(self._inner.check(keys))

            def wait(self, keys: list[str], timeout: Any = None) -> None:
                counter.bump("wait")
                if timeout is None:
                    self._inner.wait(keys)
                else:
                    self._inner.wait(keys, timeout)

            def delete_key(self, key: str) -> bool:
                counter.bump("delete_key")
                return bool(self._inner.delete_key(key))

            def num_keys(self) -> int:
                counter.bump("num_keys")
                return int(self._inner.num_keys())

            def multi_get(self, keys: list[str]) -> list[bytes]:
                values = [bytes(v) for v in self._inner.multi_get(keys)]
                counter.bump("multi_get", sum(len(v) for v in values))
                return values

            def multi_set(self, keys: list[str], values: list[bytes]) -> None:
                counter.bump("multi_set", sum(len(v) for v in values))
                self._inner.multi_set(keys, values)

            def has_extended_api(self) -> bool:
                return True

            def clone(self) -> Any:
                return Counting(self._inner.clone())

        return Counting(inner)


def _torch_nodes(
    port: int, count: int, n: int, run_id: str, budget: float
) -> tuple[list[Any], OpCounter, OpCounter]:
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (
        C10dRendezvousBackend,
    )
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
        DynamicRendezvousHandler,
        RendezvousTimeout,
    )

    counting = _TorchCounter()
    handlers = []
    for _ in range(count):
        client = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=budget + 30))
        store = counting.wrap(client)
        backend = C10dRendezvousBackend(store, run_id)
        handlers.append(
            DynamicRendezvousHandler.from_backend(
                run_id,
                store,
                backend,
                n,
                n,
                local_addr=HOST,
                timeout=RendezvousTimeout(join=timedelta(seconds=budget)),
            )
        )
    return handlers, counting.counter, OpCounter()


# ---------------------------------------------------------------------------- worker process
def _worker(
    impl: str, port: int, count: int, n: int, run_id: str, budget: float, pipe: Connection
) -> None:
    import logging

    logging.disable(logging.CRITICAL)
    make = _ours_nodes if impl == "ours" else _torch_nodes
    handlers, counter, background = make(port, count, n, run_id, budget)
    counter.counts.clear()  # construction (torch's backend writes its sentinel) is not timed
    nodes = NodeThreads(handlers)
    pipe.send("ready")
    pipe.recv()
    released = nodes.release(budget + 60)
    pipe.send(
        {
            "done": released.done,
            "ranks": released.ranks,
            "errors": released.errors[:5],
            "n_errors": len(released.errors),
            "ops": counter.snapshot(),
            "value_bytes": counter.value_bytes,
            "background_ops": background.snapshot(),
        }
    )
    os._exit(0)  # do not wait for keep-alive threads or destructors


def _server(impl: str) -> tuple[Any, int]:
    if impl == "ours":
        from rdzv.store.tcp import TCPStore

        server = TCPStore(HOST, 0, is_master=True, multi_tenant=True)
        return server, int(server.port)
    import torch.distributed as dist

    server = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    return server, int(server.port)


def trial(impl: str, n: int, procs: int, budget: float) -> dict[str, Any]:
    server, port = _server(impl)
    run_id = f"bench-{impl}-{n}-{os.getpid()}"
    ctx = mp.get_context("spawn")
    k = max(1, min(procs, n))
    shares = [n // k + (1 if i < n % k else 0) for i in range(k)]
    pipes = []
    workers = []
    for share in shares:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(impl, port, share, n, run_id, budget, child))
        proc.start()
        pipes.append(parent)
        workers.append(proc)
    for pipe in pipes:
        assert pipe.recv() == "ready"
    start = time.monotonic()
    for pipe in pipes:
        pipe.send("go")
    reports = [pipe.recv() for pipe in pipes]
    for proc in workers:
        proc.join(30)
    del server
    done = [t for r in reports for t in r["done"]]
    ranks = sorted(x for r in reports for x in r["ranks"])
    ops = _merge(r["ops"] for r in reports)
    background = _merge(r["background_ops"] for r in reports)
    complete = len(done) == n and ranks == list(range(n))
    seconds = (max(done) - start) if complete else budget
    return {
        "seconds": round(seconds, 4),
        "lower_bound": not complete,
        "completed": len(done),
        "errors": sum(r["n_errors"] for r in reports),
        "error_samples": [e for r in reports for e in r["errors"]][:3],
        "ops_per_node": round(sum(ops.values()) / n, 2),
        "value_bytes_per_node": round(sum(r["value_bytes"] for r in reports) / n),
        "ops": ops,
        "background_ops": background,
    }


def _merge(dicts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for key, value in d.items():
            out[key] = out.get(key, 0) + value
    return out


def hash_trial(n: int) -> dict[str, Any]:
    """ours on an in-process HashStore (no network): the algorithm's own cost."""
    from rdzv import HashStore
    from rdzv.rendezvous.dynamic import DynamicRendezvousHandler

    base = HashStore(timeout=120)
    counter, background = OpCounter(), OpCounter()
    handlers = [
        DynamicRendezvousHandler(
            "bench",
            CountingStore(base, counter, background),
            n,
            n,
            local_addr=HOST,
            master_endpoint=(HOST, 1),
        )
        for _ in range(n)
    ]
    released = NodeThreads(handlers).release(120)
    return {
        "seconds": round(released.seconds(), 4),
        "lower_bound": len(released.done) < n,
        "completed": len(released.done),
        "ops_per_node": round(counter.total() / n, 2),
        "value_bytes_per_node": round(counter.value_bytes / n),
        "ops": counter.snapshot(),
        "background_ops": background.snapshot(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="8,64,256,1024")
    parser.add_argument("--procs", type=int, default=4, help="worker processes per trial")
    parser.add_argument("--torch-budget", type=float, default=60.0, help="seconds per torch trial")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per rdzv trial")
    parser.add_argument("--impls", default="ours,torch")
    parser.add_argument("--store", choices=["tcp", "hash"], default="tcp")
    parser.add_argument("--repeat", type=int, default=3, help="rdzv runs per N (median kept)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    impls = args.impls.split(",")
    results = []
    for n in sizes:
        row: dict[str, Any] = {"n": n}
        for impl in impls:
            if impl == "ours":
                # cheap: repeat and keep the median run (torch's trials are far too long)
                runs = [
                    hash_trial(n)
                    if args.store == "hash"
                    else trial(impl, n, args.procs, args.budget)
                    for _ in range(args.repeat)
                ]
                runs.sort(key=lambda r: (r["lower_bound"], r["seconds"]))
                row[impl] = runs[len(runs) // 2]
                row[impl]["runs_s"] = [r["seconds"] for r in runs]
            else:
                row[impl] = trial(impl, n, args.procs, args.torch_budget)
            print(f"n={n} {impl}: {row[impl]['seconds']}s", file=sys.stderr, flush=True)
        if "ours" in row and "torch" in row:
            ratio = row["torch"]["seconds"] / max(row["ours"]["seconds"], 1e-9)
            row["speedup"] = round(ratio, 1)
            row["speedup_is_lower_bound"] = row["torch"]["lower_bound"]
            row["ops_ratio"] = round(
                row["torch"]["ops_per_node"] / max(row["ours"]["ops_per_node"], 1e-9), 1
            )
        results.append(row)
    import importlib.metadata as md

    try:
        torch_version = md.version("torch")
    except md.PackageNotFoundError:
        torch_version = None
    doc = {
        "figure": "time until all N nodes hold a rank (dynamic rendezvous, min = max = N)",
        "workload": {
            "nodes": "threads, one store connection each",
            "worker_processes": args.procs,
            "store": args.store,
            "server": "in the parent process on 127.0.0.1",
            "torch_budget_s": args.torch_budget,
            "keep_alive_interval_s": 5,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch_version,
        },
        "results": results,
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
