"""TCPStore server benchmark: torch's C++ server vs ``rdzv serve``, same clients, one run.

Workload: every client loops over ``set(key, 64-byte value)`` then ``get(key)`` (torch's
client sends WAIT + GET for a get: two round trips) on its own 100 keys, for a fixed time.
Clients are ``torch.distributed.TCPStore`` objects (C++; they release the GIL while they
wait) spread over a few client processes, each running several client threads. Each server
runs in a process of its own: (a) torch's default (libuv) server, (b) ``rdzv serve`` with
its defaults (uvloop, the C fast path when built and busy polling, see ``rdzv.server.fastpath``),
and with ``--variants`` (c) ``rdzv serve --busy-poll-us 0`` and (d) ``rdzv serve`` with the
fast path off. Then rdzv's Python client against rdzv's server, for reference.

Prints one JSON document: ops/s (an op is one ``set`` or one ``get`` call), p50 and p99
latency per call in microseconds, and the rdzv/torch throughput ratio per client count.

Usage (from the repository root)::

    python bench/store_ops.py [--clients 1 16 64] [--seconds 3] [--procs 4] [--repeats 3]
                              [--variants]
    python bench/store_ops.py --security [--python-clients 1 16] [--seconds 3] [--repeats 3]

``--security`` instead measures the cost of authentication and TLS (``security_main``):
rdzv's Python client against ``rdzv serve`` with neither, a token, TLS, and both; connect
time (handshake included) and the set/get loop.

``--metrics`` measures instead the cost of ``rdzv serve --metrics-port`` (request counting
and timing, in C on the fast path) with torch's clients: the server without metrics, with
metrics scraped every 100 ms during the load (Prometheus scrapes every 15 s; 100 ms is a
stress), and scraped 1,000 times a second (one keep-alive scraper). The server's CPU per op
is the store process's; the listener process's is reported apart (``listener_cpu_us_per_op``,
from the clients' start to their exit), and so is the CPU of one scrape without load
(``scrape_cost_without_load``)::

    python bench/store_ops.py --metrics [--clients 1 16 64] [--seconds 3] [--repeats 3]

``--durability`` measures instead the cost of ``rdzv serve --data-dir`` (fsync always,
interval, never) against the in-memory server, with rdzv's Python client (same workload;
every get's reply waits for the group commit of the set before it)::

    python bench/store_ops.py --durability [--durability-clients 1 16] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from procstat import cpu_seconds

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
VALUE = b"v" * 64
KEYS_PER_CLIENT = 100
SAMPLE_EVERY = 7  # keep one latency in SAMPLE_EVERY to bound the report size


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    return env


# --------------------------------------------------------------------------- servers
TORCH_SERVER = """
import sys, time, datetime
import torch.distributed as dist
s = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                  timeout=datetime.timedelta(seconds=600))
print(f"listening on 127.0.0.1:{s.port}", flush=True)
sys.stdin.read()
"""


def start_server(kind: str, extra: Sequence[str] = ()) -> tuple[subprocess.Popen[str], int]:
    """Start a server process (``extra``: more ``rdzv serve`` arguments; with
    ``--metrics-port``, read the status page line with :func:`metrics_url`)."""
    env = _env()
    if kind == "torch":
        cmd = [sys.executable, "-c", TORCH_SERVER]
    else:
        cmd = [sys.executable, "-m", "rdzv", "serve", "--port", "0", "--quiet", *extra]
        if kind == "rdzv-python":  # rdzv serve without its C fast path (rdzv.server.fastpath)
            env["RDZV_FASTPATH"] = "0"
        elif kind == "rdzv-nopoll":  # without busy polling (rdzv.server.fastpath.BusyPoller)
            cmd += ["--busy-poll-us", "0"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"{kind} server did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def metrics_url(proc: subprocess.Popen[str]) -> str:
    """The /metrics URL ``rdzv serve --metrics-port`` printed after its endpoint."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("status page on "):
        raise RuntimeError(f"rdzv serve printed no status page URL: {line!r}")
    return line.split()[3] + "metrics"


