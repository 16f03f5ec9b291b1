"""``rdzv demo``: N local processes meet through a FileStore, all-gather and sum their ranks."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
from typing import Any

__all__ = ["register", "run_worker"]


def run_worker(path: str, rank: int, world_size: int, queue: Any) -> None:
    """One demo worker: publish a value, all-gather everyone's, sum the ranks, barrier."""
    from rdzv import FileStore

    store = FileStore(path, world_size, timeout=30)
    store.set(f"hello/{rank}", f"rank {rank} pid {os.getpid()}")
    gathered = store.multi_get([f"hello/{r}" for r in range(world_size)])
    store.add("rank_sum", rank)
    store.barrier("summed", world_size)
    total = int(store.get("rank_sum"))
    queue.put({"rank": rank, "gathered": [g.decode() for g in gathered], "rank_sum": total})
    store.barrier("done", world_size)


def _demo(args: argparse.Namespace) -> int:
    n: int = args.nproc
    if n < 1:
        raise SystemExit("rdzv demo: --nproc must be >= 1")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="rdzv-demo-") as tmp:
        path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=run_worker, args=(path, r, n, queue)) for r in range(n)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=60) for _ in range(n)]
        for p in procs:
            p.join(60)
    results.sort(key=lambda r: r["rank"])
    expected = n * (n - 1) // 2
    ok = all(r["rank_sum"] == expected for r in results) and all(p.exitcode == 0 for p in procs)
    if args.json:
        print(json.dumps({"ok": ok, "world_size": n, "workers": results}))
    else:
        for r in results:
            print(f"[{r['rank']}] all-gather: {r['gathered']}")
        print(f"sum of ranks over {n} workers: {results[0]['rank_sum']} (expected {expected})")
    return 0 if ok else 1


def register(subparsers: Any) -> None:
    """Add the ``demo`` sub-command."""
    parser = subparsers.add_parser("demo", help="run a small multi-process store demo")
    parser.add_argument("--nproc", type=int, default=4, help="number of worker processes")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=_demo)