class Scraper(threading.Thread):
    """GETs ``url`` every ``interval`` seconds over one keep-alive connection until stopped;
    counts the scrapes (each reply read whole)."""

    def __init__(self, url: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.interval = interval
        self.scrapes = 0
        self.seconds = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
        start = time.perf_counter()
        next_at = start
        while not self._done.is_set():
            conn.request("GET", parts.path)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"scrape failed: {response.status}")
            self.scrapes += 1
            next_at += self.interval
            delay = next_at - time.perf_counter()
            if delay > 0:
                self._done.wait(delay)
            else:
                next_at = time.perf_counter()  # behind: do not burst to catch up
        self.seconds = time.perf_counter() - start
        conn.close()

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join(60)
        return {"scrapes": self.scrapes, "scrapes_per_s": round(self.scrapes / self.seconds, 1)}


#: --metrics variants: server kind -> seconds between scrapes (None: no metrics at all).
METRICS_VARIANTS: dict[str, float | None] = {
    "rdzv": None,
    "rdzv-metrics-100ms": 0.1,
    "rdzv-metrics-1000/s": 0.001,
}


def measure_metrics(variant: str, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """torch clients on ``rdzv serve`` without metrics, or with ``--metrics-port 0`` scraped
    at the variant's interval for the whole run."""
    interval = METRICS_VARIANTS[variant]
    if interval is None:
        return measure("rdzv", "torch", clients, args)
    proc, port = start_server("rdzv", ("--metrics-port", "0"))
    try:
        scraper = Scraper(metrics_url(proc), interval)
        # The listener is a process of its own (rdzv.observe.listener): its CPU is reported
        # apart from the store process's (server_cpu_us_per_op).
        listener = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        listener_cpu = cpu_seconds(listener)
        scraper.start()
        result = run_clients("torch", port, clients, args.procs, args.seconds, proc.pid)
        listener_cpu = cpu_seconds(listener) - listener_cpu
        result.update(scraper.stop())
        ops = max(result["ops_per_s"] * args.seconds, 1)  # CPU from connect to exit: an upper bound
        result["listener_cpu_us_per_op"] = round(listener_cpu / ops * 1e6, 2)
    finally:
        stop_server(proc)
    return result


def alternated(
    variants: Sequence[str], repeats: int, run: Callable[[str], dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """``run(variant)`` ``repeats`` times for each of ``variants``, alternating variants (the
    machine's load drifts); the runs by variant."""
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for _ in range(repeats):
        for variant in variants:
            rows[variant].append(run(variant))
    return rows


def scrape_cost(scrapes: int = 3000, idle: float = 3.0) -> dict[str, float]:
    """Without store load: the CPU one /metrics scrape costs the listener process, the
    scraper (this process) and the store process, and the store process's CPU per second
    spent publishing snapshots to an idle listener."""
    import http.client
    from urllib.parse import urlsplit

    proc, _ = start_server("rdzv", ("--metrics-port", "0"))
    try:
        url = urlsplit(metrics_url(proc))
        listener = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        store_cpu = cpu_seconds(proc.pid)
        time.sleep(idle)
        publishing = cpu_seconds(proc.pid) - store_cpu
        conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
        before = (cpu_seconds(listener), time.process_time(), cpu_seconds(proc.pid))
        start = time.perf_counter()
        for _ in range(scrapes):
            conn.request("GET", url.path)
            conn.getresponse().read()
        wall = time.perf_counter() - start
        after = (cpu_seconds(listener), time.process_time(), cpu_seconds(proc.pid))
        conn.close()
    finally:
        stop_server(proc)
    listener_s, scraper_s, store_s = (b - a for a, b in zip(before, after, strict=True))
    return {
        "scrapes": scrapes,
        "scrape_wall_us": round(wall / scrapes * 1e6, 1),
        "listener_cpu_us_per_scrape": round(listener_s / scrapes * 1e6, 1),
        "scraper_cpu_us_per_scrape": round(scraper_s / scrapes * 1e6, 1),
        "store_cpu_us_per_scrape": round(store_s / scrapes * 1e6, 2),
        "store_cpu_ms_per_s_idle_publishing": round(publishing / idle * 1e3, 2),
    }


def metrics_main(args: argparse.Namespace) -> None:
    results = []
    for clients in args.clients:
        rows = alternated(
            list(METRICS_VARIANTS), args.repeats, lambda v, n=clients: measure_metrics(v, n, args)
        )
        for variant in METRICS_VARIANTS:
            results.append(
                {"variant": variant, **summarize(variant, "torch", clients, rows[variant])}
            )
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)

    def ops(variant: str, clients: int) -> int:
        return next(
            r["ops_per_s"] for r in results if r["variant"] == variant and r["clients"] == clients
        )

    ratios = {
        variant: {str(n): round(ops(variant, n) / ops("rdzv", n), 3) for n in args.clients}
        for variant in METRICS_VARIANTS
        if variant != "rdzv"
    }
    print(
        json.dumps(
            {
                "figure": "rdzv serve --metrics-port: cost of metrics, torch C++ clients",
                "workload": {
                    "loop": "set(key, 64 B) then get(key) (torch get = WAIT + GET)",
                    "keys_per_client": KEYS_PER_CLIENT,
                    "seconds": args.seconds,
                    "op": "one set or get call",
                    "scraper": "one thread of the bench process, one keep-alive connection",
                    "repeats": args.repeats,
                    "statistic": "median run by ops/s; latencies and CPU of that run",
                },
                "machine": machine(),
                "results": results,
                "ratio_over_no_metrics": ratios,
                "scrape_cost_without_load": scrape_cost(),
            },
            indent=2,
        )
    )


def stop_server(proc: subprocess.Popen[str]) -> None:
    # torch's server script exits when its stdin closes; rdzv serve on SIGTERM.
    proc.terminate()
    proc.communicate(timeout=30)


# --------------------------------------------------------------------------- client worker
def worker(client: str, port: int, threads: int, seconds: float) -> None:
    """Client process: connects ``threads`` clients, prints ``ready``, reads the start time
    (``time.time()``) from stdin, runs, prints a JSON summary on stdout."""
    if client == "torch":
        import datetime

        import torch.distributed as dist

        def connect() -> Any:
            return dist.TCPStore("127.0.0.1", port, timeout=datetime.timedelta(seconds=60))
    else:
        sys.path.insert(0, str(SRC))
        from rdzv.store.tcp import TCPStore

        def connect() -> Any:
            return TCPStore("127.0.0.1", port, timeout=60, **security_kwargs())

    stores = [connect() for _ in range(threads)]
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())
    counts = [0] * threads
    samples: list[list[float]] = [[] for _ in range(threads)]
    pid = os.getpid()

    def run(t: int) -> None:
        store = stores[t]
        keys = [f"bench/{pid}/{t}/{i}" for i in range(KEYS_PER_CLIENT)]
        lat = samples[t]
        clock = time.perf_counter
        n = 0
        while time.time() < start_at:
            time.sleep(0.001)
        end = clock() + seconds
        while True:
            key = keys[n % KEYS_PER_CLIENT]
            t0 = clock()
            store.set(key, VALUE)
            t1 = clock()
            store.get(key)
            t2 = clock()
            n += 2
            if n % SAMPLE_EVERY < 2:
                lat.append(t1 - t0)
                lat.append(t2 - t1)
            if t2 >= end:
                break
        counts[t] = n

    pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    print(json.dumps({"ops": sum(counts), "latencies": [x for s in samples for x in s]}))


def run_clients(
    client: str, port: int, clients: int, procs: int, seconds: float, server_pid: int
) -> dict[str, Any]:
    nproc = max(1, min(procs, clients))
    split = [clients // nproc + (1 if i < clients % nproc else 0) for i in range(nproc)]
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", client, str(port), str(n), str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for n in split
    ]
    for w in workers:  # every client connected
        assert w.stdout is not None
        if w.stdout.readline() != "ready\n":
            raise RuntimeError("a client process failed to connect")
    start_at = time.time() + 0.2
    for w in workers:
        assert w.stdin is not None
        w.stdin.write(f"{start_at}\n")
        w.stdin.flush()
    ops = 0
    latencies: list[float] = []
    time.sleep(max(0.0, start_at - time.time()))
    cpu_before = cpu_seconds(server_pid)
    time.sleep(seconds)
    cpu_used = cpu_seconds(server_pid) - cpu_before
    for w in workers:
        out, _ = w.communicate(timeout=seconds + 120)
        if w.returncode != 0:
            raise RuntimeError(f"client process failed ({w.returncode})")
        report = json.loads(out)
        ops += report["ops"]
        latencies += report["latencies"]
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e6, 1)

    return {
        "ops_per_s": round(ops / seconds),
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "server_cpu_us_per_op": round(cpu_used / max(ops, 1) * 1e6, 2),
        "client_processes": nproc,
    }


def measure(server: str, client: str, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    proc, port = start_server(server)
    try:
        return run_clients(client, port, clients, args.procs, args.seconds, proc.pid)
    finally:
        stop_server(proc)


def summarize(server: str, client: str, clients: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run (by ops/s) of several, with every run's ops/s for reference."""
    ordered = sorted(runs, key=lambda r: r["ops_per_s"])
    median = ordered[len(ordered) // 2]
    return {
        "server": server,
        "client": client,
        "clients": clients,
        **median,
        "ops_per_s_runs": [r["ops_per_s"] for r in runs],
    }


# --------------------------------------------------------------------------- durability
DURABILITY_MODES = ("memory", "never", "interval", "always")


def measure_durable(mode: str, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """rdzv's Python client on ``rdzv serve`` in memory or with ``--data-dir --fsync mode``
    (a fresh directory next to the repository's other temporary files)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rdzv-bench-") as data_dir:
        extra = () if mode == "memory" else ("--data-dir", data_dir, "--fsync", mode)
        proc, port = start_server("rdzv", extra)
        try:
            result = run_clients("rdzv", port, clients, args.procs, args.seconds, proc.pid)
        finally:
            stop_server(proc)
    return {"durability": mode, **result}


def durability_main(args: argparse.Namespace) -> None:
    results = []
    for clients in args.durability_clients:
        rows = alternated(
            DURABILITY_MODES, args.repeats, lambda m, n=clients: measure_durable(m, n, args)
        )
        for mode in DURABILITY_MODES:
            results.append({"durability": mode, **summarize("rdzv", "rdzv", clients, rows[mode])})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "figure": "rdzv serve --data-dir: cost of durability per fsync policy",
                "workload": {
                    "loop": "set(key, 64 B) then get(key), rdzv Python client (extensions)",
                    "keys_per_client": KEYS_PER_CLIENT,
                    "seconds": args.seconds,
                    "op": "one set or get call",
                    "repeats": args.repeats,
                    "statistic": "median run by ops/s; latencies and CPU of that run",
                    "data_dir": "tempfile.gettempdir(): " + __import__("tempfile").gettempdir(),
                },
                "machine": machine(),
                "results": results,
            },
            indent=2,
        )
    )


def machine() -> dict[str, Any]:
    import torch

    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = None
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "uvloop": uv,
        "rdzv_fastpath": fastpath_state(),
    }


def fastpath_state() -> str:
    """Whether ``rdzv serve`` runs its C fast path here (the extension built, not disabled)."""
    sys.path.insert(0, str(SRC))
    from rdzv.server import fastpath

    if not fastpath.AVAILABLE:
        return "not built"
    return "on" if fastpath.ENABLED else "off (RDZV_FASTPATH=0)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--procs", type=int, default=4, help="client processes (at most)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    parser.add_argument(
        "--python-clients", type=int, nargs="*", default=[1, 16],
        help="client counts for rdzv's Python client on rdzv's server",
    )  # fmt: skip
    parser.add_argument(
        "--security", action="store_true", help="measure auth and TLS costs (with --durability too)"
    )
    parser.add_argument(
        "--durability", action="store_true",
        help="measure rdzv serve --data-dir (fsync always/interval/never) vs in memory",
    )  # fmt: skip
    parser.add_argument("--durability-clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--metrics", action="store_true",
        help="measure rdzv serve with --metrics-port (scraped every 100 ms, and 1000/s) vs without",
    )  # fmt: skip
    parser.add_argument(
        "--variants", action="store_true",
        help="also measure rdzv serve without busy polling (--busy-poll-us 0) and with its "
        "C fast path off (RDZV_FASTPATH=0, which also turns busy polling off)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.metrics:
        metrics_main(args)
        return
    if args.durability or args.security:
        # Either or both in one run (both: durability's JSON document, then security's).
        if args.durability:
            durability_main(args)
        if args.security:
            security_main(args)
        return
    results = []
    plan = [("torch", "torch"), ("rdzv", "torch")]
    if args.variants:
        plan += [("rdzv-nopoll", "torch"), ("rdzv-python", "torch")]
    for clients in args.clients:
        rows: dict[str, list[dict[str, Any]]] = {server: [] for server, _ in plan}
        for _ in range(args.repeats):  # alternate servers: the machine's load drifts
            for server, client in plan:
                rows[server].append(measure(server, client, clients, args))
        for server, client in plan:
            results.append(summarize(server, client, clients, rows[server]))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    for clients in args.python_clients:
        runs = [measure("rdzv", "rdzv", clients, args) for _ in range(args.repeats)]
        results.append(summarize("rdzv", "rdzv", clients, runs))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)

    def ops(server: str, clients: int) -> int:
        return next(
            r["ops_per_s"]
            for r in results
            if r["server"] == server and r["client"] == "torch" and r["clients"] == clients
        )

    ratios = {str(n): round(ops("rdzv", n) / ops("torch", n), 3) for n in args.clients}
    print(
        json.dumps(
            {
                "figure": "TCPStore server throughput and latency, torch C++ clients",
                "workload": {
                    "loop": "set(key, 64 B) then get(key) (torch get = WAIT + GET)",
                    "keys_per_client": KEYS_PER_CLIENT,
                    "seconds": args.seconds,
                    "op": "one set or get call",
                    "repeats": args.repeats,
                    "statistic": "median run by ops/s; latencies and CPU of that run",
                },
                "machine": machine(),
                "results": results,
                "ratio_rdzv_over_torch": ratios,
            },
            indent=2,
        )
    )


# --------------------------------------------------------------------------- security costs
# The token travels in $RDZV_TOKEN (read by `rdzv serve` and by the client); the TLS CA in
# $BENCH_TLS_CA (read by the client worker).
SECURITY_VARIANTS = ("plain", "token", "tls", "token+tls")
CONNECTS = 200


def security_kwargs() -> dict[str, Any]:
    """TCPStore keyword arguments of the current security variant (client side)."""
    ca = os.environ.get("BENCH_TLS_CA")
    if not ca:
        return {}
    from rdzv.tls import TLSConfig

    return {"tls": TLSConfig(ca=ca)}


def _security_setup(variant: str, certs: Any) -> list[str]:
    """Set the environment of ``variant``; return the extra ``rdzv serve`` arguments."""
    os.environ.pop("RDZV_TOKEN", None)
    os.environ.pop("BENCH_TLS_CA", None)
    extra: list[str] = []
    if "token" in variant:
        os.environ["RDZV_TOKEN"] = "bench-" + "0123456789abcdef" * 2
    if "tls" in variant:
        os.environ["BENCH_TLS_CA"] = str(certs.ca)
        extra = ["--tls-cert", str(certs.server.cert), "--tls-key", str(certs.server.key)]
    return extra


def _connect_times(port: int) -> dict[str, float]:
    from rdzv.store.tcp import TCPStore

    times = []
    for _ in range(CONNECTS):
        t0 = time.perf_counter()
        TCPStore("127.0.0.1", port, timeout=60, **security_kwargs()).close()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "connect_p50_us": round(times[len(times) // 2] * 1e6, 1),
        "connect_p99_us": round(times[int(0.99 * len(times))] * 1e6, 1),
    }


def security_main(args: argparse.Namespace) -> None:
    import tempfile

    sys.path[:0] = [str(SRC), str(REPO)]
    from tests.security.certs import make_certs

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        certs = make_certs(Path(tmp))
        for clients in args.python_clients:
            rows: dict[str, list[dict[str, Any]]] = {v: [] for v in SECURITY_VARIANTS}
            for _ in range(args.repeats):  # alternate variants: the machine's load drifts
                for variant in SECURITY_VARIANTS:
                    proc, port = start_server("rdzv", _security_setup(variant, certs))
                    try:
                        run = run_clients("rdzv", port, clients, args.procs, args.seconds, proc.pid)
                        run.update(_connect_times(port))
                    finally:
                        stop_server(proc)
                    rows[variant].append(run)
            for variant in SECURITY_VARIANTS:
                row = {"variant": variant, **summarize("rdzv", "rdzv", clients, rows[variant])}
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    _security_setup("plain", None)
    print(
        json.dumps(
            {
                "figure": "Security costs: rdzv Python client on rdzv serve, auth and TLS",
                "workload": {
                    "loop": "set(key, 64 B) then get(key) (one round trip each)",
                    "connect": f"{CONNECTS} sequential TCPStore() + close() (handshake incl.)",
                    "keys_per_client": KEYS_PER_CLIENT,
                    "seconds": args.seconds,
                    "repeats": args.repeats,
                    "statistic": "median run by ops/s; latencies and CPU of that run",
                },
                "machine": machine(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, client, port, threads, seconds = sys.argv
        worker(client, int(port), int(threads), float(seconds))
    else:
        main()
